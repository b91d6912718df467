"""The compiled request core and the pure one are the same program: for any input, the
same records, events, params, environ and response bytes, and the same errors; and for
any conversation on a connection, the same answers from the worker's connection table and
responder (what it reads, answers itself, hands to the app, keeps or closes).

Both run in this process: the compiled modules as imported, the pure ones loaded from
their source under private names (``compiled.load_pure``). Skipped where the compiled
core is not built or not in use (``FCGI_MANAGER_PURE=1``): CI builds it.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import describe_event

from fcgi_manager import compiled
from fcgi_manager.config import Config, StatusConfig, WorkersConfig
from fcgi_manager.wire import protocol as cp
from fcgi_manager.worker import connection as cc
from fcgi_manager.worker import conntable as ct
from fcgi_manager.worker import responder as cr
from fcgi_manager.worker import wsgi as cw

if compiled.core() != "compiled":
    if os.environ.get("CI") == "true" and not os.environ.get("FCGI_MANAGER_PURE"):
        pytest.fail(f"CI=true builds the compiled core, but it does not run here "
                    f"({compiled.reason()})", pytrace=False)
    pytest.skip(f"the compiled core does not run here ({compiled.reason()})",
                allow_module_level=True)

PURE = compiled.load_pure()
pp = PURE["protocol"]
pw = PURE["wsgi"]
pc = PURE["connection"]
pr = PURE["responder"]
pt = PURE["conntable"]

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

LATIN1 = st.characters(min_codepoint=0, max_codepoint=255)
texts = st.one_of(st.text(LATIN1, max_size=40),
                  st.builds(lambda s, n: s * n, st.text(LATIN1, min_size=1, max_size=4),
                            st.integers(30, 400)))
param_dicts = st.dictionaries(st.text(LATIN1, min_size=1, max_size=30), texts, max_size=30)
cuts = st.lists(st.integers(min_value=0, max_value=1 << 18), max_size=12)


def test_the_two_cores_are_different_modules() -> None:
    for module in (cp, cw, cc, cr, ct):
        assert not (module.__file__ or "").endswith(".py")
    for module in PURE.values():
        assert (module.__file__ or "").endswith(".py")
    # Each pure module runs on the pure ones before it, never on a compiled one.
    assert pw.protocol is pp
    assert pc.protocol is pp and pc.ClientGone is pw.ClientGone
    assert pr.Conn is pc.Conn and pr.run_app is pw.run_app
    assert pt.Conn is pc.Conn and pt.peer_name is pr.peer_name
    assert cr.Conn is cc.Conn and ct.Conn is cc.Conn


def _split(data: bytes, points: List[int]) -> List[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(marks, marks[1:])]


def _events(module: Any, chunks: List[bytes], **limits: int) -> List[Any]:
    """Everything a ServerConnection makes of ``chunks``; an error ends the list."""
    conn = module.ServerConnection(**limits)
    out: List[Any] = []
    try:
        for chunk in chunks:
            for ev in conn.feed(chunk):
                desc = describe_event(ev)
                out.append(tuple(bytes(v) if isinstance(v, memoryview) else v for v in desc))
                if type(ev).__name__ == "StdinEnd":
                    conn.request_done()
    except Exception as exc:  # the error is part of the behaviour compared
        out.append(("raised", type(exc).__name__, str(exc)))
    return out


@SETTINGS
@given(params=param_dicts, body=st.binary(max_size=70000), keep=st.booleans(),
       rid=st.integers(1, 0xFFFF), points=cuts)
def test_same_records_and_events_for_any_request(params: Dict[str, str], body: bytes,
                                                 keep: bool, rid: int,
                                                 points: List[int]) -> None:
    raw = pp.encode_request(params, body, rid, keep)
    assert cp.encode_request(params, body, rid, keep) == raw
    chunks = _split(raw, points)
    assert _events(cp, chunks) == _events(pp, chunks)
    assert cp.decode_pairs(pp.encode_pairs(params.items())) == params


@SETTINGS
@given(data=st.binary(max_size=600), points=cuts, max_params=st.integers(0, 300),
       max_buffer=st.integers(0, 300))
def test_same_events_or_errors_for_any_bytes(data: bytes, points: List[int], max_params: int,
                                             max_buffer: int) -> None:
    chunks = _split(data, points)
    assert _events(cp, chunks) == _events(pp, chunks)
    limits = {"max_params": max_params, "max_buffer": max_buffer}
    assert _events(cp, chunks, **limits) == _events(pp, chunks, **limits)


def _decoded(module: Any, data: bytes) -> Any:
    try:
        return module.decode_pairs(data)
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


@SETTINGS
@given(data=st.binary(max_size=300))
def test_same_params_or_error_for_any_pair_stream(data: bytes) -> None:
    assert _decoded(cp, data) == _decoded(pp, data)
    assert _decoded(cp, bytearray(data)) == _decoded(pp, bytearray(data))


# -- environ ------------------------------------------------------------------------------

PATHISH = st.text(st.sampled_from("/ab?%2F:*.x"), max_size=12)
HOSTISH = st.text(st.sampled_from("ab.[]:19"), max_size=10)
ENVIRON_KEYS: Dict[str, Any] = {
    "REQUEST_METHOD": st.sampled_from(["GET", "POST", ""]),
    "SERVER_PROTOCOL": st.sampled_from(["HTTP/1.1", ""]),
    "REQUEST_URI": st.one_of(PATHISH, st.sampled_from(["*", "http://h:8/p?q", "https://h"])),
    "DOCUMENT_URI": PATHISH,
    "SCRIPT_NAME": PATHISH,
    "PATH_INFO": PATHISH,
    "QUERY_STRING": st.text(max_size=5),
    "SERVER_NAME": HOSTISH,
    "SERVER_PORT": st.sampled_from(["80", "8080", "", "x1"]),
    "HTTP_HOST": HOSTISH,
    "HTTPS": st.sampled_from(["on", "1", "off", ""]),
    "REQUEST_SCHEME": st.sampled_from(["http", "https"]),
    "CONTENT_LENGTH": st.sampled_from(["", "12", "x", "٣"]),
    "CONTENT_TYPE": st.sampled_from(["", "text/plain"]),
}
environ_params = st.fixed_dictionaries({}, optional=ENVIRON_KEYS)


def _environ(module: Any, params: Dict[str, str], script_name: Optional[str],
             fix_root_url: bool) -> Any:
    errors = module.ErrorStream(lambda line: None)
    builder = module.EnvironBuilder(errors, True, script_name, fix_root_url)
    try:
        env = builder.build(dict(params), None)
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))
    # The objects the environ carries are each core's own; compare their kind only.
    return {k: (type(v).__name__ if k in ("wsgi.errors", "wsgi.file_wrapper") else v)
            for k, v in env.items()}


@SETTINGS
@given(params=environ_params, script_name=st.one_of(st.none(), PATHISH),
       fix_root_url=st.booleans())
def test_same_environ_for_any_params(params: Dict[str, str], script_name: Optional[str],
                                     fix_root_url: bool) -> None:
    assert _environ(cw, params, script_name, fix_root_url) == \
        _environ(pw, params, script_name, fix_root_url)
    assert cw.request_path(params) == pw.request_path(params)
    assert cw.content_length(params) == pw.content_length(params)


# -- the response -------------------------------------------------------------------------

statuses = st.one_of(st.sampled_from(["200 OK", "404 Not Found", "500 Oops", "200", "099 X",
                                      "200 \r\nX: y", "200 Caf\u00e9", "200 \u20ac"]),
                     st.binary(max_size=3), st.none())
header_names = st.one_of(st.sampled_from(["Content-Type", "X-A", "Status", "Bad Name", "É"]),
                         st.integers(0, 3))
header_values = st.one_of(st.sampled_from(["text/plain", "a\tb", "x\ny", "\u20ac", ""]),
                          st.binary(max_size=2))
header_lists = st.one_of(st.lists(st.tuples(header_names, header_values), max_size=4),
                         st.lists(st.tuples(header_names, header_values), max_size=3).map(tuple),
                         st.sampled_from([None, "x", [("A",)], [["A", "b"]]]))
blocks = st.lists(st.one_of(st.binary(max_size=40), st.binary(min_size=70000, max_size=70001),
                            st.sampled_from(["text", 3, None])), max_size=4)


def _make_app(status: Any, headers: Any, body: List[Any], shape: str,
              raise_at: Optional[int]) -> Callable[..., Any]:
    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        write = start_response(status, headers)
        if shape == "write":
            for i, block in enumerate(body):
                if raise_at == i:
                    raise RuntimeError("boom")
                write(block)
            return []
        if shape == "list":
            if raise_at is not None:
                raise RuntimeError("boom")
            return list(body)

        def gen() -> Any:
            for i, block in enumerate(body):
                if raise_at == i:
                    raise RuntimeError("boom")
                yield block
        return gen()
    return app


def _respond(module: Any, app: Callable[..., Any], rid: int) -> Tuple[Any, ...]:
    sent: List[bytes] = []
    logged: List[str] = []
    errors = module.ErrorStream(lambda line: None)
    environ = module.EnvironBuilder(errors).build({"REQUEST_URI": "/x"}, None)
    code = module.run_app(app, environ, sent.append, rid, errors,
                          lambda summary, text: logged.append(summary))
    return code, b"".join(sent), logged


@SETTINGS
@given(status=statuses, headers=header_lists, body=blocks,
       shape=st.sampled_from(["list", "gen", "write"]),
       raise_at=st.one_of(st.none(), st.integers(0, 3)), rid=st.integers(1, 3))
def test_same_response_bytes_for_any_app(status: Any, headers: Any, body: List[Any],
                                         shape: str, raise_at: Optional[int],
                                         rid: int) -> None:
    app = _make_app(status, headers, body, shape, raise_at)
    assert _respond(cw, app, rid) == _respond(pw, app, rid)


# -- a connection through the worker's table and responder ---------------------------------

class _Slot:
    """The scoreboard slot, as a record of what the request path told it."""

    def __init__(self, trace: List[Any]) -> None:
        self.trace = trace

    def busy(self, method: str, uri: str) -> None:
        self.trace.append(("busy", method, uri))

    def idle(self) -> None:
        self.trace.append("idle")

    def draining(self) -> bool:
        return False

    def count_shed(self) -> None:
        self.trace.append("shed")


def _converse(cores: Tuple[Any, Any, Any], parts: List[bytes], app: Callable[..., Any],
              workers: Dict[str, Any], status: Dict[str, Any],
              family: str = "unix") -> Tuple[Any, ...]:
    """``parts`` sent one after the other on one connection (unix or TCP) to a
    :class:`ConnTable` and :class:`Responder` of one core, served as the single-thread loop
    serves them; what the client received, and what the request path did."""
    table_mod, responder_mod, wsgi = cores
    config = Config(workers=WorkersConfig(**workers), status=StatusConfig(**status))
    trace: List[Any] = []
    slot = _Slot(trace)
    with tempfile.TemporaryDirectory(prefix="fcgi-eq-") as tmp:
        if family == "unix":
            kind, address = socket.AF_UNIX, os.path.join(tmp, "s")
        else:
            kind, address = socket.AF_INET, ("127.0.0.1", 0)
        listener = socket.socket(kind, socket.SOCK_STREAM)
        listener.bind(address)
        listener.listen(4)
        address = listener.getsockname()
        # Loopback TCP delivers within the send, as a unix socket does; the wait is slack.
        wait = 0.0 if family == "unix" else 0.01
        table = table_mod.ConnTable(config, listener, None, lambda: False, lambda: None)
        responder = responder_mod.Responder(
            app, config, slot, lambda query: ("200 OK", f"status {query}".encode(),
                                              "text/plain"))
        errors = wsgi.ErrorStream(lambda line: None)
        lane = responder_mod.Lane(slot, errors, wsgi.EnvironBuilder(errors))
        need_more, need_close = responder_mod.Need.MORE, responder_mod.Need.CLOSE
        keep = responder_mod.Result.KEEP

        def readable(conn: Any) -> None:
            events = table.read(conn)
            if events is None:
                trace.append("parked" if conn.fd in table.conns else "closed")
                return
            while True:
                need = responder.receive(conn, events)
                trace.append(need.name)
                if need is need_more:
                    table.park(conn)
                    return
                if need is need_close:
                    table.close(conn)
                    return
                result = responder.respond(conn, lane)
                trace.append(result.name)
                if result is not keep or not conn.parser.keep_conn:
                    table.close(conn)
                    return
                conn.last_used = 1.0
                if not conn.pending:
                    table.park(conn)
                    return
                events, conn.pending = conn.pending, []

        def serve() -> None:
            while True:
                ready = [table.conns[fd] for fd, _ in table.epoll.poll(wait)
                         if fd in table.conns]
                if not ready:
                    return
                for conn in ready:
                    readable(conn)

        table.on_readable = readable
        client = socket.socket(kind, socket.SOCK_STREAM)
        received = b""
        try:
            table.open()
            client.connect(address)
            table.accept()
            for part in parts:
                try:
                    client.sendall(part)
                except OSError as exc:
                    trace.append(("send failed", type(exc).__name__))
                    break
                serve()
            client.shutdown(socket.SHUT_WR)
            serve()
            while True:
                chunk = client.recv(1 << 20)
                if not chunk:
                    break
                received += chunk
        except OSError as exc:
            trace.append(("client", type(exc).__name__))
        finally:
            client.close()
            for conn in list(table.conns.values()):
                table.close(conn)
            table.epoll.close()
            listener.close()
    return received, trace


def _request_app(shape: str, blocks: List[bytes], raise_at: Optional[int]) -> Callable[..., Any]:
    """An app that reads its body and answers with what it saw, then ``blocks``."""
    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        body = environ["wsgi.input"].read()
        seen = (f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']} {len(body)} "
                f"{sum(body) & 0xFFFF}\n").encode()
        return _make_app("200 OK", [("Content-Type", "text/plain")], [seen, *blocks], shape,
                         None if raise_at is None else raise_at + 1)(environ, start_response)
    return app


PATHS = st.sampled_from(["/", "/app/x", "/ping", "/status", "/%70ing", "ping", ""])
requests = st.lists(st.tuples(
    st.fixed_dictionaries({"REQUEST_METHOD": st.sampled_from(["GET", "POST"]),
                           "DOCUMENT_URI": PATHS},
                          optional={"REQUEST_URI": PATHS,
                                    "CONTENT_LENGTH": st.sampled_from(["0", "10", "x"]),
                                    "QUERY_STRING": st.sampled_from(["", "a=1"]),
                                    "HTTP_X_REQUEST_START": st.sampled_from(
                                        ["t=1", "t=99999999999", "x"])}),
    st.binary(max_size=3000),
    st.sampled_from(["plain", "abort_before", "abort_after", "values", "unknown",
                     "authorizer"])), min_size=1, max_size=3)


def _wire(reqs: List[Tuple[Dict[str, str], bytes, str]], keep_last: bool,
          tail: bytes) -> List[bytes]:
    """The requests on one connection (ids 1, 2, ...), each sent once the one before it is
    answered, as a web server does, with management records, aborts and other roles
    between them; ``tail`` last."""
    out = []
    for i, (params, body, extra) in enumerate(reqs):
        rid = i + 1
        keep = keep_last or i + 1 < len(reqs)
        part = b""
        if extra == "values":
            part = pp.encode_record(pp.GET_VALUES, 0, pp.encode_pairs(
                [("FCGI_MAX_CONNS", ""), ("FCGI_MPXS_CONNS", ""), ("X", "")]))
        elif extra == "unknown":
            part = pp.encode_record(99, 0, b"")
        elif extra == "authorizer":
            part = pp.encode_begin_request(rid + 100, pp.AUTHORIZER, True)
        request = pp.encode_request(params, body, rid, keep)
        if extra == "abort_before":
            begin = pp.HEADER_LEN * 2
            request = request[:begin] + pp.encode_record(pp.ABORT_REQUEST, rid) + \
                request[begin:]
        part += request
        if extra == "abort_after":
            part += pp.encode_record(pp.ABORT_REQUEST, rid)
        out.append(part)
    out.append(tail)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=requests, keep_last=st.booleans(),
       tail=st.one_of(st.just(b""), st.binary(max_size=40)), cut=st.integers(0, 1 << 16),
       shape=st.sampled_from(["list", "gen", "write"]),
       blocks=st.lists(st.binary(max_size=300), max_size=3),
       raise_at=st.one_of(st.none(), st.integers(0, 3)),
       max_body=st.sampled_from([0, 100]), in_memory=st.sampled_from([0, 1 << 20]),
       queue_timeout=st.sampled_from([0.0, 5.0]), special=st.booleans(),
       family=st.sampled_from(["unix", "tcp"]))
def test_same_conversation_through_table_and_responder(
        reqs: List[Tuple[Dict[str, str], bytes, str]], keep_last: bool, tail: bytes, cut: int,
        shape: str, blocks: List[bytes], raise_at: Optional[int], max_body: int,
        in_memory: int, queue_timeout: float, special: bool, family: str) -> None:
    parts = _wire(reqs, keep_last, tail)
    point = cut % (len(parts[0]) + 1)  # the first request comes in two reads
    parts[:1] = [parts[0][:point], parts[0][point:]]
    app = _request_app(shape, blocks, raise_at)
    workers = {"max_body": max_body, "max_body_in_memory": in_memory,
               "queue_timeout": queue_timeout}
    status = {"path": "/status", "ping_path": "/ping"} if special else {}
    compiled_run = _converse((ct, cr, cw), parts, app, workers, status, family)
    pure_run = _converse((pt, pr, pw), parts, app, workers, status, family)
    assert compiled_run == pure_run
    assert compiled_run[1]  # something was served or refused: the harness reached the core
