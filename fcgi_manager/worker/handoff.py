"""Handing idle kept connections from one worker to another (SCM_RIGHTS).

nginx reuses its cached upstream connections most recently used first, so it keeps sending
requests on the connections a worker holds even while that worker runs a slow request, or
is about to exit. A kept connection that is idle *between* requests can move to another
process without losing a byte: whatever nginx already wrote stays in the kernel's receive
buffer and is read by whoever holds the descriptor next.

The master creates one ``SOCK_SEQPACKET`` socket pair per generation, before it forks
that generation's first worker (a reload's new image creates the new generation's after
its exec, so no process of an older generation ever holds it). A worker that lets go of
a connection sends its descriptor as one message on the *send* end and forgets it; every
worker of the generation that can serve watches the *receive* end in its epoll with
``EPOLLEXCLUSIVE`` (wake-one, like the listening socket) and takes what arrives.
``EAGAIN`` (the queue is full) means: keep the connection and try again later.

What arrives is data from a peer, not from the manager: any process holding the pair (a
process the app forked, the zygote) can send on it. So the receive end has
``SO_PASSCRED`` and a worker's :class:`Gate` admits a descriptor only if the kernel's
credentials name a current worker of the channel's generation (its pid in the scoreboard,
our uid; or a sender of our uid that has exited since: a worker killed after it let go of
a connection), and the descriptor is a stream socket of the listener's family, accepted on the
listener's address (``getsockname``), whose peer (``getpeername``: never the message's
word) passes ``listen.allowed_clients``. Anything else is closed unread and logged.

A reload's new workers also take from the old generation's channel (the master gives
them its receive end only, never the send end), so the old workers, told to stop, hand
their idle kept connections on instead of closing them while nginx may be writing the
next request on one (nginx would log "Connection reset by peer" and fail it). The gate
on that channel admits only the old generation's own workers: the kernel's credentials
must name a pid the scoreboard lists in that generation -- or one it listed when the new
worker started and that has exited since -- with the uid that generation's workers run
as. A process the old app left behind is not in the scoreboard and is refused. An older
generation that nobody takes from has its channel shut when it is told to stop: its
workers close their idle kept connections rather than queue them for nobody. When a
generation's last worker is gone the master shuts its channel, drains what is left in
the queue (closing it; the channel the new workers take from gets a second first) and
closes the pair.

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
import logging
import os
import select
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, List, Optional, Tuple

from ..wire.protocol import DEFAULT_MAX_PARAMS
from .connection import IDLE_CONN_TIMEOUT, Conn

if TYPE_CHECKING:
    from .conntable import ConnTable

log = logging.getLogger("fcgi_manager.handoff")

HANDOFF_AFTER = 0.005  # a request older than this (5-10 ms) lets go of its idle siblings
MESSAGE_MAX = 512  # one hand-off message: its flags (a longer one is cut)
TAKE_BATCH = 8  # connections taken per wakeup: the rest wake another idle worker
MAX_FDS = 4  # room for descriptors in one message (we send one; more are closed)
SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
RECV_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_CMSG_CLOEXEC", 0)
UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid
SO_PASSCRED = getattr(socket, "SO_PASSCRED", 16)
SCM_CREDENTIALS = getattr(socket, "SCM_CREDENTIALS", 2)

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


class Gate:
    """A worker's check of what the channel brings (see the module docstring): whose it
    is, and what it is. Set on the worker's channel by the process that forks it."""

    def __init__(self, board: Any, generation: int, uid: int, client_filter: Any,
                 listener: Optional[socket.socket], ended: bool = False) -> None:
        self.board = board  # scoreboard.Scoreboard: (pid, generation) of every slot
        self.generation = generation
        self.uid = uid
        self.filter = client_filter
        self.family = listener.family if listener is not None else None
        self.local = _local_name(listener) if listener is not None else None
        self.known: Dict[int, int] = {}  # sender pid -> its slot, checked again at each use
        # A generation that has ended (a reload's old one, whose channel the new workers
        # take from) gains no worker any more: its members are known now, and a sender
        # that has exited since is admitted only if it was one of them.
        self.members: Optional[FrozenSet[int]] = (
            frozenset(pid for pid, gen in map(board.ident, range(board.slots))
                      if gen == generation and pid > 0) if ended else None)

    def sender_ok(self, pid: int, uid: int) -> bool:
        """The kernel's word on the sender: our uid, and a current worker of our
        generation per the scoreboard (its slot is read again each time)."""
        if uid != self.uid or pid <= 0:
            return False
        board = self.board
        slot = self.known.get(pid)
        if slot is not None and board.ident(slot) == (pid, self.generation):
            return True
        self.known.pop(pid, None)
        for slot in range(board.slots):
            if board.ident(slot) == (pid, self.generation):
                self.known[pid] = slot
                return True
        # A worker killed right after it handed a connection on (its slot is its
        # replacement's now): the kernel says it had our uid, and it is gone. Any process
        # still alive that is not a worker -- one the app left behind -- is refused.
        if self.members is not None and pid not in self.members:
            return False
        return _gone(pid)

    def peer_of(self, fd: int) -> Optional[Any]:
        """The peer of ``fd`` if it is a connection accepted on our listener whose peer the
        client filter allows; None if it is anything else."""
        try:
            sock = socket.socket(fileno=fd)  # reads SO_DOMAIN, SO_TYPE, SO_PROTOCOL
        except OSError:
            return None  # not a socket
        try:
            if sock.type != socket.SOCK_STREAM or sock.family != self.family:
                return None
            peer = sock.getpeername()  # ENOTCONN for a listening or unconnected socket
            if _local_name(sock) != self.local:
                return None
        except OSError:
            return None
        finally:
            sock.detach()
        if self.filter is not None and not self.filter.allows(peer):
            return None
        return peer


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _local_name(sock: socket.socket) -> Any:
    """What a connection accepted on ``sock`` shares with it: the port (TCP; the address
    differs when bound to a wildcard) or the path (unix)."""
    try:
        name = sock.getsockname()
    except OSError:
        return None
    return name[1] if isinstance(name, tuple) else name


class HandoffChannel:
    """The shared socket pair: send on one end, take from the other (any process)."""

    def __init__(self, send_sock: socket.socket, recv_sock: socket.socket) -> None:
        self.send_sock = send_sock
        self.recv_sock = recv_sock
        self.closed = False
        self.gate: Optional[Gate] = None  # a worker's: who may send, what may arrive
        self.uid = -1  # the master's note: the uid its generation's workers run as

    @classmethod
    def create(cls) -> HandoffChannel:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Every message then carries the sender's pid and uid, filled in by the kernel.
        b.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)
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
        payload = bytes((flags,))  # no address: the taker asks the kernel (Gate)
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
        gate = self.gate
        for _ in range(limit):
            try:
                data, fds, cred = self._receive()
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
            peer: Any = ""
            if gate is not None:
                pid, uid = cred
                if not gate.sender_ok(pid, uid):
                    log.warning("refused a connection handed on by pid %d (uid %d): not a "
                                "worker of this generation", pid, uid)
                    _close_quietly(fds[0])
                    continue
                peer = gate.peer_of(fds[0])
                if peer is None:
                    log.warning("refused a descriptor handed on by pid %d: not a connection "
                                "accepted on our socket from an allowed client", pid)
                    _close_quietly(fds[0])
                    continue
            taken.append(Handed(fds[0], peer, data[0]))
        return taken

    def _receive(self) -> Tuple[bytes, List[int], Tuple[int, int]]:
        """One message, its descriptors and its sender's (pid, uid) from the kernel, without
        waiting (not ``socket.recv_fds``: before Python 3.12 it ignores its flags, and
        would block). (-1, -1) when no credentials came (a pair without SO_PASSCRED)."""
        fds = array.array("i")
        data, ancdata, _flags, _addr = self.recv_sock.recvmsg(
            MESSAGE_MAX, socket.CMSG_SPACE(MAX_FDS * fds.itemsize)
            + socket.CMSG_SPACE(UCRED.size), RECV_FLAGS)
        cred = (-1, -1)
        for level, kind, payload in ancdata:
            if level != socket.SOL_SOCKET:
                continue
            if kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - (len(payload) % fds.itemsize)])
            elif kind == SCM_CREDENTIALS and len(payload) >= UCRED.size:
                pid, uid, _gid = UCRED.unpack_from(payload)
                cred = (pid, uid)
        return data, list(fds), cred

    def drain(self) -> int:
        """Close every connection still queued (the generation ended: nobody takes them);
        how many. Never blocks."""
        closed = 0
        while True:
            try:
                data, fds, _ = self._receive()
            except OSError:
                return closed
            if not data and not fds:
                return closed
            for fd in fds:
                _close_quietly(fd)
                closed += 1

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


class HandoffClient:
    """A worker's side of the hand-off: it parks (takes what siblings let go of), lets go
    of its own idle connections behind a slow request or once stopping, and hands a kept
    connection on right after its last response when it stops.

    It works on the worker's :class:`~.conntable.ConnTable` (its connections and epoll).
    ``previous`` is a reload's old channel, taken from only. The single-thread loop also
    gets a :class:`Watchdog` (:meth:`app_enter`/:meth:`app_leave` around the app call);
    the threaded loop's main thread is never in the app: it offers a kept connection
    whose next request arrives while no app thread is free (:meth:`offer`) itself.
    """

    def __init__(self, table: ConnTable, channel: HandoffChannel,
                 previous: Optional[HandoffChannel], ondemand: bool,
                 watchdog: bool = True) -> None:
        self.table = table
        self.channel = channel
        self.previous = previous  # taken from, never sent on
        self.ondemand = ondemand  # no sibling may be left to take what we let go of
        self.watching = False
        self.hand_on: Optional[bool] = None  # decided once stopping: hand on, or close
        self.lock: Optional[Any] = None  # with the watchdog, once a kept connection parks
        self.app_calls = 0
        self.serving: Optional[Conn] = None
        self.released: List[int] = []  # numbers of handed-off fds, now placeholders
        self.placeholder = -1
        if watchdog:
            table.kept_parked = self._start_watchdog

    def start(self) -> None:
        """Watch the channels (wake-one, like the listener)."""
        self.placeholder = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.watch(True)

    def watch(self, on: bool) -> None:
        """Take from the channels, or not (a threaded worker with no free thread)."""
        if on == self.watching:
            return
        self.watching = on
        ep = self.table.epoll
        for channel in (self.channel, self.previous):
            if channel is None:
                continue
            try:
                if on:
                    ep.register(channel.recv_fd, _WAKE_ONE)
                else:
                    ep.unregister(channel.recv_fd)
            except (OSError, ValueError):
                pass

    def channel_of(self, fd: int) -> Optional[HandoffChannel]:
        """The channel whose receive end is ``fd``, if any (an epoll event's owner)."""
        if fd == self.channel.recv_fd:
            return self.channel
        previous = self.previous
        if previous is not None and fd == previous.recv_fd:
            return previous
        return None

    # -- taking ---------------------------------------------------------------------------

    def take(self, channel: HandoffChannel) -> None:
        """Take connections a sibling (or an old generation's worker) let go of; their
        next request may already be here: they are parked (level-triggered, it shows)."""
        table = self.table
        now = time.monotonic()
        for handed in channel.take():
            conn = Conn(handed.fd, handed.peer, DEFAULT_MAX_PARAMS)
            conn.timed = bool(handed.flags & FLAG_SNDTIMEO)
            if handed.flags & FLAG_KEPT:
                conn.last_used = now
                conn.deadline = now + IDLE_CONN_TIMEOUT
            else:
                conn.deadline = now + table.read_timeout
            table.conns[conn.fd] = conn
            table.park(conn)
        if channel.closed:
            self._stop_taking(channel)

    def _stop_taking(self, channel: HandoffChannel) -> None:
        try:
            self.table.epoll.unregister(channel.recv_fd)
        except (OSError, ValueError):
            pass
        if channel is self.previous:  # the old generation is gone: let go of it
            channel.close()
            self.previous = None

    # -- letting go -----------------------------------------------------------------------

    def release_idle(self, serving: Optional[Conn]) -> int:
        """Hand every connection that is between requests (except ``serving``) to the
        siblings; return how many movable ones stay here (the queue is full).

        Called by the watchdog while the app runs (the main thread then touches no
        connection but ``serving``), or by the main thread.
        """
        movable = [c for c in self.table.conns.values()
                   if c is not serving and not c.pending and not c.mid_request()]
        for i, conn in enumerate(movable):
            result = self.offer(conn)
            if result != SENT:
                return 0 if result == CLOSED else len(movable) - i
        return 0

    def offer(self, conn: Conn) -> str:
        """Offer one connection between two requests to a sibling: SENT (it left the
        table), FULL or CLOSED (it stays)."""
        flags = (FLAG_KEPT if conn.last_used else 0) | (FLAG_SNDTIMEO if conn.timed else 0)
        result = self.channel.offer(conn.fd, conn.peer, flags)
        if result == SENT:
            self._let_go(conn)
        return result

    def _let_go(self, conn: Conn) -> None:
        """Forget ``conn`` once handed off, and drop our reference to its socket now.

        Now, not once the app returns: until the last reference is gone, a close by the
        worker that took it would not reach the web server. Unregistered first: epoll
        watches the socket, not the number, and the socket lives on elsewhere. The number
        stays taken by a placeholder until the main thread closes it between two polls
        (:meth:`close_released`), so that an epoll event already fetched for it can
        never be mistaken for a new connection's.
        """
        fd = conn.fd
        del self.table.conns[fd]
        try:
            self.table.epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        conn.registered = False
        os.dup2(self.placeholder, fd, inheritable=False)
        self.released.append(fd)

    def close_released(self) -> None:
        """Free the numbers of the connections handed off (see :meth:`_let_go`)."""
        fds, self.released = self.released, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    # -- stopping -------------------------------------------------------------------------

    def hands_on(self, master_gone: bool) -> bool:
        """Once stopping: hand idle connections on (recycle, scale-down, reload), or keep
        them and close them once idle (a full stop shuts the channel; the master is
        gone; ondemand, where no sibling may be left to take them)."""
        if self.hand_on is None:
            self.hand_on = bool(not master_gone and not self.ondemand
                                and self.channel.is_open())
            if self.hand_on:
                self.watch(False)
                if self.previous is not None:
                    self.previous.close()
                    self.previous = None
        return self.hand_on

    def hand_on_at_stop(self, conn: Conn, master_gone: bool) -> bool:
        """Stopping, right after END_REQUEST on a kept connection: False = close it as
        usual; True = hand it on: done (it left the table), or the queue is full and it
        stays, parked, to be tried again (:meth:`release_idle`)."""
        if conn.pending or not self.hands_on(master_gone):
            return False
        return self.offer(conn) != CLOSED

    # -- the watchdog (single-thread loop) ------------------------------------------------

    def _start_watchdog(self) -> None:
        """The first kept connection parked: from now on there are idle connections to hand
        off while the app runs. Until then -- keep-conn off, where a connection is parked
        only for the moment its request takes to arrive -- no thread wakes every 5 ms for
        nothing (measured: 0.3 clock_nanosleep and 0.1 futex per request, and its
        memory). Called by the main thread outside the app call."""
        self.table.kept_parked = None
        lock = threading.Lock()
        lock.acquire()  # held by this thread except around the app call
        self.lock = lock
        Watchdog(lock, lambda: self.app_calls,
                 lambda: self.release_idle(self.serving)).start()

    def app_enter(self, conn: Conn) -> None:
        """The app is about to run for ``conn``: the watchdog may now move the others."""
        lock = self.lock
        if lock is not None:
            self.serving = conn
            self.app_calls += 1
            lock.release()

    def app_leave(self) -> None:
        lock = self.lock
        if lock is not None:
            lock.acquire()  # waits only if the watchdog is handing off at this instant
            self.serving = None


_WAKE_ONE = select.EPOLLIN | getattr(select, "EPOLLEXCLUSIVE", 0)
