"""The system calls of the request path, traced with strace on a real forked worker.

What the worker must not do (each was once an extra system call per request):

* probe a fresh unix connection with ``poll`` before reading it (it is accepted
  non-blocking and simply read);
* write a small response in more than one ``write`` (head, body and END_REQUEST leave
  together);
* read a kept connection that the web server closed between two requests (its HUP says so).

Counts of calls, never timings: they are the same on a loaded machine as on a quiet one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest
from support import (
    FcgiReply,
    cgi_params,
    connect_fcgi,
    fcgi_request,
    fcgi_request_bytes,
    read_fcgi_records,
    require_program,
    wait_for,
)
from test_wsgi import WorkerProcess

pytestmark = pytest.mark.needs("strace")

REQUESTS = 20
_CALL = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((\d+)?.*\)\s+=\s+(-?\d+)")


def hello(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[WorkerProcess]:
    w = WorkerProcess(tmp_path, hello)
    yield w
    w.stop()


class Trace:
    """strace attached to one process: every call it makes until :meth:`stop`."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self.out = out
        self.proc = subprocess.Popen(
            [require_program("strace"), "-f", "-qq", "-o", str(out), "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(self._attached, 20, "strace to attach")

    def _attached(self) -> bool:
        assert self.proc.poll() is None, "strace could not attach (ptrace not allowed?)"
        with open(f"/proc/{self.pid}/status") as f:
            return any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in f)

    def stop(self) -> List[tuple]:
        """(name, first argument or None, result) of each completed call."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=20)
        calls = []
        for line in self.out.read_text(errors="replace").splitlines():
            match = _CALL.match(line)
            if match:
                name, arg, result = match.groups()
                calls.append((name, int(arg) if arg else None, int(result)))
        return calls


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _count(calls: List[tuple], name: str) -> int:
    return sum(1 for c in calls if c[0] == name)


def test_a_connection_per_request_costs_accept_read_write_close(worker: WorkerProcess,
                                                                 tmp_path: Path) -> None:
    before = _open_fds(worker.pid)  # no connection open
    assert worker.request().status_code == 200  # warm: lazy imports happen before the trace
    trace = Trace(worker.pid, tmp_path / "trace.txt")
    try:
        for _ in range(REQUESTS):
            reply = worker.request()
            assert reply.status_code == 200 and reply.body == b"hello"
        wait_for(lambda: _open_fds(worker.pid) <= before, 20, "the last close")
    finally:
        calls = trace.stop()
    assert _count(calls, "accept4") >= REQUESTS
    assert _count(calls, "poll") == 0, "a probe before the first read is back"
    # One write per response; one read that finds the request (a read that comes before
    # the request does fails with EAGAIN and parks the connection: not counted).
    assert _count(calls, "write") == REQUESTS
    reads = [c for c in calls if c[0] == "read" and c[2] != -1]
    assert len(reads) == REQUESTS
    assert _count(calls, "close") >= REQUESTS


def test_a_kept_connection_closed_by_the_client_is_closed_without_a_read(
        worker: WorkerProcess, tmp_path: Path) -> None:
    before = _open_fds(worker.pid)  # no connection open
    assert worker.request().status_code == 200
    trace = Trace(worker.pid, tmp_path / "trace.txt")
    try:
        conns = []
        for _ in range(3):
            sock = connect_fcgi(worker.address)
            for _ in range(2):  # two requests: the connection is kept and idle after them
                sock.sendall(fcgi_request_bytes(cgi_params("/"), keep_conn=True))
                reply = FcgiReply(read_fcgi_records(sock, 1, 20))
                assert reply.status_code == 200
            conns.append(sock)
        for sock in conns:
            sock.close()
        wait_for(lambda: _open_fds(worker.pid) <= before, 20,
                 "the worker to close the connections")
    finally:
        calls = trace.stop()
    eof_reads = [c for c in calls if c[0] == "read" and c[2] == 0]
    assert eof_reads == [], "a kept connection's close was found by reading it"
    assert _count(calls, "write") == 6
    assert fcgi_request(worker.address).status_code == 200  # and the worker serves on


def test_max_memory_costs_one_getrusage_per_request_and_nothing_else(tmp_path: Path) -> None:
    """``max_memory`` is checked after every request: the floor grows by exactly one
    ``getrusage`` per request -- the cheapest way the kernel tells a process its memory
    (peak RSS; ~2 us against ~2.5 us for a ``pread`` of a kept-open /proc/self/statm,
    which must also be parsed)."""
    w = WorkerProcess(tmp_path, hello, max_memory="4G")
    try:
        before = _open_fds(w.pid)
        assert w.request().status_code == 200
        trace = Trace(w.pid, tmp_path / "trace.txt")
        try:
            for _ in range(REQUESTS):
                assert w.request().status_code == 200
            wait_for(lambda: _open_fds(w.pid) <= before, 20, "the last close")
        finally:
            calls = trace.stop()
    finally:
        w.stop()
    assert _count(calls, "getrusage") == REQUESTS
    assert _count(calls, "write") == REQUESTS
    assert len([c for c in calls if c[0] == "read" and c[2] != -1]) == REQUESTS
    assert _count(calls, "openat") == _count(calls, "open") == 0  # no /proc read per request
