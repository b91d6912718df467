"""The WSGI side of fcgi_manager (PEP 3333): environ building, responses as FastCGI
records, request bodies, wsgi.errors -- unit tests, then requests through a real forked
worker with ``wsgiref.validate`` checking both sides of the interface, and a Flask app."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sys
import wsgiref.validate
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from support import (
    APPS,
    FCGI_END,
    FCGI_STDERR,
    FCGI_STDOUT,
    FcgiReply,
    cgi_params,
    connect_fcgi,
    fcgi_request,
    fcgi_request_bytes,
    read_fcgi_records,
    wait_for,
)

from fcgi_manager import config as config_mod
from fcgi_manager.worker import wsgi
from fcgi_manager.worker.wsgi import BodyBuffer, EnvironBuilder, ErrorStream, FileWrapper, run_app

# -- helpers --------------------------------------------------------------------------------


def parse_records(data: bytes) -> List[Tuple[int, int, bytes]]:
    """Split bytes into (type, request id, content) with an independent parser."""
    out = []
    i = 0
    while i < len(data):
        assert len(data) - i >= 8, "truncated record header"
        version, rtype, rid, clen, plen = (data[i], data[i + 1],
                                           int.from_bytes(data[i + 2:i + 4], "big"),
                                           int.from_bytes(data[i + 4:i + 6], "big"), data[i + 6])
        assert version == 1
        out.append((rtype, rid, data[i + 8:i + 8 + clen]))
        i += 8 + clen + plen
    assert i == len(data)
    return out


class Run:
    """The outcome of :func:`run_app` on one app: every send, the records, the log."""

    def __init__(self) -> None:
        self.sends: List[bytes] = []
        self.logged: List[Tuple[str, str]] = []
        self.error_lines: List[str] = []
        self.status_code = 0

    @property
    def records(self) -> List[Tuple[int, int, bytes]]:
        return parse_records(b"".join(self.sends))

    @property
    def reply(self) -> FcgiReply:
        return FcgiReply(self.records)


def run(app: Callable, params: Optional[Dict[str, str]] = None, body: bytes = b"",
        request_id: int = 1) -> Run:
    result = Run()
    errors = ErrorStream(result.error_lines.append)
    builder = EnvironBuilder(errors)
    environ = builder.build(params if params is not None else cgi_params("/"),
                            io.BytesIO(body))
    result.status_code = run_app(app, environ, result.sends.append, request_id, errors,
                                 lambda msg, tb: result.logged.append((msg, tb)))
    return result


def assert_well_formed(records: List[Tuple[int, int, bytes]], request_id: int = 1) -> None:
    """Only STDOUT/STDERR/END_REQUEST; STDOUT never starts empty; each stream ends with one
    empty record before END_REQUEST, which comes last."""
    types = [t for t, _, _ in records]
    assert set(types) <= {FCGI_STDOUT, FCGI_STDERR, FCGI_END}, types
    assert all(rid == request_id for _, rid, _ in records)
    assert types[-1] == FCGI_END and types.count(FCGI_END) == 1
    stdout = [c for t, _, c in records if t == FCGI_STDOUT]
    assert stdout and stdout[0] != b"", "the first STDOUT record is empty"
    assert all(len(c) <= 65535 for _, _, c in records)
    assert stdout[-1] == b"" and all(stdout[:-1]), "STDOUT must end with exactly one empty"


def simple_app(body: bytes = b"hello", status: str = "200 OK",
               headers: Optional[List[Tuple[str, str]]] = None) -> Callable:
    def app(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
        start_response(status, headers if headers is not None else
                       [("Content-Type", "text/plain")])
        return [body]
    return app


# -- EnvironBuilder ---------------------------------------------------------------------------


def build(params: Dict[str, str], **kwargs: Any) -> Dict[str, Any]:
    return EnvironBuilder(ErrorStream(lambda line: None), **kwargs).build(params, io.BytesIO())


def test_environ_has_every_pep3333_key() -> None:
    body = io.BytesIO(b"x")
    env = EnvironBuilder(ErrorStream(lambda line: None)).build(cgi_params("/a?b=1"), body)
    assert env["wsgi.version"] == (1, 0)
    assert env["wsgi.input"] is body
    assert env["wsgi.multithread"] is False and env["wsgi.multiprocess"] is True
    assert env["wsgi.run_once"] is False
    assert env["wsgi.url_scheme"] == "http"
    assert env["wsgi.file_wrapper"] is FileWrapper
    assert env["REQUEST_METHOD"] == "GET" and env["QUERY_STRING"] == "b=1"
    assert env["PATH_INFO"] == "/a" and env["SCRIPT_NAME"] == ""
    # Empty CONTENT_LENGTH / CONTENT_TYPE (nginx sends them for a GET) are dropped.
    assert "CONTENT_LENGTH" not in env and "CONTENT_TYPE" not in env


def test_environ_template_is_not_shared_between_requests() -> None:
    builder = EnvironBuilder(ErrorStream(lambda line: None))
    first = builder.build(cgi_params("/one", HTTP_X_ONLY_FIRST="1"), io.BytesIO())
    first["app.added"] = True
    second = builder.build(cgi_params("/two"), io.BytesIO())
    assert "HTTP_X_ONLY_FIRST" not in second and "app.added" not in second
    assert second["PATH_INFO"] == "/two"


@pytest.mark.parametrize("host, name, port", [
    ("example.com:8080", "example.com", "8080"),
    ("example.com", "example.com", "80"),
    ("[::1]:8443", "::1", "8443"),
    ("[2001:db8::1]", "2001:db8::1", "80"),
    ("", "localhost", "80"),
])
def test_server_name_and_port_fall_back_to_http_host(host: str, name: str, port: str) -> None:
    params = cgi_params("/")
    del params["SERVER_NAME"], params["SERVER_PORT"]
    params["HTTP_HOST"] = host
    env = build(params)
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == (name, port)


def test_server_name_without_any_host_is_localhost() -> None:
    params = cgi_params("/")
    for key in ("SERVER_NAME", "SERVER_PORT", "HTTP_HOST"):
        del params[key]
    env = build(params)
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("localhost", "80")


def test_server_port_defaults_when_only_server_name_is_sent() -> None:
    params = cgi_params("/", SERVER_NAME="app.example")
    del params["SERVER_PORT"]
    env = build(params)
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("app.example", "80")


def test_https_server_port_default_is_443() -> None:
    params = cgi_params("/", HTTPS="on", HTTP_HOST="secure.example")
    del params["SERVER_NAME"], params["SERVER_PORT"]
    env = build(params)
    assert env["wsgi.url_scheme"] == "https"
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("secure.example", "443")


@pytest.mark.parametrize("params, scheme", [
    ({"HTTPS": "on"}, "https"),
    ({"HTTPS": "ON"}, "https"),
    ({"HTTPS": "1"}, "https"),
    ({"HTTPS": "off"}, "http"),
    ({"HTTPS": ""}, "http"),
    ({"REQUEST_SCHEME": "https"}, "https"),
    ({"REQUEST_SCHEME": "http"}, "http"),
    ({}, "http"),
])
def test_url_scheme(params: Dict[str, str], scheme: str) -> None:
    assert build(cgi_params("/", **params))["wsgi.url_scheme"] == scheme


def _no_path_info(**params: str) -> Dict[str, str]:
    p = cgi_params("/")
    del p["PATH_INFO"]
    p.update(params)
    return p


def test_missing_path_info_with_whole_path_in_script_name_is_a_root_mount() -> None:
    # nginx's stock fastcgi_params at "/": SCRIPT_NAME = $fastcgi_script_name = the URI.
    env = build(_no_path_info(SCRIPT_NAME="/users/42", DOCUMENT_URI="/users/42",
                              REQUEST_URI="/users/42?x=1"))
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", "/users/42")


def test_missing_path_info_and_script_name_uses_the_request_uri() -> None:
    p = _no_path_info(REQUEST_URI="/a%20b/c?q=1")
    del p["SCRIPT_NAME"], p["DOCUMENT_URI"]
    env = build(p)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", "/a b/c")


def test_missing_path_info_under_a_real_script_name_is_empty() -> None:
    env = build(_no_path_info(SCRIPT_NAME="/app", DOCUMENT_URI="/app/x", REQUEST_URI="/app/x"))
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/app", "")


def test_params_are_taken_as_sent_when_path_info_is_present() -> None:
    env = build(cgi_params("/app/x/y", script_name="/app"))
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/app", "/x/y")


@pytest.mark.parametrize("sent_script, sent_path, forced, script, path", [
    ("", "/app/x", "/app", "/app", "/x"),           # root-style params, app under /app
    ("/app", "/x", "/app", "/app", "/x"),           # already split: unchanged
    ("", "/app", "/app", "/app", ""),               # exactly the prefix
    ("", "/application", "/app", "/app", "/application"),  # not a path-segment prefix
    ("", "/other", "/app/", "/app", "/other"),      # trailing slash of the setting ignored
    ("/index.fcgi", "/x", "", "", "/x"),  # "" forces a root mount
])
def test_script_name_setting(sent_script: str, sent_path: str, forced: str, script: str,
                             path: str) -> None:
    params = cgi_params("/", SCRIPT_NAME=sent_script, PATH_INFO=sent_path)
    env = build(params, script_name=forced)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == (script, path)


@pytest.mark.parametrize("sent_script, sent_path, path", [
    ("/hello", "", "/hello"),            # lighttpd mounted at "/": all in SCRIPT_NAME
    ("/hello", "/world", "/hello/world"),
    ("", "/x", "/x"),
])
def test_fix_root_url(sent_script: str, sent_path: str, path: str) -> None:
    env = build(cgi_params("/", SCRIPT_NAME=sent_script, PATH_INFO=sent_path),
                fix_root_url=True)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", path)


# -- Response and run_app -------------------------------------------------------------------


def test_simple_response_records() -> None:
    r = run(simple_app(b"hello", headers=[("Content-Type", "text/plain"), ("X-A", "b")]))
    assert r.status_code == 200
    assert_well_formed(r.records)
    reply = r.reply
    assert reply.stdout == b"Status: 200 OK\r\nContent-Type: text/plain\r\nX-A: b\r\n\r\nhello"
    assert (reply.app_status, reply.protocol_status) == (0, 0)
    assert reply.stderr == b""
    assert len(r.sends) == 1, "a small response leaves in one send"


def test_empty_body_still_sends_headers_in_a_non_empty_record() -> None:
    r = run(simple_app(b"", status="204 No Content", headers=[]))
    assert_well_formed(r.records)
    assert r.reply.stdout == b"Status: 204 No Content\r\n\r\n"


def test_request_id_is_echoed() -> None:
    r = run(simple_app(), request_id=513)
    assert_well_formed(r.records, request_id=513)


def test_large_output_is_split_into_records_and_flushed_in_several_sends() -> None:
    body = bytes(range(256)) * 1024 + b"tail"  # 256 KiB + 4
    r = run(simple_app(body))
    assert_well_formed(r.records)
    assert r.reply.body == body
    assert len(r.sends) > 1, "a large response must not be gathered whole"


def test_many_small_chunks_are_all_sent_in_order() -> None:
    def app(environ: Dict[str, Any], start_response: Callable) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b""  # an empty chunk before anything: no empty STDOUT record may result
        for i in range(2000):
            yield b"%d," % i
            if i % 500 == 0:
                yield b""

    r = run(app)
    assert_well_formed(r.records)
    assert r.reply.body == b"".join(b"%d," % i for i in range(2000))


def test_write_callable() -> None:
    def app(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"one ")
        write(bytearray(b"two "))
        return [b"three"]

    r = run(app)
    assert_well_formed(r.records)
    assert r.reply.body == b"one two three"


def test_start_response_with_exc_info_before_headers_replaces_them() -> None:
    def app(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
        start_response("200 OK", [("X-Dropped", "1")])
        try:
            raise ValueError("while rendering")
        except ValueError:
            start_response("503 Service Unavailable", [("X-Kept", "1")], sys.exc_info())
        return [b"sorry"]

    r = run(app)
    assert r.status_code == 503
    reply = r.reply
    assert reply.status == "503 Service Unavailable"
    assert reply.header("X-Kept") == "1" and reply.header("X-Dropped") is None
    assert reply.body == b"sorry"
    assert not r.logged


def test_start_response_with_exc_info_after_headers_reraises_and_cuts_the_response() -> None:
    closed = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"partial"
            try:
                raise KeyError("late failure")
            except KeyError:
                self.start_response("500 Internal Server Error", [], sys.exc_info())
            yield b"never"

        def close(self) -> None:
            closed.append(True)

    def app(environ: Dict[str, Any], start_response: Callable) -> Body:
        start_response("200 OK", [("Content-Type", "text/plain")])
        body = Body()
        body.start_response = start_response  # type: ignore[attr-defined]
        return body

    r = run(app)
    records = r.records
    reply = r.reply
    assert reply.status == "200 OK" and reply.body == b"partial"
    assert records[-1][0] == FCGI_END and reply.app_status != 0, \
        "a response cut short must end with a non-zero app status"
    assert b"KeyError" in reply.stderr
    assert closed == [True]
    assert len(r.logged) == 1 and "KeyError" in r.logged[0][1]


def test_start_response_twice_without_exc_info_is_a_500() -> None:
    def app(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
        start_response("200 OK", [])
        start_response("201 Created", [])
        return [b""]

    r = run(app)
    assert r.status_code == 500
    assert r.reply.status.startswith("500")


class Tracked:
    """An iterable with ``close()``, failing where asked."""

    def __init__(self, chunks: List[bytes], fail_at: int = -1) -> None:
        self.chunks = chunks
        self.fail_at = fail_at
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        for i, chunk in enumerate(self.chunks):
            if i == self.fail_at:
                raise RuntimeError(f"failed at chunk {i}")
            yield chunk

    def close(self) -> None:
        self.closed += 1


def test_close_is_called_once_on_success() -> None:
    body = Tracked([b"a", b"b"])

    def app(environ: Dict[str, Any], start_response: Callable) -> Tracked:
        start_response("200 OK", [])
        return body

    r = run(app)
    assert r.reply.body == b"ab"
    assert body.closed == 1


def test_close_is_called_when_the_iterable_fails_before_any_output() -> None:
    body = Tracked([b"a"], fail_at=0)

    def app(environ: Dict[str, Any], start_response: Callable) -> Tracked:
        start_response("200 OK", [])
        return body

    r = run(app)
    assert body.closed == 1
    assert r.status_code == 500 and r.reply.status.startswith("500")
    assert_well_formed(r.records)


def test_close_is_called_when_the_iterable_fails_mid_body() -> None:
    body = Tracked([b"a", b"b", b"c"], fail_at=2)

    def app(environ: Dict[str, Any], start_response: Callable) -> Tracked:
        start_response("200 OK", [])
        return body

    r = run(app)
    assert body.closed == 1
    reply = r.reply
    assert reply.status == "200 OK" and reply.body == b"ab"
    assert reply.app_status != 0
    assert "failed at chunk 2" in r.logged[0][1]
    types = [t for t, _, _ in r.records]
    assert types[-1] == FCGI_END and set(types) <= {FCGI_STDOUT, FCGI_STDERR, FCGI_END}


def test_close_raising_is_logged_and_gives_a_500_before_headers() -> None:
    class Body:
        def __iter__(self) -> Iterator[bytes]:
            return iter([])

        def close(self) -> None:
            raise OSError("close failed")

    def app(environ: Dict[str, Any], start_response: Callable) -> Body:
        start_response("200 OK", [])
        return Body()

    r = run(app)
    assert r.reply.status.startswith("500")
    assert any("close failed" in tb for _, tb in r.logged)


def test_app_exception_is_a_500_with_a_logged_traceback() -> None:
    def failing_view(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
        raise ZeroDivisionError("no luck")

    r = run(failing_view, cgi_params("/broken"))
    assert r.status_code == 500
    assert_well_formed(r.records)
    reply = r.reply
    assert reply.status == "500 Internal Server Error"
    assert reply.body == wsgi.INTERNAL_ERROR_BODY
    assert reply.header("Content-Length") == str(len(wsgi.INTERNAL_ERROR_BODY))
    assert b"ZeroDivisionError" in reply.stderr
    (message, tb), = r.logged
    assert "ZeroDivisionError: no luck" in message and "/broken" in message
    assert "Traceback (most recent call last)" in tb and "failing_view" in tb


def test_partial_output_is_discarded_on_a_500_before_headers() -> None:
    def app(environ: Dict[str, Any], start_response: Callable) -> Iterator[bytes]:
        start_response("200 OK", [])
        raise RuntimeError("before the first chunk")
        yield b"unreachable"  # pragma: no cover

    r = run(app)
    assert r.reply.status.startswith("500") and b"200 OK" not in r.reply.stdout


@pytest.mark.parametrize("status, headers", [
    ("200", []),
    ("OK 200", []),
    (b"200 OK", []),
    ("200 OK", [("X-Bad", "line\r\nInjected: 1")]),
    ("200 OK", [("X:Bad", "v")]),
    ("200 OK", [["X-List", "v"]]),
    ("200 OK", [("X-Bytes", b"v")]),
])
def test_bad_status_or_headers_are_a_500(status: Any, headers: Any) -> None:
    r = run(simple_app(b"body", status=status, headers=headers))
    assert r.status_code == 500
    assert_well_formed(r.records)
    reply = r.reply
    assert reply.status == "500 Internal Server Error"
    assert b"Injected" not in reply.stdout
    assert r.logged


def test_str_body_is_a_500() -> None:
    def app(environ: Dict[str, Any], start_response: Callable) -> List[str]:
        start_response("200 OK", [])
        return ["text, not bytes"]

    r = run(app)
    assert r.reply.status.startswith("500")
    assert any("bytes" in msg + tb for msg, tb in r.logged)


def test_app_that_never_calls_start_response_is_a_500() -> None:
    r = run(lambda environ, start_response: [])
    assert r.reply.status.startswith("500")
    assert r.logged


def test_wsgi_errors_reach_stderr_records_and_the_log() -> None:
    def app(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
        environ["wsgi.errors"].write("first line\nsecond ")
        environ["wsgi.errors"].writelines(["line\n", "unterminated"])
        start_response("200 OK", [])
        return [b"ok"]

    r = run(app)
    assert_well_formed(r.records)
    reply = r.reply
    assert reply.body == b"ok"
    assert reply.stderr == b"first line\nsecond line\nunterminated\n"
    assert r.error_lines == ["first line", "second line", "unterminated"]
    stderr_records = [c for t, _, c in r.records if t == FCGI_STDERR]
    assert stderr_records[-1] == b"", "the STDERR stream must be ended"


def test_file_wrapper_streams_the_file_and_closes_it(tmp_path: Path) -> None:
    data = os.urandom(200_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    opened = []

    def app(environ: Dict[str, Any], start_response: Callable) -> Any:
        f = open(path, "rb")  # noqa: SIM115 - the wrapper closes it
        opened.append(f)
        start_response("200 OK", [("Content-Length", str(len(data)))])
        return environ["wsgi.file_wrapper"](f, 8192)

    r = run(app)
    assert_well_formed(r.records)
    assert r.reply.body == data
    assert opened[0].closed


def test_file_wrapper_iterates_in_blocks() -> None:
    wrapper = FileWrapper(io.BytesIO(b"abcdefghij"), 4)
    assert list(wrapper) == [b"abcd", b"efgh", b"ij"]
    wrapper.close()
    assert FileWrapper(iter([]), 4) is not None  # no close(): still a valid wrapper


# -- BodyBuffer -----------------------------------------------------------------------------


def test_body_buffer_stays_in_memory_under_the_limit() -> None:
    buf = BodyBuffer(limit=100)
    buf.append(b"a" * 40)
    buf.append(b"b" * 60)
    stream = buf.stream()
    assert isinstance(stream, io.BytesIO)
    assert stream.read() == b"a" * 40 + b"b" * 60
    assert buf.size == 100


def test_body_buffer_spills_to_a_file_past_the_limit() -> None:
    buf = BodyBuffer(limit=100)
    chunks = [os.urandom(60) for _ in range(5)]
    for chunk in chunks:
        buf.append(chunk)
    stream = buf.stream()
    assert not isinstance(stream, io.BytesIO)
    assert stream.fileno() >= 0  # a real (temporary) file
    assert stream.read() == b"".join(chunks)
    assert buf.size == 300
    stream.seek(0)
    assert stream.readline()  # the PEP 3333 input methods work on it
    stream.close()


def test_body_buffer_spills_at_once_when_content_length_is_large() -> None:
    buf = BodyBuffer(limit=10, expected=11)
    buf.append(b"x")
    assert not isinstance(buf.stream(), io.BytesIO)


def test_empty_body_reads_empty() -> None:
    assert BodyBuffer(limit=10).stream().read() == b""


# -- ErrorStream ----------------------------------------------------------------------------


def test_error_stream_is_line_buffered() -> None:
    lines: List[str] = []
    errors = ErrorStream(lines.append)
    errors.write("par")
    errors.write("tial")
    assert lines == []
    errors.write(" line\nnext")
    assert lines == ["partial line"]
    errors.flush()
    assert lines == ["partial line", "next"]
    assert errors.take_stderr() == b"partial line\nnext\n"
    assert errors.take_stderr() == b""


def test_error_stream_caps_what_goes_to_stderr_but_logs_everything() -> None:
    lines: List[str] = []
    errors = ErrorStream(lines.append)
    for i in range(1000):
        errors.write(f"line {i:04d} " + "x" * 40 + "\n")
    data = errors.take_stderr()
    assert len(lines) == 1000
    assert 0 < len(data) <= ErrorStream.STDERR_CAP
    assert data.startswith(b"line 0000 ")


def test_error_stream_rejects_bytes() -> None:
    with pytest.raises(TypeError):
        ErrorStream(lambda line: None).write(b"bytes")  # type: ignore[arg-type]


def test_error_stream_reset_forgets_the_request() -> None:
    errors = ErrorStream(lambda line: None)
    errors.write("left over")
    errors.reset()
    assert errors.take_stderr() == b""


# -- through a real worker ------------------------------------------------------------------


class WorkerProcess:
    """One :class:`fcgi_manager.worker.loop.Worker` forked from the test on a unix listener."""

    def __init__(self, tmp: Path, app: Callable, **options: Any) -> None:
        from fcgi_manager.scoreboard import Scoreboard, SlotWriter
        from fcgi_manager.worker.loop import Worker
        from fcgi_manager.worker.parts import WorkerParts

        self.address = f"unix:{tmp / 'w.sock'}"
        self.log_path = tmp / "worker.log"
        cfg = config_mod.from_options("tests:app", bind=self.address, **options)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp / "w.sock"))
        listener.listen(16)
        death_r, self.death_w = os.pipe()
        note_r, note_w = os.pipe()
        board = Scoreboard(1)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                from fcgi_manager import logs

                logs.setup_worker("info")
                os.close(self.death_w)
                os.close(note_r)
                worker = Worker(WorkerParts(app=app, config=cfg, listener=listener,
                                            slot=SlotWriter(board, 0), worker_id=1,
                                            master_fd=death_r, notify_fd=note_w,
                                            max_requests=0))
                code = worker.run()
            finally:
                os._exit(code)
        os.close(log_fd)
        os.close(death_r)
        os.close(note_w)
        listener.close()
        try:
            ready = os.read(note_r, 16)
        finally:
            os.close(note_r)
        if not ready.startswith(b"R"):
            self.stop()
            raise AssertionError(f"the worker did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, path: str = "/", method: str = "GET", body: bytes = b"",
                **params: str) -> FcgiReply:
        return fcgi_request(self.address, path, method, body, timeout=20, **params)

    def alive(self) -> bool:
        pid, _ = os.waitpid(self.pid, os.WNOHANG)
        if pid:
            self.pid = 0
        return self.pid != 0

    def stop(self) -> None:
        if self.death_w >= 0:
            os.close(self.death_w)  # EOF on the master pipe: the worker exits
            self.death_w = -1
        if not self.pid:
            return
        try:
            wait_for(lambda: not self.alive(), 10, "the worker to exit")
        except AssertionError:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0
            raise


def assert_validator_happy(w: WorkerProcess) -> None:
    log = w.log()
    assert "AssertionError" not in log and "WSGIWarning" not in log, log
    assert "without being closed" not in log, log


def echo_environ_app(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
    stream = environ["wsgi.input"]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    first = stream.readline()
    rest = stream.read(length - len(first))
    info = {k: v for k, v in environ.items() if isinstance(v, str)}
    info["body_first_line"] = first.decode("latin-1")
    info["body_rest"] = rest.decode("latin-1")
    environ["wsgi.errors"].write("validated request\n")
    environ["wsgi.errors"].flush()
    body = json.dumps(info).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def test_validator_get_through_a_worker(worker: Callable[..., WorkerProcess]) -> None:
    w = worker(wsgiref.validate.validator(echo_environ_app))
    reply = w.request("/some/path?x=1&y=2")
    assert reply.status == "200 OK", (reply, w.log())
    env = json.loads(reply.body)
    assert env["PATH_INFO"] == "/some/path" and env["QUERY_STRING"] == "x=1&y=2"
    assert env["SERVER_NAME"] == "localhost"
    assert reply.stderr == b"validated request\n"
    assert_validator_happy(w)


def test_validator_post_body_through_a_worker(worker: Callable[..., WorkerProcess]) -> None:
    w = worker(wsgiref.validate.validator(echo_environ_app), max_body_in_memory=64)
    body = b"first line\n" + b"z" * 5000  # past max_body_in_memory: read from a file
    reply = w.request("/post", "POST", body)
    assert reply.status == "200 OK", (reply, w.log())
    env = json.loads(reply.body)
    assert env["CONTENT_LENGTH"] == str(len(body))
    assert env["body_first_line"] == "first line\n" and env["body_rest"] == "z" * 5000
    assert_validator_happy(w)


def test_validator_write_and_close_through_a_worker(
        worker: Callable[..., WorkerProcess]) -> None:
    def app(environ: Dict[str, Any], start_response: Callable) -> Iterator[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")

        def body() -> Iterator[bytes]:
            yield b"yielded "
            yield b"x" * 100_000
        return body()

    w = worker(wsgiref.validate.validator(app))
    for _ in range(3):
        reply = w.request("/")
        assert reply.status == "200 OK", (reply, w.log())
        assert reply.body == b"written yielded " + b"x" * 100_000
        assert_well_formed(reply.records)
    assert_validator_happy(w)


def test_worker_survives_app_exceptions(worker: Callable[..., WorkerProcess]) -> None:
    def app(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
        if environ["PATH_INFO"] == "/boom":
            raise LookupError("exploded on purpose")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"fine"]

    w = worker(wsgiref.validate.validator(app))
    bad = w.request("/boom")
    assert bad.status.startswith("500") and bad.app_status == 0
    good = w.request("/ok")
    assert good.body == b"fine"
    assert w.alive()
    log = w.log()
    assert "LookupError: exploded on purpose" in log and "Traceback" in log


def test_keep_conn_serves_several_requests_on_one_connection(
        worker: Callable[..., WorkerProcess]) -> None:
    w = worker(wsgiref.validate.validator(simple_app(b"kept")))
    with connect_fcgi(w.address, 20) as sock:
        for rid in (1, 2, 3):
            sock.sendall(fcgi_request_bytes(cgi_params("/"), rid=rid, keep_conn=True))
            reply = FcgiReply(read_fcgi_records(sock, rid, 20))
            assert reply.body == b"kept" and reply.app_status == 0
    assert_validator_happy(w)


def _flask_app() -> Any:
    import flask  # noqa: F401 - a test dependency: missing is a failure, not a skip
    sys.path.insert(0, str(APPS))
    try:
        import flask_app
    finally:
        sys.path.remove(str(APPS))
    return flask_app.app


def test_flask_app_at_the_root(worker: Callable[..., WorkerProcess]) -> None:
    w = worker(wsgiref.validate.validator(_flask_app()))
    index = w.request("/")
    assert index.status == "200 OK", (index, w.log())
    data = json.loads(index.body)
    assert data == {"page": "index", "script_root": "", "path": "/", "link": "/user/ada"}
    user = json.loads(w.request("/user/bob").body)
    assert user["name"] == "bob" and user["url"] == "http://localhost/user/bob"
    assert w.request("/nope").status.startswith("404")
    assert_validator_happy(w)


def test_flask_app_under_a_sub_path(worker: Callable[..., WorkerProcess]) -> None:
    w = worker(wsgiref.validate.validator(_flask_app()))
    index = w.request("/app/", script_name="/app")
    assert index.status == "200 OK", (index, w.log())
    data = json.loads(index.body)
    assert data == {"page": "index", "script_root": "/app", "path": "/",
                    "link": "/app/user/ada"}
    user = json.loads(w.request("/app/user/bob", script_name="/app").body)
    assert user["url"] == "http://localhost/app/user/bob"
    assert_validator_happy(w)


def test_flask_app_with_forced_script_name(worker: Callable[..., WorkerProcess]) -> None:
    # The front end sends the whole path as PATH_INFO; app.script_name fixes it up.
    w = worker(_flask_app(), script_name="/app")
    data = json.loads(w.request("/app/").body)
    assert data["script_root"] == "/app" and data["link"] == "/app/user/ada"


def test_flask_post_form_and_error(worker: Callable[..., WorkerProcess]) -> None:
    w = worker(wsgiref.validate.validator(_flask_app()))
    form = b"a=1&b=two"
    reply = w.request("/upload", "POST", form,
                      CONTENT_TYPE="application/x-www-form-urlencoded")
    assert reply.status == "200 OK", (reply, w.log())
    assert json.loads(reply.body) == {"page": "upload", "length": len(form),
                                      "form": {"a": "1", "b": "two"}}
    boom = w.request("/boom")  # Flask turns the view's exception into its own 500
    assert boom.status.startswith("500") and boom.app_status == 0
    assert w.request("/").status == "200 OK"
    assert w.alive()
