"""Every limit of a worker holds against a client that tries to break it (SPEC, Security
model: every write bounded, WSGI output validated, limits), through a real forked worker:

* a flood of records that need a reply, from a client that never reads, neither pins the
  worker nor keeps its connection;
* bad status lines and headers, non-latin-1 values and ``sys.exit()`` are a 500 with a
  body, and the worker lives;
* a body past ``workers.max_body`` is a 413 and the app is never called;
* at most 128 unfinished connections per worker, the oldest closed first;
* ``max_idle_connections`` holds when connections become idle, not only when first seen.
"""

from __future__ import annotations

import os
import resource
import socket
import struct
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest
from support import (
    FCGI_ABORT,
    FCGI_BEGIN,
    FCGI_END,
    FCGI_GET_VALUES,
    FCGI_PARAMS,
    FCGI_STDOUT,
    FcgiReply,
    cgi_params,
    connect_fcgi,
    fcgi_pairs,
    fcgi_record,
    fcgi_request,
    fcgi_request_bytes,
    read_fcgi_records,
    wait_for,
)
from test_wsgi import WorkerProcess

from fcgi_manager.worker.wsgi import INTERNAL_ERROR_BODY


def hello(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def closed_by_peer(sock: socket.socket) -> bool:
    """Has the worker closed ``sock``? (EOF or reset after whatever it sent is read.)"""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return True
    except BlockingIOError:
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True


# -- replies to a client that never reads ------------------------------------------


def _get_values(n: int) -> bytes:
    one = fcgi_record(FCGI_GET_VALUES, 0, fcgi_pairs({"FCGI_MAX_CONNS": "", "FCGI_MPXS_CONNS": ""}))
    return one * n


def _unknown_types(n: int) -> bytes:
    return fcgi_record(20, 0, b"\0" * 8) * n


def _refused_roles(n: int) -> bytes:
    begin = struct.pack("!HB5x", 2, 0)  # AUTHORIZER: refused with END_REQUEST
    return b"".join(fcgi_record(FCGI_BEGIN, 1 + i % 60000, begin) for i in range(n))


def _aborted_requests(n: int) -> bytes:
    begin = struct.pack("!HB5x", 1, 1)
    return b"".join(fcgi_record(FCGI_BEGIN, 1 + i % 60000, begin) + fcgi_record(2, 1 + i % 60000)
                    for i in range(n // 2))


@pytest.mark.parametrize("flood", [_get_values, _unknown_types, _refused_roles,
                                   _aborted_requests])
def test_a_reply_flood_that_is_never_read_does_not_pin_the_worker(
        worker: Callable[..., WorkerProcess], flood: Callable[[int], bytes]) -> None:
    w = worker(hello, write_timeout=5)
    data = flood(40000)  # ~1 MB of records, replies far past a unix socket's buffer
    flooder = connect_fcgi(w.address, 30)
    sender_done = threading.Event()

    def send_all() -> None:
        try:
            flooder.sendall(data)
        except OSError:
            pass  # closed by the worker: what should happen
        sender_done.set()

    thread = threading.Thread(target=send_all, daemon=True)
    thread.start()
    try:
        # The worker keeps serving others while the flooder never reads a byte.
        for _ in range(3):
            assert w.request("/").body == b"hello"
        wait_for(sender_done.is_set, 20, "the worker to stop reading the flood")
        wait_for(lambda: closed_by_peer(flooder), 20, "the flooding connection to be closed")
    finally:
        flooder.close()
        thread.join(5)
    assert "records to answer without a request" in w.log()
    assert w.request("/").body == b"hello" and w.alive()


def test_the_records_of_a_request_aborted_before_its_app_are_ignored(
        worker: Callable[..., WorkerProcess]) -> None:
    """ABORT_REQUEST, then the aborted request's PARAMS and STDIN in the same read: the
    request ends (END_REQUEST for it) and the rest of it is dropped -- no app call, no
    response under request id 0 -- and the next request on the connection is served."""
    def answers(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"served " + environ["PATH_INFO"].encode()]

    w = worker(answers)
    begin = struct.pack("!HB5x", 1, 1)  # RESPONDER, keep the connection
    aborted = fcgi_request_bytes(cgi_params("/aborted"), rid=1, keep_conn=True)
    head = len(fcgi_record(FCGI_BEGIN, 1, begin))
    sock = connect_fcgi(w.address, 30)
    try:
        sock.sendall(aborted[:head] + fcgi_record(FCGI_ABORT, 1) + aborted[head:])
        first = read_fcgi_records(sock, rid=1)  # the empty STDOUT that ends the stream
        assert [(t, r, c) for t, r, c in first[:-1]] == [(FCGI_STDOUT, 1, b"")], first
        assert first[-1][:2] == (FCGI_END, 1), first
        # As a web server does: the next request once the last one has ended.
        sock.sendall(fcgi_request_bytes(cgi_params("/next"), rid=2, keep_conn=True))
        second = FcgiReply(read_fcgi_records(sock, rid=2))
        assert {r for _, r, _ in second.records} == {2}, second.records
        assert second.stdout.endswith(b"served /next"), second.stdout
    finally:
        sock.close()
    assert w.alive()


# -- WSGI output is validated -------------------------------------------------------


def _answers(status: Any, headers: Any) -> Callable:
    def app(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
        start_response(status, headers)
        return [b"body"]
    return app


def _exits(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
    sys.exit(0)  # exit status 0: the master would have read it as "asked to stop"


def _exits_late(environ: Dict[str, Any], start_response: Callable) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    sys.exit(3)  # status 3: the master would have read it as "could not import the app"
    yield b""


BAD = {
    "injected header in the status": _answers("200 OK\r\nSet-Cookie: admin=1", []),
    "status not NNN Reason": _answers("OK", []),
    "CR in a header name": _answers("200 OK", [("Set-Cookie\r", "admin=1")]),
    "LF in a value": _answers("200 OK", [("X-A", "1\nSet-Cookie: admin=1")]),
    "non-latin-1 value": _answers("200 OK", [("Content-Disposition", "attachment; f=日本.txt")]),
    "sys.exit() in the app": _exits,
    "sys.exit() in the iterable": _exits_late,
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_output_and_sys_exit_are_a_500_and_the_worker_lives(
        worker: Callable[..., WorkerProcess], case: str) -> None:
    bad = BAD[case]

    def app(environ: Dict[str, Any], start_response: Callable) -> Any:
        if environ["PATH_INFO"] == "/bad":
            return bad(environ, start_response)
        return hello(environ, start_response)

    w = worker(app)
    pid = w.pid
    reply = w.request("/bad")
    assert reply.status == "500 Internal Server Error", (reply, w.log())
    assert reply.body == INTERNAL_ERROR_BODY
    assert b"admin=1" not in reply.stdout
    assert w.request("/").body == b"hello"
    assert w.alive() and w.pid == pid
    assert "Traceback" in w.log()


# -- max_body, unfinished connections, idle connections ----------------------------


def test_a_body_over_max_body_is_a_413_and_the_app_is_never_called(
        worker: Callable[..., WorkerProcess], tmp_path: Path) -> None:
    calls = tmp_path / "calls"

    def app(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
        with open(calls, "a") as f:
            f.write(environ["PATH_INFO"] + "\n")
        body = environ["wsgi.input"].read(1 << 20)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d" % len(body)]

    w = worker(app, max_body=1000, max_body_in_memory=64)
    with connect_fcgi(w.address, 20) as sock:
        cases = [
            ("/announced", cgi_params("/announced", "POST", b"x" * 5000), b"x" * 5000),
            ("/unannounced", dict(cgi_params("/unannounced", "POST", b"x"), CONTENT_LENGTH=""),
             b"x" * 5000),
            ("/understated", dict(cgi_params("/understated", "POST", b"x"), CONTENT_LENGTH="10"),
             b"x" * 5000),
            ("/fits", cgi_params("/fits", "POST", b"y" * 1000), b"y" * 1000),
        ]
        for rid, (path, params, body) in enumerate(cases, 1):
            sock.sendall(fcgi_request_bytes(params, body, rid=rid, keep_conn=True))
            reply = FcgiReply(read_fcgi_records(sock, rid, 20))
            if path == "/fits":
                assert (reply.status, reply.body) == ("200 OK", b"1000"), reply
            else:
                assert reply.status.startswith("413"), (path, reply)
    assert calls.read_text() == "/fits\n", "the app was called for a refused body"
    assert "workers.max_body" in w.log()


def _partial_request() -> bytes:
    begin = struct.pack("!HB5x", 1, 0)
    return fcgi_record(FCGI_BEGIN, 1, begin) + fcgi_record(FCGI_PARAMS, 1, fcgi_pairs(
        {"REQUEST_METHOD": "GET"}))  # and never the rest


def _connect_now(address: str) -> socket.socket:
    try:
        return connect_fcgi(address, 20)
    except BlockingIOError:
        return None  # type: ignore[return-value]


def test_at_most_128_unfinished_connections_the_oldest_closed_first(
        worker: Callable[..., WorkerProcess]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    w = worker(hello, read_timeout=120)
    clients: List[socket.socket] = []
    try:
        for _ in range(200):
            # A full accept queue refuses a unix connect with EAGAIN: retry until accepted.
            sock = wait_for(lambda: _connect_now(w.address), 20, "a connection")
            sock.sendall(_partial_request())
            clients.append(sock)
        # A GET_VALUES round trip on the last one: the worker has seen every connection.
        clients[-1].sendall(_get_values(1))
        clients[-1].settimeout(20)
        assert clients[-1].recv(4096)

        def closed() -> List[int]:
            return [i for i, s in enumerate(clients) if closed_by_peer(s)]

        wait_for(lambda: len(closed()) >= 72, 20, "72 connections closed")
        assert closed() == list(range(72)), "not the oldest, or not exactly 72"
        assert w.request("/").body == b"hello"
    finally:
        for sock in clients:
            sock.close()
    assert "more than 128 unfinished" in w.log()


def test_max_idle_connections_holds_when_connections_become_idle(
        worker: Callable[..., WorkerProcess]) -> None:
    w = worker(hello, max_idle_connections=2)
    kept = [connect_fcgi(w.address, 20) for _ in range(3)]
    try:
        for sock in kept:  # the worker watches each one before it has had a request
            sock.sendall(_get_values(1))
            assert sock.recv(4096)
        for rid, sock in enumerate(kept, 1):
            sock.sendall(fcgi_request_bytes(cgi_params("/"), rid=rid, keep_conn=True))
            assert FcgiReply(read_fcgi_records(sock, rid, 20)).body == b"hello"
        wait_for(lambda: closed_by_peer(kept[0]), 10, "the oldest idle connection closed")
        assert not closed_by_peer(kept[1]) and not closed_by_peer(kept[2])
        kept[2].setblocking(True)
        kept[2].sendall(fcgi_request_bytes(cgi_params("/"), rid=9, keep_conn=True))
        assert FcgiReply(read_fcgi_records(kept[2], 9, 20)).body == b"hello"
    finally:
        for sock in kept:
            sock.close()
    assert os.path.exists(w.address[5:])


def test_max_body_holds_with_threads_too(make_manager: Callable[..., Any]) -> None:
    manager = make_manager("echo:app", count=1, workers={"threads": 2, "max_body": "1K"})
    manager.start()
    big = fcgi_request(manager.bind, "/", "POST", b"z" * 5000)
    assert big.status.startswith("413"), big
    small = fcgi_request(manager.bind, "/", "POST", b"z" * 1000)
    assert small.status == "200 OK" and small.header("X-Body-Length") == "1000", small
