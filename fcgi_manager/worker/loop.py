"""A worker: the FastCGI responder loop around the WSGI app, in a forked child.

One thread, one ``epoll``. It watches the listening socket (``EPOLLEXCLUSIVE``, so one
connection wakes one worker), the pipe whose other end only the master holds (EOF = the
master died: finish and exit), its signal wakeup pipe, and every connection it holds that
is not running a request. The loop is assembled from parts the threaded loop
(``threaded``) holds too:

* :class:`~.conntable.ConnTable` -- the connections and the epoll: **input never blocks
  the worker** (bytes are read with ``MSG_DONTWAIT`` semantics and fed to the sans-I/O
  parser; an incomplete request stays parked with a deadline, so a slow-drip client costs
  a descriptor, never a worker), **keep-conn without pinning** (a kept connection goes
  back into the epoll set beside the listener; at most ``max_idle_connections`` are
  held), and **bounds** (``MAX_UNFINISHED``, read deadlines, EMFILE back-off).
* :class:`~.responder.Responder` -- one request: records in, the app or the worker's
  own answer (ping, status, 413, 503), records out. Only the app and the response block:
  writes are bounded by ``SO_SNDTIMEO`` (``write_timeout``).
* :class:`~.handoff.HandoffClient` -- idle kept connections move to sibling workers when
  this worker's request has run a few milliseconds (a watchdog thread does it while the
  app runs) and when it retires (recycle, scale-down, old generation of a reload); it
  takes theirs the same way, wake-one, like the listener.
* :class:`~.life.WorkerLife` -- signals, notes to the master, heartbeat, recycling.

Both loops get these from :class:`~.parts.WorkerParts`, which also starts and ends the
loop. This loop runs the app inline: what it keeps is the order of things around one poll.
"""

from __future__ import annotations

import logging
import time
from typing import Any, List

from .connection import IDLE_CONN_TIMEOUT, Conn
from .conntable import EPOLLHUP
from .parts import WorkerParts
from .responder import Lane, Need, Result

log = logging.getLogger("fcgi_manager.worker")


class Worker:
    """The single-thread responder loop of one worker process (built and run in the
    child)."""

    def __init__(self, parts: WorkerParts) -> None:
        self.parts = parts
        self.graceful_timeout = parts.config.workers.graceful_timeout
        self.life = parts.life
        self.table = parts.table
        self.table.on_readable = self._readable
        self.responder = parts.responder
        client = self.client = parts.client
        errors, environ = parts.app_streams()
        self.lane = Lane(parts.slot, errors, environ, parts.life.access,
                         enter=client.app_enter if client is not None else None,
                         leave=client.app_leave if client is not None else None)

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        return self.parts.run(self._loop)

    def _loop(self) -> None:
        life = self.life
        table = self.table
        ep = table.epoll
        conns = table.conns
        listen_fd = table.listen_fd
        access = life.access
        client = self.client
        stopping_turn = self.parts.stopping_turn
        on_other = self.parts.on_other
        housekeep = self.parts.housekeep
        poll_deadline = 0.0
        while True:
            if client is not None and client.released:
                client.close_released()
            if life.stopping:
                stopping_turn(time.monotonic())
                # Fresh connections (accepted, request not here yet) and requests in
                # progress are owed an answer: wait for them too.
                if not conns:
                    return
                if not poll_deadline:
                    poll_deadline = time.monotonic() + self.graceful_timeout
                elif time.monotonic() > poll_deadline:
                    return
            timeout = (0.1 if life.stopping else 1.0) if (
                conns or life.stopping or table.resume_accept_at) else life.heartbeat_every
            if table.resume_accept_at:
                timeout = table.backoff_timeout(timeout)
            try:
                events = ep.poll(timeout)
            except InterruptedError:
                continue
            if not events:
                life.idle_beat()
            for fd, ev in events:
                if fd == listen_fd:
                    if table.accepting:
                        table.accept()
                    continue
                conn = conns.get(fd)
                if conn is not None:
                    if ev & EPOLLHUP and conn.last_used and not conn.mid_request():
                        # The web server closed a kept connection between two requests
                        # (nginx does for each one past its keepalive cache): no read to
                        # find the EOF (unix sockets report the close as HUP).
                        table.close(conn)
                    else:
                        self._readable(conn)
                else:
                    on_other(fd)
            if conns or table.resume_accept_at:
                now = time.monotonic()
                if now >= table.next_sweep or table.resume_accept_at:
                    housekeep(now)  # busy with connections: the sweep is the heartbeat
            if not events and access is not None and access.pending:
                access.flush_due(time.monotonic())  # idle: write what waits (busy: end() does)

    # -- one connection -------------------------------------------------------------------

    def _readable(self, conn: Conn) -> None:
        """Read what ``conn`` has (epoll said so, or it was just accepted) and act on it."""
        events = self.table.read(conn)
        if events is not None and self._handle_events(conn, events):
            self.table.park(conn)

    def _handle_events(self, conn: Conn, events: List[Any]) -> bool:
        """Act on parsed events, serving each complete request inline; False if the
        connection left (closed or handed on)."""
        while True:
            need = self.responder.receive(conn, events)
            if need is Need.MORE:
                return True
            if need is Need.CLOSE or not self._serve(conn):
                if need is Need.CLOSE:
                    self.table.close(conn)
                return False
            if not conn.pending:
                return True
            events, conn.pending = conn.pending, []

    def _serve(self, conn: Conn) -> bool:
        """Run the complete request on ``conn``; False if ``conn`` left the table."""
        result = self.responder.respond(conn, self.lane)
        life = self.life
        table = self.table
        if result is not Result.KEEP:
            table.close(conn)
            if result is Result.CLOSE:
                life.served += 1
                life.check_recycle()
            return False
        conn.last_used = now = time.monotonic()
        conn.deadline = now + IDLE_CONN_TIMEOUT
        life.served += 1
        if life.max_requests or life.max_memory:
            life.check_recycle()
        keep = conn.parser.keep_conn
        if not keep or life.stopping:
            client = self.client
            if keep and client is not None and client.hand_on_at_stop(conn, life.master_gone):
                return conn.fd in table.conns  # handed on, or kept for another try
            table.close(conn)  # while stopping: FIN right behind END_REQUEST
            return False
        if len(table.conns) > table.max_idle:
            table.cap_idle()
            if conn.fd not in table.conns:
                return False
        return True
