"""What both worker loops are built from, and what they do alike outside the request path.

The one-thread loop (:mod:`.loop`) and the threaded loop (:mod:`.threaded`) run different
loops around the same parts: the process's life (:class:`~.life.WorkerLife`), the
connection table (:class:`~.conntable.ConnTable`), the request core
(:class:`~.responder.Responder`) and, with hand-off, the hand-off client
(:class:`~.handoff.HandoffClient`). Building them, starting and ending the loop, what a
stopping worker does at each turn, the descriptors that are neither the listener nor a
connection, the housekeeping of a busy loop and the app's error stream are the same for
both loops, so they are written here once. Nothing here runs per request: each loop
keeps its own hot path inline and calls in here only around it.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Sequence, Tuple

from ..scoreboard import SlotWriter, ThreadSlotWriter
from ..sockets import ClientFilter
from ..wire import notify
from ..wire.states import WorkerState
from .conntable import ConnTable
from .handoff import HandoffChannel, HandoffClient
from .life import EXIT_OK, WorkerLife, freeze_setup
from .responder import Responder
from .wsgi import EnvironBuilder, ErrorStream

log = logging.getLogger("fcgi_manager.worker")

StatusPage = Callable[[str], Tuple[str, bytes, str]]


def app_error_line(line: str) -> None:
    log.warning("wsgi.errors: %s", line)


class WorkerParts:
    """The parts of one worker process, built in the child; ``thread_slots`` (the thread
    entries the master reserved for this slot) make them the threaded loop's: a paced
    listener, a request per thread, no hand-off watchdog (the main thread hands on)."""

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
        thread_slots: Sequence[ThreadSlotWriter] = (),
    ) -> None:
        threads = len(thread_slots)
        self.config = config
        self.slot = slot
        self.master_fd = master_fd
        self.thread_slots: List[ThreadSlotWriter] = list(thread_slots)
        life = self.life = WorkerLife(config, slot, notify_fd, max_requests, worker_id)
        table = self.table = ConnTable(config, listener, client_filter,
                                       lambda: life.stopping, slot.count_backoff,
                                       paced=threads > 0)
        self.responder = Responder(app, config, slot, status_page,
                                   max_conns=table.max_idle + threads,
                                   max_reqs=max(1, threads))
        self.client: Optional[HandoffClient] = None
        if handoff is not None:
            self.client = HandoffClient(table, handoff, previous,
                                        config.workers.mode == "ondemand",
                                        watchdog=not threads)

    def app_streams(self) -> Tuple[ErrorStream, EnvironBuilder]:
        """A lane's ``wsgi.errors`` (into the worker's log) and environ builder."""
        errors = ErrorStream(app_error_line)
        app = self.config.app
        environ = EnvironBuilder(errors, True, app.script_name, app.fix_root_url)
        if self.thread_slots:
            environ.template["wsgi.multithread"] = True
        return errors, environ

    def run(self, loop: Callable[[], None], *watch: int) -> int:
        """Start (signals, the epoll with ``watch`` beside the master's pipe and the signal
        pipe, hand-off, READY to the master), run ``loop``, shut down; the exit code."""
        life = self.life
        life.install_signals()
        self.table.open(self.master_fd, life.wakeup_r, *watch)
        if self.client is not None:
            self.client.start()
        freeze_setup()
        self.slot.set_state(WorkerState.IDLE)
        life.notify(notify.READY)
        try:
            loop()
        finally:
            self.shutdown()
        return life.exit_code

    def stopping_turn(self, now: float) -> None:
        """At each turn of a stopping worker's loop: stop accepting (taking the listen
        queue unless killed), hand idle kept connections on or close them."""
        life = self.life
        table = self.table
        if table.accepting:
            table.stop_accepting(take_queue=life.exit_code == EXIT_OK)
        client = self.client
        if client is not None and client.hands_on(life.master_gone):
            client.release_idle(None)
        table.close_idle_kept(now)

    def on_other(self, fd: int) -> None:
        """An event on a descriptor that is neither the listener nor a connection: the
        master's pipe (EOF: the master died), the signal pipe, a hand-off channel."""
        life = self.life
        client = self.client
        if fd == self.master_fd:
            self.table.epoll.unregister(fd)
            life.on_master_gone()
        elif fd == life.wakeup_r:
            life.on_wakeup()
        elif client is not None:
            channel = client.channel_of(fd)
            if channel is not None:
                client.take(channel)

    def housekeep(self, now: float) -> None:
        """A loop holding connections or backing off: accept again when the back-off is
        over; sweep the deadlines, which is also the heartbeat of a busy worker."""
        table = self.table
        if table.resume_accept_at and now >= table.resume_accept_at:
            table.resume_accepting()
        if now >= table.next_sweep:
            self.slot.beat(now)
            table.sweep(now)

    def shutdown(self) -> None:
        """After the loop: close every connection left, then the access log."""
        if self.client is not None:
            self.client.close_released()
        table = self.table
        for conn in list(table.conns.values()):
            if conn.mid_request():
                log.warning("closing a connection with an unfinished request at exit")
            table.close(conn)
        self.slot.set_state(WorkerState.STOPPING)
        if self.life.access is not None:
            self.life.access.close()
