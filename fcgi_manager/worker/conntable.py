"""The connections a worker holds, and the epoll that watches them: accepting (paced, and
backed off when out of descriptors), reading and parsing, parking until the next bytes,
the caps on idle and unfinished connections, deadlines, and closing without a reset.

Both worker loops hold one :class:`ConnTable` and run their own ``epoll.poll``; what a
loop does with a connection's events (run the app inline, or give it to an app thread) is
the loop's business. README: "Keep-conn without pinning" and "Limits" for the story.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import socket
import struct
import time
from typing import Any, Callable, Dict, List, Optional

from ..errors import ProtocolError
from ..wire.protocol import DEFAULT_MAX_PARAMS
from .connection import RECV_SIZE, Conn
from .nbaccept import nonblocking_acceptor
from .responder import peer_name

ACCEPT_BACKOFF_FIRST = 0.005  # seconds without accepting after EMFILE; doubled while it lasts
ACCEPT_BACKOFF_MAX = 0.2
STOP_IDLE_GRACE = 1.0  # seconds an idle kept connection stays open once stopping
FIRST_READ_WAIT = 0.01  # seconds the read right after accept may wait for the request
MAX_UNFINISHED = 128  # connections per worker still sending their request
EPOLLIN = select.EPOLLIN
EPOLLHUP = select.EPOLLHUP
WAKE_ONE = EPOLLIN | getattr(select, "EPOLLEXCLUSIVE", 0)

log = logging.getLogger("fcgi_manager.worker")


class ConnTable:
    """A worker's connections and its epoll (see the module docstring).

    ``on_readable(conn)`` is the loop's: called for a fresh connection right after accept.
    ``kept_parked`` is called once, the first time a kept connection is parked (the
    hand-off watchdog starts then), and ``stopping()`` says whether the worker stops.
    """

    def __init__(self, config: Any, listener: socket.socket, client_filter: Any,
                 stopping: Callable[[], bool], count_backoff: Callable[[], None],
                 paced: bool = False) -> None:
        w = config.workers
        self.listener = listener
        self.listen_fd = listener.fileno()
        self.filter = client_filter  # parsed by the master at start (see ClientFilter)
        self.write_timeout = w.write_timeout
        self.read_timeout = w.read_timeout
        self.max_idle = max(1, w.max_idle_connections)
        self.stopping = stopping
        self.count_backoff = count_backoff  # the slot's counter (status: accept_backoffs)
        self.paced = paced  # the loop decides when the listener is watched (threads)
        self.conns: Dict[int, Conn] = {}
        self.epoll: Any = None
        self.accepting = False
        self.on_readable: Callable[[Conn], None] = lambda conn: None
        self.kept_parked: Optional[Callable[[], None]] = None
        self.next_sweep = 0.0
        self.resume_accept_at = 0.0
        self.stop_began = 0.0
        self._emfile_logged = 0.0
        self._backoff_delay = 0.0
        self._backoff_last = 0.0
        self._unix = False
        self._accept_nb: Optional[Callable[[], int]] = None
        self._probe = select.poll()

    def open(self, *fds: int) -> Any:
        """Create the epoll, watching the listener (wake-one) and ``fds``."""
        self._set_timeouts()
        self.listener.setblocking(False)
        ep = self.epoll = select.epoll()
        ep.register(self.listen_fd, WAKE_ONE)
        self.accepting = True
        for fd in fds:
            ep.register(fd, EPOLLIN)
        return ep

    def _set_timeouts(self) -> None:
        """Timeouts set once on the listener, inherited by every accepted socket (Linux).

        ``SO_SNDTIMEO`` = ``write_timeout`` bounds each response write (a client that
        stops reading). ``SO_RCVTIMEO`` = ``FIRST_READ_WAIT`` bounds the one read that is
        not preceded by epoll readiness: the first one, right after ``accept``. nginx
        writes its request as soon as it connects, so that read almost always finds it;
        when it does not, the connection is parked in epoll instead of holding the worker.
        """
        def timeval(secs: float) -> bytes:
            return struct.pack("ll", int(secs), int((secs % 1) * 1e6))

        timeouts = [(socket.SO_SNDTIMEO, timeval(self.write_timeout)),
                    (socket.SO_RCVTIMEO, timeval(FIRST_READ_WAIT))]
        for option, value in timeouts:
            try:
                self.listener.setsockopt(socket.SOL_SOCKET, option, value)
            except OSError:
                pass
        # AF_UNIX sockets do not inherit them from the listener (only TCP does). Setting
        # them on every connection would cost three syscalls per request, so instead:
        # the first read is preceded by a zero-timeout poll (see accept), and the send
        # timeout is set on a connection only once it could block -- a write of 64 KiB
        # or more, or a second request on a kept connection (Conn.send).
        self._unix = self.listener.family == socket.AF_UNIX
        Conn.lazy_sndtimeo = timeouts[0][1] if self._unix else None
        Conn.write_timeout = self.write_timeout
        # Better still on unix sockets: accept them non-blocking (no probe, no SO_SNDTIMEO).
        self._accept_nb = nonblocking_acceptor(self.listen_fd) if self._unix else None

    def ready_now(self, fd: int) -> bool:
        """Has ``fd`` bytes to read right now? (select.poll register/unregister are not
        syscalls: this costs one poll().)"""
        probe = self._probe
        probe.register(fd, select.POLLIN)
        try:
            return bool(probe.poll(0))
        finally:
            probe.unregister(fd)

    # -- accepting ------------------------------------------------------------------------

    def accept(self, budget: int = 16, while_stopping: bool = False) -> None:
        # A bounded batch: serve what is queued, but come back to poll so that kept
        # connections with requests waiting are not starved by a stream of new ones.
        accept = self.listener._accept  # type: ignore[attr-defined]  # (fd, address): no socket object
        accept_nb = self._accept_nb
        for _ in range(budget):
            if not while_stopping and self.stopping():
                return
            try:
                if accept_nb is not None:
                    fd, peer = accept_nb(), ""
                else:
                    fd, peer = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._accept_error(exc)
                return
            if self.filter is not None and not self.filter.allows(peer):
                log.warning("refused a connection from %s: not in listen.allowed_clients",
                            peer[0] if isinstance(peer, tuple) else peer)
                os.close(fd)
                continue
            conn = Conn(fd, peer, DEFAULT_MAX_PARAMS)
            conn.deadline = time.monotonic() + self.read_timeout
            self.conns[conn.fd] = conn
            if accept_nb is not None:
                conn.timed = True  # non-blocking: writes wait with poll, never SO_SNDTIMEO
                self.on_readable(conn)  # EAGAIN parks it
            elif self._unix and not self.ready_now(fd):
                self.park(conn)  # no SO_RCVTIMEO on unix sockets: never read blind
            else:
                self.on_readable(conn)

    def _accept_error(self, exc: OSError) -> None:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            self._back_off_accepting(exc)
        elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
            log.warning("accept failed: %s", exc)

    def _back_off_accepting(self, exc: OSError) -> None:
        """Out of descriptors (or kernel memory): stop watching the listener instead of
        spinning on it, until one of our connections closes (:meth:`close`) or a short
        delay is over -- milliseconds, doubled while the error repeats (a fixed second
        left workers idle most of the time at the limit). Counted in status; logged once
        per worker with the limit to raise."""
        now = time.monotonic()
        self.count_backoff()
        if now - self._backoff_last > ACCEPT_BACKOFF_MAX:
            self._backoff_delay = ACCEPT_BACKOFF_FIRST
        else:
            self._backoff_delay = min(ACCEPT_BACKOFF_MAX, self._backoff_delay * 2)
        self._backoff_last = now
        if not self._emfile_logged:
            self._emfile_logged = now
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            log.error("cannot accept: %s (%d connections open, the open-files limit is "
                      "%d): raise manager.rlimit_files (or `ulimit -n`, LimitNOFILE=); accepting "
                      "resumes as soon as a connection closes, and the back-offs are "
                      "counted in status (accept_backoffs)", exc.strerror, len(self.conns),
                      soft)
        self._unwatch_listener()
        self.resume_accept_at = now + self._backoff_delay

    def backoff_timeout(self, timeout: float) -> float:
        """The poll timeout while accepting is paused: no later than its end."""
        left = max(0.0, self.resume_accept_at - time.monotonic())
        return left if timeout < 0 else min(timeout, left)

    def resume_accepting(self) -> None:
        """The back-off is over (a descriptor is free, or its delay ran out). A paced
        table watches the listener again when its loop says there is room (:meth:`pace`)."""
        self.resume_accept_at = 0.0
        if not self.paced and not self.stopping() and not self.accepting:
            self._watch_listener()

    def pace(self, room: bool) -> None:
        """Watch the listening socket only while there is room for a new request."""
        if room and not self.accepting and not self.stopping() and not self.resume_accept_at:
            self._watch_listener()
        elif not room and self.accepting:
            self._unwatch_listener()

    def _watch_listener(self) -> None:
        try:
            self.epoll.register(self.listen_fd, WAKE_ONE)
            self.accepting = True
        except (OSError, ValueError):
            pass

    def _unwatch_listener(self) -> None:
        try:
            self.epoll.unregister(self.listen_fd)
        except (OSError, ValueError):
            pass
        self.accepting = False

    def stop_accepting(self, take_queue: bool) -> None:
        """Leave the listening socket to the other workers (or the next generation).

        Kept connections are not closed here: nginx may be sending a request on one at
        this very moment, and closing it then makes nginx see a reset and fail that
        request (a POST is not retried). Instead, while stopping, each kept connection is
        handed on to a sibling, or serves the requests that come and is closed right after
        its END_REQUEST: the FIN follows the response at once, so nginx finds the
        connection closed when it goes to cache it and drops it (it checks a connection it
        caches for EOF). Kept connections that stay idle are closed after
        ``STOP_IDLE_GRACE`` seconds (:meth:`close_idle_kept`): nginx reuses its cached
        connections most recent first, so one that idle is the least likely to be picked.
        """
        self.stop_began = time.monotonic()
        self._unwatch_listener()
        # Take what is already queued, then let go of our copy of the listening socket:
        # when the last copy closes (a full stop), new connects are refused at once --
        # nginx then tries the next upstream cleanly, even for a POST -- instead of
        # waiting in a queue nobody serves and being reset when the workers exit.
        # A worker that leaves on its own (recycling) takes nothing more: the listening
        # socket stays open in the master, and its replacement takes the queue.
        if take_queue and self.resume_accept_at == 0.0:
            self.accept(budget=256, while_stopping=True)
        try:
            self.listener.close()
        except OSError:
            pass

    def close_idle_kept(self, now: float) -> None:
        """Stopping: close the kept connections idle for ``STOP_IDLE_GRACE`` (watched ones:
        one left unwatched has a request waiting for a thread)."""
        for conn in list(self.conns.values()):
            if conn.last_used and conn.registered and not conn.mid_request() and \
                    now - max(conn.last_used, self.stop_began) >= STOP_IDLE_GRACE:
                self.close(conn)

    # -- deadlines, reading, parking --------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Close connections past their deadline."""
        self.next_sweep = now + 1.0
        for conn in list(self.conns.values()):
            if conn.deadline and now > conn.deadline:
                if not conn.mid_request() and self.ready_now(conn.fd):
                    # Its request came while this worker was held (a long request, a
                    # stalled write): the lateness is ours. Closing it now, with the
                    # request unread, would reset the web server's connection; the next
                    # poll serves it. Only once: after a read it is mid-request.
                    conn.deadline = now + self.read_timeout
                    continue
                if conn.mid_request():
                    log.warning("dropped a connection that sent an incomplete request for "
                                "%.0f s (read timeout)", self.read_timeout)
                self.close(conn)

    def read(self, conn: Conn) -> Optional[List[Any]]:
        """What ``conn`` has to say (epoll said so, or it was just accepted), parsed; None
        if there was nothing yet (it is parked) or it ended (it is closed)."""
        try:
            data = os.read(conn.fd, RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            self.park(conn)
            return None
        except OSError:
            self.close(conn)
            return None
        if not data:
            if conn.mid_request():
                log.info("the web server closed a connection in the middle of a request")
            self.close(conn)
            return None
        try:
            return conn.parser.feed(data)
        except ProtocolError as exc:
            log.warning("closed a connection from %s: %s", peer_name(conn.peer), exc)
            self.close(conn)
            return None

    def park(self, conn: Conn) -> None:
        """Watch ``conn`` for its next bytes (a kept connection, or a request in progress)."""
        if self.kept_parked is not None and conn.last_used:
            self.kept_parked()
        if not conn.registered:
            try:
                self.epoll.register(conn.fd, EPOLLIN)
            except OSError:
                self.close(conn)
                return
            conn.registered = True
            if len(self.conns) > self.max_idle:
                self.cap_idle()
            if len(self.conns) > MAX_UNFINISHED:
                self._cap_unfinished()

    def unwatch(self, conn: Conn) -> None:
        """Take ``conn`` out of the table and the epoll set (another thread serves it)."""
        self.conns.pop(conn.fd, None)
        self.unregister(conn)

    def unregister(self, conn: Conn) -> None:
        """Stop watching ``conn`` (it stays in the table: its bytes wait in the kernel)."""
        if conn.registered:
            try:
                self.epoll.unregister(conn.fd)
            except (OSError, ValueError):
                pass
            conn.registered = False

    def cap_idle(self) -> None:
        """At most ``max_idle_connections`` idle kept connections: close the oldest.

        Called when a connection is first watched and each time one becomes idle again.
        Only kept connections that finished a request count as idle: a new one still
        waiting for its first bytes is never closed under its client.
        """
        idle = [c for c in self.conns.values() if c.last_used and not c.mid_request()]
        if len(idle) > self.max_idle:
            idle.sort(key=lambda c: c.last_used)
            for conn in idle[: len(idle) - self.max_idle]:
                self.close(conn)

    def _cap_unfinished(self) -> None:
        """At most ``MAX_UNFINISHED`` connections still sending a request: close the oldest.

        Each holds a parser buffer and maybe a spooled body until ``read_timeout``; a
        client that opens hundreds and sends slowly must cost a bounded amount. The oldest
        is the one whose request began first (its read deadline is the earliest).
        """
        unfinished = [c for c in self.conns.values()
                      if c.registered and (c.mid_request() or not c.last_used)]
        excess = len(unfinished) - MAX_UNFINISHED
        if excess <= 0:
            return
        unfinished.sort(key=lambda c: c.deadline)
        for conn in unfinished[:excess]:
            self.close(conn)
        log.warning("closed %d connection(s) still sending a request: more than %d "
                    "unfinished in this worker (slow or stalled clients?)",
                    excess, MAX_UNFINISHED)

    def close(self, conn: Conn) -> None:
        """Close without a reset.

        A close with unread bytes in the receive queue makes the kernel send RST, which
        nginx reports as "reset by peer". After a complete request nothing is unread (the
        parser consumed the request up to its last STDIN record), so a plain ``close``
        sends the same FIN as ``shutdown`` would, for one syscall. A connection that ends
        mid-request gets ``shutdown(SHUT_WR)``, then what the peer has sent is drained
        without waiting, then ``close``. Closing the fd also removes it from
        the epoll set: no ``unregister`` needed.
        """
        self.conns.pop(conn.fd, None)
        if self.resume_accept_at:
            self.resume_accepting()  # a descriptor is free again (after EMFILE)
        fd = conn.fd
        if conn.mid_request():
            sock = socket.socket(fileno=fd)
            try:
                sock.shutdown(socket.SHUT_WR)
                for _ in range(16):
                    if not sock.recv(65536, socket.MSG_DONTWAIT):
                        break
            except OSError:
                pass
            sock.close()
            return
        try:
            os.close(fd)
        except OSError:
            pass
