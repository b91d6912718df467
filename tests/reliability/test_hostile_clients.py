"""Item 2: hostile clients against a running pool of 2 workers, while a well-behaved
client loops and must see every one of its requests succeed.

* malformed input (garbage, a wrong version, a truncated record, a name-value length
  claiming 2 GiB, endless PARAMS) closes that connection with one log line; a body larger
  than ``max_body_in_memory`` is spooled and served;
* slow-drip and silent clients (10 of each, more than the workers) cost no worker: the
  good client stays fast and they are dropped after ``read_timeout``;
* a client that asks for 50 MiB and stops reading holds a worker for ``write_timeout``
  at most;
* more connections than file descriptors: the log says so once, nobody spins, and
  service resumes when the connections close.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import socket
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

import pytest
from support import (
    cgi_params,
    fcgi_pairs,
    fcgi_record,
    fcgi_request,
    fcgi_request_bytes,
    wait_for,
)

from .support import (
    LoadClient,
    connect,
    cpu_percent,
    figure,
    rel_manager,
    start_with_limit,
    status,
    wait_closed,
    worker_pids,
)

BEGIN = 1
PARAMS = 4
READ_TIMEOUT = 2
WRITE_TIMEOUT = 2
WORKER_LINE = re.compile(r"\[worker \d+ pid (\d+)\] (\w+): (.*)")


def begin(keep: bool = False) -> bytes:
    return fcgi_record(BEGIN, 1, struct.pack("!HB5x", 1, 1 if keep else 0))


def worker_lines(text: str) -> List[Tuple[int, str, str]]:
    return [(int(m.group(1)), m.group(2), m.group(3)) for m in WORKER_LINE.finditer(text)]


# -- malformed input -----------------------------------------------------------------------

def _garbage(sock: socket.socket) -> None:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")


def _wrong_version(sock: socket.socket) -> None:
    sock.sendall(struct.pack("!BBHHBx", 2, BEGIN, 1, 8, 0) + struct.pack("!HB5x", 1, 0))


def _truncated(sock: socket.socket) -> None:
    # A PARAMS header that announces 100 bytes, 10 of them sent, then EOF.
    sock.sendall(begin() + struct.pack("!BBHHBx", 1, PARAMS, 1, 100, 0) + b"\x04\x03HOST")
    sock.shutdown(socket.SHUT_WR)


def _huge_length(sock: socket.socket) -> None:
    pair = b"\xff\xff\xff\xff" + b"\x01" + b"AB"  # a name of 2**31 - 1 bytes, claimed
    sock.sendall(begin() + fcgi_record(PARAMS, 1, pair) + fcgi_record(PARAMS, 1))


def _endless_params(sock: socket.socket) -> None:
    chunk = fcgi_record(PARAMS, 1, fcgi_pairs({"HTTP_X_FILL": "v" * 60000}))
    sock.sendall(begin())
    for _ in range(200):  # 12 MB, far past the 256 KiB limit; the server closes first
        sock.sendall(chunk)


MALFORMED: Dict[str, Tuple[Callable[[socket.socket], None], str]] = {
    "garbage": (_garbage, "record version 71"),
    "wrong version": (_wrong_version, "record version 2"),
    "truncated record": (_truncated, "closed a connection in the middle of a request"),
    "2 GiB name-value length": (_huge_length, "name-value pair claims 2147483647"),
    "endless PARAMS": (_endless_params, "PARAMS larger than"),
}


def test_malformed_input_closes_only_that_connection(make_manager: Any) -> None:
    manager = rel_manager(make_manager, worker_opts={
        "read_timeout": READ_TIMEOUT, "max_body_in_memory": "64KiB"})
    manager.start()
    before = status(manager)
    good = LoadClient(manager.bind)
    good.start()
    log_start = len(manager.log_text())
    closed_after: Dict[str, float] = {}
    try:
        for name, (send, _) in MALFORMED.items():
            with connect(manager.bind) as sock:
                started = time.monotonic()
                try:
                    send(sock)
                except OSError:
                    pass  # the server closed first: that is the point
                wait_closed(sock, READ_TIMEOUT + 5)
                closed_after[name] = time.monotonic() - started
        # A body over max_body_in_memory is spooled to a file and served whole.
        body = bytes(range(256)) * 8192  # 2 MiB
        reply = fcgi_request(manager.bind, "/echo", "POST", body)
        spooled = reply.body.decode(errors="replace").strip()
        expected = f"{len(body)} {hashlib.sha256(body).hexdigest()}"
        for _, line in MALFORMED.values():
            manager.wait_log(line)
    finally:
        good.stop()
    lines = worker_lines(manager.log_text()[log_start:])
    per_case = {name: sum(1 for _, _, msg in lines if needle in msg)
                for name, (_, needle) in MALFORMED.items()}
    after = status(manager)
    text = "; ".join([
        figure("malformed: seconds until the server closed", {
            k: round(v, 3) for k, v in closed_after.items()}),
        figure("malformed: log lines per bad connection", per_case),
        figure("malformed: worker log lines in all", len(lines)),
        figure("malformed: spooled 2 MiB body", spooled),
        figure("malformed: good client", good.summary()),
    ])
    assert all(n == 1 for n in per_case.values()), (text, lines)
    assert len(lines) == len(MALFORMED), (text, lines)
    assert all(v < 1.0 for v in closed_after.values()), text
    assert reply.status_code == 200 and spooled == expected, (text, reply)
    assert good.done > 0 and not good.failures, text
    assert after["totals"]["crashes"] == 0 and worker_pids(after) == worker_pids(before), text


# -- slow-drip and silent clients ----------------------------------------------------------

def _slow_drip(address: str, results: List[float]) -> None:
    """Send a valid request one byte per second until the server hangs up."""
    data = fcgi_request_bytes(cgi_params("/"))
    started = time.monotonic()
    with connect(address) as sock:
        for i in range(len(data)):
            try:
                sock.sendall(data[i:i + 1])
            except OSError:
                break
            sock.settimeout(1.0)  # the drip's own pacing: wait a second for a hang-up
            try:
                if not sock.recv(4096):
                    break
            except socket.timeout:
                continue
            except OSError:
                break
    results.append(time.monotonic() - started)


def _silent(address: str, results: List[float]) -> None:
    with connect(address) as sock:
        results.append(wait_closed(sock, READ_TIMEOUT + 10))


def test_slow_and_silent_clients_cost_no_worker(make_manager: Any) -> None:
    manager = rel_manager(make_manager, worker_opts={"read_timeout": READ_TIMEOUT})
    manager.start()
    before = status(manager)
    drips: List[float] = []
    silents: List[float] = []
    threads = [threading.Thread(target=_slow_drip, args=(manager.bind, drips), daemon=True)
               for _ in range(10)]
    threads += [threading.Thread(target=_silent, args=(manager.bind, silents), daemon=True)
                for _ in range(10)]
    log_start = len(manager.log_text())
    good = LoadClient(manager.bind)
    for t in threads:
        t.start()
    good.start()
    try:
        for t in threads:
            t.join(READ_TIMEOUT + 15)
    finally:
        good.stop()
    dropped = [msg for _, _, msg in worker_lines(manager.log_text()[log_start:])
               if "read timeout" in msg]
    after = status(manager)
    text = "; ".join([
        figure("slow clients: good client", good.summary()),
        figure("slow clients: good client p99", good.percentile(0.99), "s"),
        figure("slow-drip clients dropped after", sorted(round(x, 2) for x in drips), "s"),
        figure("silent clients dropped after", sorted(round(x, 2) for x in silents), "s"),
        figure("slow clients: read-timeout log lines", len(dropped)),
    ])
    assert len(drips) == 10 and len(silents) == 10, text
    assert good.done > 20 and not good.failures, text
    assert good.percentile(0.99) < 1.0, text
    assert all(READ_TIMEOUT - 0.5 <= x <= READ_TIMEOUT + 2.5 for x in drips + silents), text
    assert len(dropped) == 10, text  # one line per slow-drip client; silence is not an error
    assert after["totals"]["crashes"] == 0 and worker_pids(after) == worker_pids(before), text


# -- a client that stops reading -----------------------------------------------------------

@pytest.mark.parametrize("bind", ["unix", "tcp"])
def test_client_that_stops_reading_is_bounded_by_write_timeout(make_manager: Any,
                                                               bind: str) -> None:
    manager = rel_manager(make_manager, bind=bind, worker_opts={
        "write_timeout": WRITE_TIMEOUT, "read_timeout": READ_TIMEOUT})
    manager.start()
    before = status(manager)
    good = LoadClient(manager.bind)
    good.start()
    log_start = len(manager.log_text())
    try:
        with connect(manager.bind) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            started = time.monotonic()
            sock.sendall(fcgi_request_bytes(cgi_params("/big?mib=50")))
            # Read nothing; the worker must give up within write_timeout (and a margin).
            wait_for(lambda: "stopped reading" in manager.log_text()[log_start:],
                     WRITE_TIMEOUT + 20, "the write-timeout log line")
            held = time.monotonic() - started
        served_after = wait_for(lambda: good.done > 0 and len(
            {w["pid"] for w in status(manager)["workers"] if w["requests"] > 0}) == 2,
            10, "both workers serving again")
    finally:
        good.stop()
    after = status(manager)
    busy = [w for w in after["workers"] if w["state"] == "busy"]
    text = "; ".join([
        figure(f"stopped reader ({bind}): worker held for", held, "s"),
        figure(f"stopped reader ({bind}): good client", good.summary()),
    ])
    assert served_after, text
    # SO_SNDTIMEO restarts with every write that makes progress, and the write that
    # fills the socket buffers makes some: a stopped reader holds the worker for 2 (unix)
    # to 3 (TCP, whose buffers grow a little more) write timeouts, never longer.
    assert held < 3 * WRITE_TIMEOUT + 1, text
    assert not good.failures, text
    assert not busy, (text, busy)
    assert after["totals"]["crashes"] == 0 and worker_pids(after) == worker_pids(before), text


# -- more connections than file descriptors ------------------------------------------------

NOFILE = 64


def test_more_connections_than_file_descriptors(make_manager: Any) -> None:
    manager = rel_manager(make_manager, worker_opts={"read_timeout": 60})

    start_with_limit(manager, resource.RLIMIT_NOFILE, NOFILE)
    before = status(manager)
    pids = [before["pid"], *worker_pids(before)]
    log_start = len(manager.log_text())
    conns: List[socket.socket] = []
    try:
        for _ in range(200):
            conns.append(connect(manager.bind))
        wait_for(lambda: "cannot accept" in manager.log_text()[log_start:], 15,
                 "the EMFILE log line")
        cpu = cpu_percent(pids, 2.0)
        # Still at the limit: nothing new is served ...
        stuck = status(manager)
    finally:
        for sock in conns:
            sock.close()
    # ... and once the connections are gone, service resumes.
    resumed_in = time.monotonic()
    reply = wait_for(lambda: fcgi_request(manager.bind, "/", timeout=5), 15,
                     "a request served after the connections closed")
    resumed_in = time.monotonic() - resumed_in
    emfile = [(pid, msg) for pid, _, msg in worker_lines(manager.log_text()[log_start:])
              if "cannot accept" in msg]
    per_worker = {pid: sum(1 for p, _ in emfile if p == pid) for pid in worker_pids(before)}
    after = status(manager)
    text = "; ".join([
        figure("EMFILE: CPU % over 2 s (master first)", [round(cpu.get(p, -1), 1)
                                                          for p in pids]),
        figure("EMFILE: log lines per worker", per_worker),
        figure("EMFILE: log line", emfile[0][1] if emfile else None),
        figure("EMFILE: service resumed after", resumed_in, "s"),
    ])
    assert reply.status_code == 200, (text, reply)
    assert all(0 <= cpu.get(p, -1) < 20 for p in pids), text
    assert emfile and all(n <= 1 for n in per_worker.values()), (text, emfile)
    assert stuck["totals"]["crashes"] == 0 and after["totals"]["crashes"] == 0, text
    assert worker_pids(after) == worker_pids(before), text


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_body_spool_without_a_free_descriptor(make_manager: Any) -> None:
    """A worker with one descriptor left accepts a request whose body must be spooled to
    a temporary file, which it cannot open: that connection is closed with a log line,
    and the worker (and the connections it holds) live on."""
    manager = rel_manager(make_manager, workers=1, worker_opts={
        "read_timeout": 60, "max_body_in_memory": "64KiB"})

    start_with_limit(manager, resource.RLIMIT_NOFILE, NOFILE)
    before = status(manager)
    (pid,) = worker_pids(before)
    conns: List[socket.socket] = []
    log_start = len(manager.log_text())
    try:
        while _open_fds(pid) < NOFILE - 1:
            count = _open_fds(pid)
            conns.append(connect(manager.bind))
            wait_for(lambda n=count: _open_fds(pid) > n, 5, "the worker to accept")
        body = b"b" * (1 << 20)
        try:
            reply = fcgi_request(manager.bind, "/echo", "POST", body, timeout=10)
            outcome = f"answered {reply.status!r}"
        except OSError as exc:
            outcome = f"connection failed: {exc!r}"
        manager.wait_log("cannot spool")
        during = status(manager)
    finally:
        for sock in conns:
            sock.close()
    reply = wait_for(lambda: fcgi_request(manager.bind, "/echo", "POST", body, timeout=5), 15,
                     "a spooled request once descriptors are free")
    lines = [msg for _, _, msg in worker_lines(manager.log_text()[log_start:])
             if "spool" in msg]
    after = status(manager)
    text = "; ".join([
        figure("spool without descriptors: the request", outcome),
        figure("spool without descriptors: log lines", lines),
        figure("spool without descriptors: crashes", after["totals"]["crashes"]),
    ])
    assert len(lines) == 1, text
    assert during["totals"]["crashes"] == 0 and worker_pids(during) == [pid], text
    assert reply.status_code == 200 and reply.body.startswith(b"1048576 "), (text, reply)
    assert after["totals"]["crashes"] == 0 and worker_pids(after) == [pid], text
