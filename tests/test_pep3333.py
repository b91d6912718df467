"""PEP 3333 to the letter: every block sent as the app produces it (and a one-block response
still in one send), the environ for every request-target form a front end may pass, a
``wsgi.input`` that stops at CONTENT_LENGTH, headers held until the first non-empty block,
and the standard library's validator on every response path through a real worker."""

from __future__ import annotations

import io
import json
import socket
import sys
import time
import warnings
import wsgiref.validate
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
from support import (
    FCGI_STDOUT,
    FcgiReply,
    cgi_params,
    connect_fcgi,
    fcgi_request_bytes,
    read_fcgi_records,
)
from test_wsgi import WorkerProcess, assert_well_formed, parse_records, run

from fcgi_manager.worker.wsgi import (
    INTERNAL_ERROR_BODY,
    BodyBuffer,
    EnvironBuilder,
    ErrorStream,
    new_body,
    target_path,
)

# -- streaming: when each block leaves ------------------------------------------------------


def test_each_generated_block_is_sent_before_the_next_is_requested() -> None:
    sends_seen: List[int] = []
    sends: List[bytes] = []

    def app(environ: Dict[str, Any], start_response: Callable) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        for i in range(4):
            yield b"block %d;" % i
            sends_seen.append(len(sends))  # the generator resumes: block i must be out

    from fcgi_manager.worker.wsgi import run_app

    errors = ErrorStream(lambda line: None)
    environ = EnvironBuilder(errors).build(cgi_params("/"), io.BytesIO())
    run_app(app, environ, sends.append, 1, errors, lambda m, t: None)
    assert sends_seen == [1, 2, 3, 4]
    records = parse_records(b"".join(sends))
    assert_well_formed(records)
    first = parse_records(sends[0])
    assert first[0][2].startswith(b"Status: 200 OK\r\n") and first[0][2].endswith(b"block 0;")


def test_write_is_sent_before_it_returns() -> None:
    seen: List[bytes] = []
    sends: List[bytes] = []

    def app(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"early")
        seen.append(b"".join(sends))
        return [b" late"]

    from fcgi_manager.worker.wsgi import run_app

    errors = ErrorStream(lambda line: None)
    environ = EnvironBuilder(errors).build(cgi_params("/"), io.BytesIO())
    run_app(app, environ, sends.append, 1, errors, lambda m, t: None)
    assert seen and seen[0].endswith(b"early")
    assert FcgiReply(parse_records(b"".join(sends))).body == b"early late"


@pytest.mark.parametrize("body", [[b"one body"], (b"a", b"b", b"c"), [b"x" * 1000] * 10])
def test_a_list_is_coalesced_with_its_end_request_into_one_send(body: Any) -> None:
    def app(environ: Dict[str, Any], start_response: Callable) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return body

    r = run(app)
    assert len(r.sends) == 1, "every block was already there: one write"
    assert_well_formed(r.records)
    assert r.reply.body == b"".join(body)


def test_a_large_list_is_still_sent_64_kib_at_a_time() -> None:
    r = run(lambda e, s: (s("200 OK", [("Content-Type", "text/plain")]), [b"y" * 50000] * 8)[1])
    assert len(r.sends) > 2
    assert r.reply.body == b"y" * 400000


def test_headers_wait_for_the_first_non_empty_block() -> None:
    def app(environ: Dict[str, Any], start_response: Callable) -> Iterator[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"")  # nothing to send: the headers are not sent either
        try:
            raise RuntimeError("rendering failed")
        except RuntimeError:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain"),
                                                      ("Retry-After", "5")], sys.exc_info())
        yield b""
        yield b"try later"

    r = run(app)
    assert r.status_code == 503 and not r.logged
    assert r.reply.status == "503 Service Unavailable" and r.reply.header("Retry-After") == "5"
    assert r.reply.body == b"try later"


def test_an_error_after_only_empty_blocks_is_still_a_clean_500() -> None:
    def app(environ: Dict[str, Any], start_response: Callable) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b""
        raise ValueError("nothing was sent yet")

    r = run(app)
    assert r.reply.status.startswith("500") and r.reply.app_status == 0
    assert r.reply.body == INTERNAL_ERROR_BODY


def test_an_empty_iterable_sends_the_headers_with_end_request() -> None:
    r = run(lambda e, s: iter((s("204 No Content", []), ())[1]))
    assert_well_formed(r.records)
    assert r.reply.stdout == b"Status: 204 No Content\r\n\r\n"


# -- output validation ---------------------------------------


def _answers(status: str, headers: List[Tuple[str, str]]) -> Callable:
    def app(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
        start_response(status, headers)
        return [b"body"]
    return app


def _exits(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
    sys.exit(3)


def _exits_mid_body(environ: Dict[str, Any], start_response: Callable) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"partial"
    sys.exit(0)


BAD_OUTPUT = {
    "status with CRLF": _answers("200 OK\r\nSet-Cookie: session=forged", []),
    "status with LF": _answers("200 OK\nX: y", []),
    "status without reason space": _answers("200", []),
    "status out of range": _answers("099 Low", []),
    "CR in a header name": _answers("200 OK", [("X-Bad\r", "v")]),
    "space in a header name": _answers("200 OK", [("X Bad", "v")]),
    "CRLF in a value": _answers("200 OK", [("X-A", "v\r\nSet-Cookie: forged=1")]),
    "NUL in a value": _answers("200 OK", [("X-A", "v\x00")]),
    "value not latin-1": _answers("200 OK", [("X-Name", "Zoë € 5")]),
    "a Status header": _answers("200 OK", [("Status", "302 Found")]),
    "SystemExit": _exits,
}


@pytest.mark.parametrize("case", sorted(BAD_OUTPUT))
def test_bad_output_or_sys_exit_is_a_500_with_a_body(case: str) -> None:
    r = run(BAD_OUTPUT[case])
    assert r.status_code == 500
    assert_well_formed(r.records)
    reply = r.reply
    assert reply.status == "500 Internal Server Error" and reply.body == INTERNAL_ERROR_BODY
    assert b"forged" not in reply.stdout
    assert len(r.logged) == 1 and "Traceback" in r.logged[0][1]


def test_sys_exit_mid_body_cuts_the_response_short() -> None:
    r = run(_exits_mid_body)
    assert r.reply.body == b"partial" and r.reply.app_status == 1
    assert "SystemExit" in r.logged[0][0]


@pytest.mark.parametrize("name", ["Content-Type", "X-Custom_1", "x-lower", "A!#$%&'*+-.^_`|~9"])
def test_token_header_names_and_tab_in_values_are_accepted(name: str) -> None:
    r = run(_answers("299 Custom Reason", [(name, "a\tb: c; d=\"é\"")]))
    assert r.status_code == 299 and r.reply.header(name) == "a\tb: c; d=\"é\""


# -- environ ------------------------------------------------------------------------------


def build(params: Dict[str, str], **kwargs: Any) -> Dict[str, Any]:
    env = EnvironBuilder(ErrorStream(lambda line: None), **kwargs).build(params, io.BytesIO())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a WSGIWarning is a failure too
        wsgiref.validate.check_environ(env)
    return env


@pytest.mark.parametrize("target, path", [
    ("/a/b?x=1", "/a/b"),
    ("/a%20b?x=1", "/a%20b"),
    ("http://example.com/echo/abs?x=1", "/echo/abs"),
    ("https://user@example.com:8443/p?q", "/p"),
    ("http://example.com", "/"),
    ("http://example.com?only=query", "/"),
    ("*", ""),
    ("", ""),
])
def test_target_path_reads_every_request_target_form(target: str, path: str) -> None:
    assert target_path(target) == path


def _raw_client_params(uri: str, **extra: str) -> Dict[str, str]:
    """What a FastCGI client passing the request line through raw sends: REQUEST_URI as
    the client wrote it, nothing derived from it."""
    params = {"REQUEST_METHOD": "GET", "REQUEST_URI": uri, "SERVER_NAME": "localhost",
              "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1"}
    params.update(extra)
    return params


@pytest.mark.parametrize("uri, script, path, query", [
    ("http://example.com/echo/abs?x=1", None, "/echo/abs", "x=1"),
    ("http://example.com/echo/abs?x=1", "/echo/abs", "/echo/abs", "x=1"),
    ("https://example.com:8443/a%2Fb/c?y=%3F", None, "/a/b/c", "y=%3F"),
    ("/origin/form?z=2", None, "/origin/form", "z=2"),
    ("/origin/form?z=2", "/origin/form", "/origin/form", "z=2"),
    ("/q?a=/b?c", None, "/q", "a=/b?c"),
])
def test_absolute_and_origin_form_targets_route_at_the_root(
        uri: str, script: Any, path: str, query: str) -> None:
    extra = {"SCRIPT_NAME": script} if script is not None else {}
    env = build(_raw_client_params(uri, **extra))
    assert (env["SCRIPT_NAME"], env["PATH_INFO"], env["QUERY_STRING"]) == ("", path, query)
    assert env["REQUEST_URI"] == uri


def test_asterisk_form_is_an_empty_path() -> None:
    env = build(_raw_client_params("*", REQUEST_METHOD="OPTIONS"))
    assert (env["SCRIPT_NAME"], env["PATH_INFO"], env["QUERY_STRING"]) == ("", "", "")
    assert env["REQUEST_URI"] == "*"


def test_the_query_is_never_part_of_path_info() -> None:
    for uri in ("/p?x=1", "http://h/p?x=1", "/p?", "http://h?x"):
        env = build(_raw_client_params(uri))
        assert "?" not in env["PATH_INFO"] and "x" not in env["PATH_INFO"], uri


def test_a_minimal_front_end_still_gets_every_required_key() -> None:
    env = build({"REQUEST_URI": "/only?uri=1"})
    assert env["REQUEST_METHOD"] == "GET" and env["SERVER_PROTOCOL"] == "HTTP/1.0"
    assert env["GATEWAY_INTERFACE"] == "CGI/1.1"
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("localhost", "80")
    assert (env["PATH_INFO"], env["QUERY_STRING"]) == ("/only", "uri=1")
    for key in ("wsgi.version", "wsgi.input", "wsgi.errors", "wsgi.multithread",
                "wsgi.multiprocess", "wsgi.run_once", "wsgi.url_scheme"):
        assert key in env


@pytest.mark.parametrize("sent, name, port", [
    ({"SERVER_NAME": "example.com:8080"}, "example.com", "8080"),
    ({"SERVER_NAME": "example.com:8080", "SERVER_PORT": ""}, "example.com", "8080"),
    ({"SERVER_NAME": "[2001:db8::1]:8443"}, "2001:db8::1", "8443"),
    ({"SERVER_NAME": "::1"}, "::1", "80"),
    ({"SERVER_NAME": "", "HTTP_HOST": "h.example:81"}, "h.example", "81"),
    ({"SERVER_NAME": "a.example", "HTTP_HOST": "a.example:82"}, "a.example", "82"),
    ({"SERVER_NAME": "a.example", "SERVER_PORT": "x"}, "a.example", "80"),
    ({"SERVER_NAME": "a.example", "SERVER_PORT": "8000"}, "a.example", "8000"),
])
def test_server_name_and_port_are_sane_whatever_the_front_end_sends(
        sent: Dict[str, str], name: str, port: str) -> None:
    params = {"REQUEST_URI": "/", "REQUEST_METHOD": "GET"}
    params.update(sent)
    env = build(params)
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == (name, port)


@pytest.mark.parametrize("sent", [
    {"REQUEST_METHOD": "", "SERVER_PROTOCOL": ""},
    {"CONTENT_TYPE": "", "CONTENT_LENGTH": ""},
    {"CONTENT_LENGTH": "12abc"},
    {"CONTENT_LENGTH": "-5"},
    {"SCRIPT_NAME": "/", "PATH_INFO": "/x"},
    {"SCRIPT_NAME": "/app/", "PATH_INFO": "x"},
    {"SCRIPT_NAME": "app", "PATH_INFO": ""},
])
def test_odd_values_from_a_front_end_still_pass_the_validator(sent: Dict[str, str]) -> None:
    params = cgi_params("/app/x")
    params.update(sent)
    env = build(params)
    assert env["REQUEST_METHOD"] and env["SERVER_PROTOCOL"]
    assert env.get("CONTENT_TYPE", "x") and env.get("CONTENT_LENGTH", "1").isdigit()
    assert env["SCRIPT_NAME"] != "/"


# -- wsgi.input stops at CONTENT_LENGTH ----------------------------------------------------


@pytest.mark.parametrize("in_memory", [1 << 20, 16])
def test_input_never_reads_past_content_length(in_memory: int) -> None:
    body = new_body({"CONTENT_LENGTH": "10"}, in_memory)
    for chunk in (b"0123", b"456789ABC", b"DEFGHIJKLMNOP"):
        body.append(chunk)
    assert body.stream().read() == b"0123456789"
    assert body.size == 26 and not body.too_large


def test_input_without_content_length_is_the_whole_body() -> None:
    body = new_body({"CONTENT_LENGTH": ""}, 1 << 20)
    body.append(b"chunked ")
    body.append(b"upload")
    assert body.stream().read() == b"chunked upload"


@pytest.mark.parametrize("params, chunks, too_large", [
    ({"CONTENT_LENGTH": "101"}, [], True),          # announced over the limit
    ({"CONTENT_LENGTH": "100"}, [b"x" * 100], False),
    ({}, [b"x" * 60, b"x" * 41], True),             # no length, brings too much
    ({"CONTENT_LENGTH": "10"}, [b"x" * 200], True),  # lies about its length
])
def test_max_body(params: Dict[str, str], chunks: List[bytes], too_large: bool) -> None:
    body = new_body(params, 16, max_body=100)
    for chunk in chunks:
        body.append(chunk)
    assert body.too_large is too_large
    if too_large:
        assert body.stream().read() == b"", "nothing of a refused body is kept"


def test_body_buffer_keeps_its_old_interface() -> None:
    body = BodyBuffer(8, 0)
    body.append(b"abcdefghij")
    assert body.stream().read() == b"abcdefghij"


# -- through a real worker ------------------------------------------------------------------


def _routes(tmp: Path) -> Callable:
    """An app with one route per response path a WSGI server has."""
    data = tmp / "file.bin"
    data.write_bytes(bytes(range(256)) * 600)
    text = [("Content-Type", "text/plain")]

    def app(environ: Dict[str, Any], start_response: Callable) -> Any:
        path = environ["PATH_INFO"]
        if path == "/plain":
            start_response("200 OK", text)
            return [b"plain"]
        if path == "/write":
            write = start_response("200 OK", text)
            write(b"written ")
            write(b"")
            return [b"and returned"]
        if path == "/close":
            class Body:
                def __iter__(self) -> Iterator[bytes]:
                    yield b"iterated "
                    yield b"with close"

                def close(self) -> None:
                    environ["wsgi.errors"].write("closed\n")
            start_response("200 OK", text)
            return Body()
        if path == "/file":
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            return environ["wsgi.file_wrapper"](open(data, "rb"), 8192)
        if path == "/exc-info":
            write = start_response("200 OK", text)
            write(b"")
            try:
                raise KeyError("replaced")
            except KeyError:
                start_response("500 Internal Server Error", text, sys.exc_info())
            return [b"replaced by the app"]
        if path == "/error":
            raise RuntimeError("before start_response")
        if path == "/error-mid":
            def failing() -> Iterator[bytes]:
                yield b"half"
                raise RuntimeError("mid body")
            start_response("200 OK", text)
            return failing()
        if path == "/empty":
            start_response("204 No Content", [])
            return []
        if path == "/input":
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            start_response("200 OK", text)
            return [b"%d:" % len(body), body]
        start_response("404 Not Found", text)
        return [b"no such route"]

    return app


EXPECTED = {
    "/plain": ("200 OK", b"plain", 0),
    "/write": ("200 OK", b"written and returned", 0),
    "/close": ("200 OK", b"iterated with close", 0),
    "/file": ("200 OK", bytes(range(256)) * 600, 0),
    "/exc-info": ("500 Internal Server Error", b"replaced by the app", 0),
    "/error": ("500 Internal Server Error", INTERNAL_ERROR_BODY, 0),
    "/error-mid": ("200 OK", b"half", 1),
    "/empty": ("204 No Content", b"", 0),
    "/missing": ("404 Not Found", b"no such route", 0),
}


def _validator_failures(log: str) -> List[str]:
    """Lines of the worker's log that show wsgiref.validate objecting: its checks raise
    AssertionError (logged with the traceback) or warn with WSGIWarning."""
    return [line for line in log.splitlines() if "AssertionError" in line
            or "WSGIWarning" in line or "without being closed" in line]


def test_validator_passes_every_response_path(
        worker: Callable[..., WorkerProcess], tmp_path: Path) -> None:
    w = worker(wsgiref.validate.validator(_routes(tmp_path)))
    for path, (status, body, app_status) in EXPECTED.items():
        reply = w.request(path)
        assert (reply.status, reply.body, reply.app_status) == (status, body, app_status), \
            (path, reply, w.log())
        assert_well_formed(reply.records)
    reply = w.request("/input", "POST", b"posted")
    assert reply.body == b"6:posted"
    log = w.log()
    assert not _validator_failures(log), log
    assert log.count("closed") >= 1 and "RuntimeError: mid body" in log
    assert w.alive()


def _timed_records(sock: socket.socket, deadline_s: float = 20.0) -> List[Tuple[float, int, bytes]]:
    """(arrival time, type, content) of each record until END_REQUEST."""
    sock.settimeout(deadline_s)
    buf = b""
    out: List[Tuple[float, int, bytes]] = []
    while True:
        data = sock.recv(65536)
        now = time.monotonic()
        if not data:
            return out
        buf += data
        while len(buf) >= 8 and len(buf) >= 8 + int.from_bytes(buf[4:6], "big") + buf[6]:
            clen, plen = int.from_bytes(buf[4:6], "big"), buf[6]
            out.append((now, buf[1], buf[8:8 + clen]))
            buf = buf[8 + clen + plen:]
            if out[-1][1] == 3:
                return out


def _ticker(environ: Dict[str, Any], start_response: Callable) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "text/event-stream")])
    for i in range(5):
        if i:
            time.sleep(0.5)
        yield b"data: tick %d\n\n" % i


def test_chunks_reach_a_raw_client_as_they_are_yielded(
        worker: Callable[..., WorkerProcess]) -> None:
    w = worker(_ticker)
    with connect_fcgi(w.address, 20) as sock:
        started = time.monotonic()
        sock.sendall(fcgi_request_bytes(cgi_params("/events")))
        records = _timed_records(sock)
    arrivals = [t for t, rtype, content in records if rtype == FCGI_STDOUT and b"tick" in content]
    assert len(arrivals) == 5, records
    assert arrivals[0] - started < 0.4, "the first event was held back"
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert all(0.4 <= gap <= 0.6 for gap in gaps), gaps


def _describe_environ(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
    seen = {k: v for k, v in environ.items() if isinstance(v, str)}
    # read(n) with a size larger than CONTENT_LENGTH: wsgi.input must stop there.
    seen["body"] = environ["wsgi.input"].read(1 << 20).decode("latin-1")
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(seen).encode()]


def _raw_request(w: WorkerProcess, params: Dict[str, str], body: bytes = b"") -> FcgiReply:
    with connect_fcgi(w.address, 20) as sock:
        sock.sendall(fcgi_request_bytes(params, body))
        return FcgiReply(read_fcgi_records(sock, 1, 20))


def test_absolute_and_asterisk_form_through_a_worker(
        worker: Callable[..., WorkerProcess]) -> None:
    w = worker(wsgiref.validate.validator(_describe_environ))
    absolute = _raw_request(w, _raw_client_params("http://example.com/echo/abs?x=1",
                                                  SCRIPT_NAME="/echo/abs"))
    env = json.loads(absolute.body)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"], env["QUERY_STRING"]) == ("", "/echo/abs", "x=1")
    star = _raw_request(w, _raw_client_params("*", REQUEST_METHOD="OPTIONS"))
    env = json.loads(star.body)
    assert (env["REQUEST_METHOD"], env["PATH_INFO"], env["REQUEST_URI"]) == ("OPTIONS", "", "*")
    assert not _validator_failures(w.log()), w.log()


def test_a_body_past_content_length_is_not_read_and_the_connection_stays_usable(
        worker: Callable[..., WorkerProcess]) -> None:
    w = worker(wsgiref.validate.validator(_describe_environ))
    params = cgi_params("/", "POST", CONTENT_LENGTH="5", CONTENT_TYPE="text/plain")
    with connect_fcgi(w.address, 20) as sock:
        sock.sendall(fcgi_request_bytes(params, b"12345 and more the app must not see",
                                        keep_conn=True))
        env = json.loads(FcgiReply(read_fcgi_records(sock, 1, 20)).body)
        assert (env["body"], env["CONTENT_LENGTH"]) == ("12345", "5")
        sock.sendall(fcgi_request_bytes(cgi_params("/next"), rid=2, keep_conn=True))
        env = json.loads(FcgiReply(read_fcgi_records(sock, 2, 20)).body)
        assert env["PATH_INFO"] == "/next" and env["body"] == ""
    assert not _validator_failures(w.log()), w.log()


# -- through nginx with fastcgi_buffering off ---------------------------------------------

TICKER = '''
import time


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    for i in range(5):
        if i:
            time.sleep(0.5)
        yield b"tick %d\\n" % i
'''

UNBUFFERED = """
        location /stream {
            include /etc/nginx/fastcgi_params;
            fastcgi_param PATH_INFO $fastcgi_script_name;
            fastcgi_param SCRIPT_NAME "";
            fastcgi_buffering off;
            fastcgi_pass fcgi_backend;
        }
"""


def _http_arrivals(port: int, path: str, marker: bytes) -> Tuple[float, List[float]]:
    """When each ``marker`` of the response reached the client, from the request's start."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                     .encode())
        started = time.monotonic()
        seen = b""
        arrivals: List[float] = []
        while True:
            data = sock.recv(65536)
            if not data:
                return started, arrivals
            seen += data
            now = time.monotonic() - started
            arrivals += [now] * (seen.count(marker) - len(arrivals))


def test_chunks_reach_an_http_client_through_nginx_as_they_are_yielded(
        make_manager: Callable[..., Any], make_nginx: Callable[..., Any],
        tmp_path: Path) -> None:
    (tmp_path / "ticker_app.py").write_text(TICKER)
    manager = make_manager("ticker_app:app", path=[str(tmp_path)], count=1)
    manager.start()
    nginx = make_nginx(f"unix:{manager.socket_path}", extra_locations=UNBUFFERED)
    _, arrivals = _http_arrivals(nginx.port, "/stream", b"tick ")
    assert len(arrivals) == 5, (arrivals, nginx.error_log())
    assert arrivals[0] < 0.4, f"the first chunk was held back: {arrivals}"
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert all(0.4 <= gap <= 0.6 for gap in gaps), gaps


def test_the_block_that_completes_content_length_leaves_with_end_request() -> None:
    # Flask and Django return generators with a Content-Length. A client that has the
    # whole body closes at once; if END_REQUEST came in a later write, nginx would drop
    # the FastCGI connection first (no keep-conn reuse, a "client abort" logged).
    def app(environ: Dict[str, Any], start_response: Callable) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "10")])
        yield b"01234"
        yield b"56789"

    r = run(app)
    assert len(r.sends) == 2, "the first block at once, the last with END_REQUEST"
    assert parse_records(r.sends[0])[0][2].endswith(b"01234")
    last = parse_records(r.sends[1])
    assert last[0][2] == b"56789" and last[-1][0] == 3
    assert_well_formed(r.records)


def test_a_flask_response_is_one_send() -> None:
    import flask

    app = flask.Flask("one_send")
    app.add_url_rule("/", "index", lambda: "hello")
    r = run(app.wsgi_app)
    assert r.reply.body == b"hello" and len(r.sends) == 1
