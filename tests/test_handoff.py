"""Hand-off of idle kept connections between workers (fcgi_manager/worker/handoff.py).

Real workers, real sockets: a client holds FastCGI connections with the keep-conn flag,
learns from the app's answer which worker process holds each, and makes one of them run a
slow request. The others must then move to a sibling (or stay, when the hand-off queue is
full) without losing a byte of a request already sent on them.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import psutil
from support import (
    FcgiReply,
    ProcessTracker,
    cgi_params,
    connect_fcgi,
    fcgi_request_bytes,
    read_fcgi_records,
    wait_for,
)

from fcgi_manager import config as config_mod
from fcgi_manager import sockets
from fcgi_manager.scoreboard import Scoreboard, SlotWriter
from fcgi_manager.worker.handoff import CLOSED, FLAG_KEPT, SENT, HandoffChannel
from fcgi_manager.worker.loop import Worker
from fcgi_manager.worker.parts import WorkerParts

PID = re.compile(rb"in pid (\d+)")


def _send(sock: socket.socket, path: str, rid: int = 1) -> None:
    sock.sendall(fcgi_request_bytes(cgi_params(path), rid=rid, keep_conn=True))


def _reply(sock: socket.socket, rid: int = 1, timeout: float = 30.0) -> FcgiReply:
    return FcgiReply(read_fcgi_records(sock, rid, timeout))


def _pid_of(reply: FcgiReply) -> int:
    match = PID.search(reply.body)
    assert reply.status_code == 200 and match, reply
    return int(match.group(1))


def _two_on_one_worker(address: str, tries: int = 8) -> Tuple[int, socket.socket,
                                                                socket.socket, List[Any]]:
    """Kept connections until two are held by the same worker: (its pid, both, all)."""
    held: Dict[int, List[socket.socket]] = {}
    opened = []
    for _ in range(tries):
        sock = connect_fcgi(address)
        opened.append(sock)
        _send(sock, "/?s=0")
        pid = _pid_of(_reply(sock))
        held.setdefault(pid, []).append(sock)
        if len(held[pid]) == 2:
            return pid, held[pid][0], held[pid][1], opened
    raise AssertionError(f"no worker got two of {tries} connections: {held}")


def _server_ports(pid: int) -> List[int]:
    """Remote ports of the TCP connections process ``pid`` holds."""
    try:
        return [c.raddr.port for c in psutil.Process(pid).net_connections("tcp") if c.raddr]
    except psutil.NoSuchProcess:
        return []


def test_a_kept_connection_of_a_busy_worker_is_served_by_another(
        make_manager: Callable[..., Any]) -> None:
    manager = make_manager("slow:app", count=2, bind="tcp")
    manager.start()
    manager.wait_workers(2)
    busy_pid, k1, k2, opened = _two_on_one_worker(manager.bind)
    try:
        # A slow request on k1; once it runs, a request on k2 (idle in the same worker)
        # is answered by the other worker, long before the slow one ends.
        started = time.monotonic()
        _send(k1, "/?s=3")
        wait_for(lambda: [w for w in manager.status()["workers"]
                          if w["pid"] == busy_pid and w["state"] == "busy"], 10,
                 "the slow request to run")
        _send(k2, "/?s=0")
        fast = _reply(k2, timeout=10)
        fast_took = time.monotonic() - started
        other = _pid_of(fast)
        assert other != busy_pid and other in manager.worker_pids()
        assert fast_took < 2.0, f"the request waited for the slow one ({fast_took:.2f} s)"
        slow = _reply(k1, timeout=10)
        assert _pid_of(slow) == busy_pid and b"slept 3" in slow.body, slow
        # Both connections stay usable; k2 is now held by the other worker.
        _send(k2, "/?s=0", rid=2)
        assert _pid_of(_reply(k2, rid=2)) == other
        _send(k1, "/?s=0", rid=2)
        assert _pid_of(_reply(k1, rid=2)) in manager.worker_pids()
    finally:
        for sock in opened:
            sock.close()
    assert "Traceback" not in manager.log_text()


def test_a_worker_dying_with_its_connections_in_the_channel_loses_only_its_request(
        make_manager: Callable[..., Any]) -> None:
    """One worker: what it hands off waits in the channel (nobody else to take it). It is
    killed there; its replacement takes the connection and serves it."""
    manager = make_manager("slow:app", count=1, bind="tcp")
    manager.start()
    (first,) = [w["pid"] for w in manager.wait_workers(1)["workers"]]
    k1 = connect_fcgi(manager.bind)
    k2 = connect_fcgi(manager.bind)
    try:
        for sock in (k1, k2):
            _send(sock, "/?s=0")
            assert _pid_of(_reply(sock)) == first
        k2_port = k2.getsockname()[1]
        assert k2_port in _server_ports(first)
        _send(k1, "/?s=60")
        wait_for(lambda: k2_port not in _server_ports(first), 10,
                 "the busy worker to let go of the idle connection")
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: [p for p in manager.worker_pids() if p != first], 15,
                 "a replacement worker")
        (second,) = manager.wait_workers(1)["workers"]
        _send(k2, "/?s=0", rid=2)
        assert _pid_of(_reply(k2, rid=2, timeout=10)) == second["pid"]
        # The killed worker's own request is the only loss: its connection just ends.
        records = read_fcgi_records(k1, 1, 10)
        assert not [r for r in records if r[0] == 3], records
    finally:
        k1.close()
        k2.close()


# -- the channel and one worker, in this process and a forked child ------------------------


_CHANNEL: Dict[str, HandoffChannel] = {}  # what the app in the forked worker may fill


def _hello_pid(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
    """``?s=N`` sleeps N seconds; ``/fill`` first fills the hand-off channel until it
    refuses (from inside the worker, so that no idle worker can empty it meanwhile)."""
    query = environ.get("QUERY_STRING", "")
    seconds = float(query[2:]) if query.startswith("s=") else 0.0
    filled = 0
    if environ.get("PATH_INFO") == "/fill":
        channel = _CHANNEL["handoff"]
        null = os.open(os.devnull, os.O_RDONLY)
        while channel.offer(null, None, 0) == SENT:
            filled += 1
        os.close(null)
    time.sleep(seconds)
    body = f"slept {seconds:g} s in pid {os.getpid()}, filled {filled}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


class ForkedWorker:
    """A :class:`Worker` in a forked child, as the master runs it (with a channel)."""

    def __init__(self, tmp: Path, handoff: HandoffChannel) -> None:
        self.address = f"unix:{tmp / 'w.sock'}"
        cfg = config_mod.from_options("unused:app", bind=self.address)
        listener = sockets.create_listener(sockets.parse_address(self.address), 64)
        board = Scoreboard(4)
        death_r, self.death_w = os.pipe()
        note_r, note_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.close(self.death_w)
                os.close(note_r)
                code = Worker(WorkerParts(app=_hello_pid, config=cfg, listener=listener,
                                          slot=SlotWriter(board, 0), worker_id=1,
                                          master_fd=death_r, notify_fd=note_w,
                                          max_requests=0, handoff=handoff)).run()
            finally:
                os._exit(code)
        self.pid = pid
        self.tracker = ProcessTracker()
        self.tracker.add(pid)
        for fd in (death_r, note_w):
            os.close(fd)
        listener.close()
        board.close()
        with os.fdopen(note_r, "rb") as notes:
            assert notes.read(1) == b"R", "the worker did not get ready"

    def stop(self) -> None:
        os.close(self.death_w)  # the "master" goes away: the worker finishes and exits
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                return
            time.sleep(0.02)
        self.tracker.kill_all()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass  # reaped by the tracker


def test_a_full_channel_keeps_the_connection_and_its_unread_request_moves_and_is_served(
        tmp_path: Path) -> None:
    handoff = _CHANNEL["handoff"] = HandoffChannel.create()
    handoff.send_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    worker = ForkedWorker(tmp_path, handoff)
    k1 = connect_fcgi(worker.address)
    k2 = connect_fcgi(worker.address)
    try:
        for sock in (k1, k2):
            _send(sock, "/?s=0")
            assert _pid_of(_reply(sock)) == worker.pid
        # k1 runs a slow request that first fills the channel; the worker's watchdog
        # finds it full and keeps k2. A request on k2, sent once the app runs (the
        # channel has its first message), waits unread in k2's socket.
        _send(k1, "/fill?s=3")
        probe = select.poll()
        probe.register(handoff.recv_sock.fileno(), select.POLLIN)
        wait_for(lambda: probe.poll(0), 10, "the app to start filling the channel")
        _send(k2, "/?s=0", rid=2)
        # Empty the channel from here: every message in it is one of the app's, and
        # only once there is room does k2 follow them -- with its request unread.
        seen: List[int] = []

        def k2_arrived() -> Optional[int]:
            for handed in handoff.take(64):
                if stat.S_ISSOCK(os.fstat(handed.fd).st_mode):
                    return handed.fd
                seen.append(handed.fd)
                os.close(handed.fd)
            return None

        moved_fd = wait_for(k2_arrived, 10, "the kept connection, once there is room")
        slow = _reply(k1, timeout=10)
        match = re.search(rb"filled (\d+)", slow.body)
        assert match and int(match.group(1)) == len(seen) > 0, (slow, len(seen))
        # Its request is still unread in it: hand it back, and the worker serves it.
        peek = socket.socket(fileno=os.dup(moved_fd))
        assert peek.recv(8, socket.MSG_PEEK) == b"\x01\x01\x00\x02\x00\x08\x00\x00"
        peek.close()
        assert handoff.offer(moved_fd, None, FLAG_KEPT) == SENT
        os.close(moved_fd)
        assert _pid_of(_reply(k2, rid=2, timeout=10)) == worker.pid
    finally:
        k1.close()
        k2.close()
        worker.stop()
        handoff.close()


def test_a_shut_channel_says_so_to_every_holder() -> None:
    handoff = HandoffChannel.create()
    r, w = os.pipe()
    try:
        assert handoff.is_open() and handoff.offer(r, ("127.0.0.1", 5), 1) == SENT
        other = HandoffChannel.from_fds([os.dup(fd) for fd in handoff.fds()])
        handoff.shut()
        assert not other.is_open()
        assert other.offer(r, None, 0) == CLOSED
        (queued,) = other.take()  # what was queued before the stop is still delivered
        # The address is never taken from the message (a worker's Gate asks the kernel).
        assert queued.peer == "" and queued.flags == 1
        os.close(queued.fd)
        assert other.take() == [] and other.closed
        other.close()
    finally:
        os.close(r)
        os.close(w)
        handoff.close()



class _Board:
    """The two things a Gate reads of the scoreboard: its size and (pid, generation)."""

    def __init__(self, idents: List[Tuple[int, int]]) -> None:
        self.idents = idents
        self.slots = len(idents)

    def ident(self, slot: int) -> Tuple[int, int]:
        return self.idents[slot]


def test_the_gate_of_a_reloads_old_channel_admits_only_that_generations_workers() -> None:
    """The new workers take from the old generation's channel: its own workers (listed
    then, or listed when the new worker started and gone since) with its uid may send;
    a live process that is not one, or one that is gone but was never listed, may not."""
    from fcgi_manager.worker.handoff import Gate

    child = os.fork()
    if child == 0:  # pragma: no cover - a process that exits at once
        os._exit(0)
    os.waitpid(child, 0)  # gone, and reaped
    stranger = os.fork()
    if stranger == 0:  # pragma: no cover - a live process nobody lists
        time.sleep(30)
        os._exit(0)
    try:
        uid = os.getuid()
        board = _Board([(os.getpid(), 1), (child, 1), (stranger, 2)])
        gate = Gate(board, 1, uid, None, None, ended=True)
        assert gate.sender_ok(os.getpid(), uid)  # listed now
        assert not gate.sender_ok(os.getpid(), uid + 1)  # not that generation's uid
        assert not gate.sender_ok(stranger, uid)  # alive, not of generation 1
        board.idents[1] = (0, 0)  # the master reaped it and freed its slot
        assert gate.sender_ok(child, uid)  # listed when the gate was made, and gone
        board.idents[0] = (0, 0)
        assert not gate.sender_ok(os.getpid(), uid)  # alive but no longer listed
        unlisted = Gate(_Board([(0, 0)]), 1, uid, None, None, ended=True)
        assert not unlisted.sender_ok(child, uid)  # gone, but never one of its workers
        current = Gate(_Board([(0, 0)]), 1, uid, None, None)
        assert current.sender_ok(child, uid)  # the live generation's gate: gone is enough
    finally:
        os.kill(stranger, signal.SIGKILL)
        os.waitpid(stranger, 0)
