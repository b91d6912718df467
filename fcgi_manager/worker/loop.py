"""A worker: the FastCGI responder loop around the WSGI app, in a forked child.

One thread, one ``epoll``. It watches the listening socket (``EPOLLEXCLUSIVE``, so one
connection wakes one worker), the pipe whose other end only the master holds (EOF = the
master died: finish and exit), its signal wakeup pipe, and every connection it holds that
is not running a request. The loop is assembled from parts the threaded loop
(``threaded.py``) holds too:

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
* :class:`~.worker_life.WorkerLife` -- signals, notes to the master, heartbeat, recycling.

This loop runs the app inline: what it keeps is the order of things around one poll.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, List, Optional, Tuple

from ..scoreboard import SlotWriter
from ..sockets import ClientFilter
from ..wire import notify
from ..wire.states import WorkerState
from .connection import IDLE_CONN_TIMEOUT, Conn
from .conntable import EPOLLHUP, ConnTable
from .handoff import HandoffChannel, HandoffClient
from .life import (
    EXIT_OK,
    WorkerLife,
    freeze_setup,
)
from .responder import Lane, Need, Responder, Result
from .wsgi import EnvironBuilder, ErrorStream

log = logging.getLogger("fcgi_manager.worker")

StatusPage = Callable[[str], Tuple[str, bytes, str]]


def app_error_line(line: str) -> None:
    log.warning("wsgi.errors: %s", line)


class Worker:
    """The single-thread responder loop of one worker process (built and run in the
    child)."""

    def __init__(
        self,
        *,
        app: Callable[..., Any],
        config: Any,
        listener: Any,
        slot: SlotWriter,
        worker_id: int,
        master_fd: int,
        notify_fd: int,
        max_requests: int,
        status_page: Optional[StatusPage] = None,
        client_filter: Optional[ClientFilter] = None,
        handoff: Optional[HandoffChannel] = None,
        previous: Optional[HandoffChannel] = None,
    ) -> None:
        self.slot = slot
        self.master_fd = master_fd
        self.graceful_timeout = config.workers.graceful_timeout
        life = self.life = WorkerLife(config, slot, notify_fd, max_requests, worker_id)
        table = self.table = ConnTable(config, listener, client_filter,
                                       lambda: life.stopping, slot.count_backoff)
        table.on_readable = self._readable
        self.responder = Responder(app, config, slot, status_page, max_conns=table.max_idle)
        self.client: Optional[HandoffClient] = None
        if handoff is not None:
            self.client = HandoffClient(table, handoff, previous,
                                        config.workers.mode == "ondemand")
        errors = ErrorStream(app_error_line)
        environ = EnvironBuilder(errors, True, config.app.script_name, config.app.fix_root_url)
        client = self.client
        self.lane = Lane(slot, errors, environ, life.access,
                         enter=client.app_enter if client is not None else None,
                         leave=client.app_leave if client is not None else None)

    @property
    def stopping(self) -> bool:
        return self.life.stopping

    @property
    def exit_code(self) -> int:
        return self.life.exit_code

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        life = self.life
        life.install_signals()
        self.table.open(self.master_fd, life.wakeup_r)
        if self.client is not None:
            self.client.start()
        freeze_setup()
        self.slot.set_state(WorkerState.IDLE)
        life.notify(notify.READY)
        try:
            self._loop()
        finally:
            self._shutdown()
        return life.exit_code

    def _loop(self) -> None:
        life = self.life
        table = self.table
        ep = table.epoll
        conns = table.conns
        listen_fd = table.listen_fd
        access = life.access
        client = self.client
        poll_deadline = 0.0
        while True:
            if client is not None and client.released:
                client.close_released()
            if life.stopping:
                if table.accepting:
                    table.stop_accepting(take_queue=life.exit_code == EXIT_OK)
                self._retire_idle_kept(time.monotonic())
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
                elif fd == self.master_fd:
                    ep.unregister(fd)
                    life.on_master_gone()
                elif fd == life.wakeup_r:
                    life.on_wakeup()
                elif client is not None:
                    channel = client.channel_of(fd)
                    if channel is not None:
                        client.take(channel)
            if conns or table.resume_accept_at:
                now = time.monotonic()
                if table.resume_accept_at and now >= table.resume_accept_at:
                    table.resume_accepting()
                if now >= table.next_sweep:
                    self.slot.beat(now)  # busy with connections: the sweep is the heartbeat
                    table.sweep(now)
            if not events and access is not None and access.pending:
                access.flush_due(time.monotonic())  # idle: write what waits (busy: end() does)

    def _retire_idle_kept(self, now: float) -> None:
        client = self.client
        if client is not None and client.hands_on(self.life.master_gone):
            client.release_idle(None)
        self.table.close_idle_kept(now)

    def _shutdown(self) -> None:
        if self.client is not None:
            self.client.close_released()
        for conn in list(self.table.conns.values()):
            if conn.mid_request():
                log.warning("closing a connection with an unfinished request at exit")
            self.table.close(conn)
        self.slot.set_state(WorkerState.STOPPING)
        if self.life.access is not None:
            self.life.access.close()

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
