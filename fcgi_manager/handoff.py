"""Handing idle kept connections from one worker to another (SCM_RIGHTS).

nginx reuses its cached upstream connections most recently used first, so it keeps sending
requests on the connections a worker holds even while that worker runs a slow request, or
is about to exit. A kept connection that is idle *between* requests can move to another
process without losing a byte: whatever nginx already wrote stays in the kernel's receive
buffer and is read by whoever holds the descriptor next.

The master creates one ``SOCK_SEQPACKET`` socket pair before it forks any worker, and
passes both ends across its re-exec on reload, so every generation shares it. A worker
that lets go of a connection sends its descriptor as one message on the *send* end and
forgets it; every worker that can serve watches the *receive* end in its epoll with
``EPOLLEXCLUSIVE`` (wake-one, like the listening socket) and takes what arrives.
``EAGAIN`` (the queue is full) means: keep the connection and try again later.

On a full stop nobody is left to take a connection: the master shuts the pair down first
(:meth:`HandoffChannel.shut`), sends then fail with ``EPIPE``, and stopping workers fall
back to serving their kept connections and closing them once idle.

A worker blocked inside the app cannot let go of anything itself: :class:`Watchdog` is a
small thread that does it for the worker when the current request has run for
``HANDOFF_AFTER`` seconds. The worker's main thread holds one lock at all times except
around the app call; the watchdog only ever *tries* that lock, so it touches the
connection table only while the main thread is inside the app, and the main thread never
waits for it on the common path (an uncontended lock is no system call).
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

HANDOFF_AFTER = 0.005  # a request older than this (5-10 ms) lets go of its idle siblings
MESSAGE_MAX = 512  # one hand-off message: flags and the peer's address as text
TAKE_BATCH = 8  # connections taken per wakeup: the rest wake another idle worker
MAX_FDS = 4  # room for descriptors in one message (we send one; more are closed)
SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
RECV_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_CMSG_CLOEXEC", 0)

FLAG_KEPT = 1  # it served a request already (idle kept), not a fresh connection
FLAG_SNDTIMEO = 2  # its writes are bounded already: SO_SNDTIMEO set, or non-blocking (worker.Conn)

SENT = "sent"
FULL = "full"  # the queue is full: keep the connection
CLOSED = "closed"  # the channel was shut (a full stop): keep it for good


class Handed:
    """One connection taken from the channel: its descriptor, and what came with it."""

    __slots__ = ("fd", "peer", "flags")

    def __init__(self, fd: int, peer: Any, flags: int) -> None:
        self.fd = fd
        self.peer = peer
        self.flags = flags


def encode_peer(peer: Any) -> bytes:
    """The peer address as text (for log lines only: it was checked when accepted)."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}\x00{peer[1]}".encode("utf-8", "replace")
    return b""


def decode_peer(data: bytes) -> Any:
    if b"\x00" not in data:
        return ""
    host, _, port = data.decode("utf-8", "replace").partition("\x00")
    try:
        return (host, int(port))
    except ValueError:
        return ""


class HandoffChannel:
    """The shared socket pair: send on one end, take from the other (any process)."""

    def __init__(self, send_sock: socket.socket, recv_sock: socket.socket) -> None:
        self.send_sock = send_sock
        self.recv_sock = recv_sock
        self.closed = False

    @classmethod
    def create(cls) -> HandoffChannel:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a, b)

    @classmethod
    def from_fds(cls, fds: List[int]) -> HandoffChannel:
        """The pair a previous image of the master passed across its re-exec."""
        send_fd, recv_fd = fds
        for fd in fds:
            os.set_inheritable(fd, False)  # inheritable only for the exec that passed it
        return cls(socket.socket(fileno=send_fd), socket.socket(fileno=recv_fd))

    def fds(self) -> List[int]:
        return [self.send_sock.fileno(), self.recv_sock.fileno()]

    @property
    def recv_fd(self) -> int:
        return self.recv_sock.fileno()

    def offer(self, fd: int, peer: Any, flags: int) -> str:
        """Send ``fd`` to whichever worker takes it first: SENT, FULL or CLOSED.

        On SENT the caller must stop using ``fd`` (and close its copy); the message holds
        its own reference, so the connection survives even if the caller dies right now.
        """
        if self.closed:
            return CLOSED
        payload = bytes((flags,)) + encode_peer(peer)
        try:
            # Not socket.send_fds: before Python 3.12 it ignores its flags (and blocks).
            self.send_sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                array.array("i", [fd]))], SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            return FULL
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ENOTCONN, errno.ECONNRESET):
                self.closed = True  # shut for a full stop
                return CLOSED
            return FULL  # ENOBUFS, ENOMEM, ETOOMANYREFS (descriptors in flight): later
        return SENT

    def take(self, limit: int = TAKE_BATCH) -> List[Handed]:
        """Up to ``limit`` connections waiting in the channel (never blocks).

        Sets :attr:`closed` when the channel was shut and is empty.
        """
        taken: List[Handed] = []
        for _ in range(limit):
            try:
                data, fds = self._receive()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.closed = True
                break
            if not data and not fds:
                self.closed = True  # shut (full stop) and drained
                break
            if not fds:
                continue
            for extra in fds[1:]:  # never sent by us; do not leak them
                _close_quietly(extra)
            if not data:
                data = b"\x00"
            taken.append(Handed(fds[0], decode_peer(data[1:]), data[0]))
        return taken

    def _receive(self) -> Tuple[bytes, List[int]]:
        """One message and its descriptors, without waiting (not ``socket.recv_fds``:
        before Python 3.12 it ignores its flags, and would block)."""
        fds = array.array("i")
        data, ancdata, _flags, _addr = self.recv_sock.recvmsg(
            MESSAGE_MAX, socket.CMSG_SPACE(MAX_FDS * fds.itemsize), RECV_FLAGS)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - (len(payload) % fds.itemsize)])
        return data, list(fds)

    def is_open(self) -> bool:
        """False once the master shut the channel for a full stop (one poll, no wait)."""
        if self.closed:
            return False
        probe = select.poll()
        probe.register(self.send_sock.fileno(), select.POLLOUT)
        for _fd, ev in probe.poll(0):
            if ev & (select.POLLHUP | select.POLLERR):
                self.closed = True
                return False
        return True

    def shut(self) -> None:
        """A full stop: no more hand-offs, in every process that holds the pair."""
        try:
            self.send_sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.closed = True

    def close(self) -> None:
        self.send_sock.close()
        self.recv_sock.close()


def channel_for(threads: int, passed: Optional[List[int]]) -> Optional[HandoffChannel]:
    """The master's channel: the one a previous image passed across its re-exec (so the
    old generation hands its connections to the new one), or a new one.

    None for threaded workers (``workers.threads`` > 1), whose loop takes no connection
    from it; a passed channel is then shut, so that an old single-thread generation
    closes its idle connections as on a stop instead of handing them to nobody.
    """
    adopted = HandoffChannel.from_fds(passed) if passed else None
    if threads > 1:
        if adopted is not None:
            adopted.shut()
            adopted.close()
        return None
    if adopted is not None and adopted.is_open():
        return adopted
    if adopted is not None:
        adopted.close()
    return HandoffChannel.create()


class Watchdog:
    """A thread in the worker that lets go of idle connections during a long request.

    ``lock`` is held by the worker's main thread except while the app runs; ``calls`` is a
    counter the main thread bumps before each app call; ``release_idle`` hands off every
    movable connection except the one being served and returns how many it had to keep.
    Every ``tick`` seconds the watchdog tries the lock: it succeeds only while the app
    runs, and if the counter is the one it saw at the previous tick, the same request has
    run for at least one tick.
    """

    def __init__(self, lock: Any, calls: Callable[[], int],
                 release_idle: Callable[[], int], tick: float = HANDOFF_AFTER) -> None:
        self.lock = lock
        self.calls = calls
        self.release_idle = release_idle
        self.tick = tick
        self.thread = threading.Thread(target=self._run, name="fcgi-handoff", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        seen = -1
        done_for = -1
        sleep = time.sleep
        lock = self.lock
        while True:
            sleep(self.tick)
            if not lock.acquire(False):
                seen = -1  # the main thread is outside the app
                continue
            try:
                calls = self.calls()
                if calls == seen and calls != done_for:
                    if self.release_idle() == 0:
                        done_for = calls
                seen = calls
            finally:
                lock.release()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
