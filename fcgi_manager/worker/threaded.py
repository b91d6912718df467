"""Threads per worker (``workers.threads`` > 1): several requests at once in one process.

For apps that spend their time waiting (a database, a cache, another HTTP API), a whole
process per waiting request is memory spent on nothing; gunicorn's ``gthread`` and
uWSGI's ``--threads`` run a pool of threads per process instead. This is the same idea,
built so that the ``threads = 1`` loop in :mod:`.loop` stays untouched (no lock, no queue
on its hot path): a threaded worker is a different loop, assembled from the same parts
(:mod:`.parts`) -- the connection table (:mod:`.conntable`), the request core
(:mod:`.responder`), the hand-off client (:mod:`.handoff`) and the process's life
(:mod:`.life`).

* **The main thread owns the epoll**: the listening socket, every connection that is not
  running a request (new ones, idle kept ones, ones still sending their request), the
  hand-off channels, the master's death pipe, the signal pipe, and the *done* pipe on
  which app threads say a request has finished. Reading, parsing, accepting, handing on
  and closing happen only here, so the connection table has one owner and needs no lock.
* **App threads run requests.** A complete request (params and body read) is handed to a
  free thread through a queue; the thread runs the :class:`~.responder.Responder` on the
  connection it was given (blocking writes bounded by ``write_timeout``,
  ``FCGI_ABORT_REQUEST`` and client hang-ups checked at each flush, exactly as in the
  one-thread worker), then hands the connection back. While it runs, the connection is
  out of the epoll set: only its thread touches it.
* **No free thread, no accepting.** The listening socket and the hand-off channels leave
  the epoll set when every thread is busy, so a new connection goes to a sibling worker
  instead of waiting behind busy threads; they come back when a thread frees up.
* **Hand-off behind slow requests.** A request that arrives on a connection while no
  thread is free is not read: the connection leaves the epoll set and waits (*held*)
  with its request in the kernel, where it can still move. Held connections get the
  next free threads; if every thread is held by a request older than ``HANDOFF_AFTER``
  they are handed to a sibling instead (nginx keeps sending on the connections it used
  last, so a worker busy with slow requests would otherwise keep fast ones waiting).
  Stopping workers (recycle, scale-down, reload) hand their idle kept connections on, as
  one-thread workers do.
* **Status without locks.** Each app thread writes its own scoreboard entry
  (:class:`.scoreboard.ThreadSlotWriter`); the main thread writes only the slot's state.
* **Stopping and recycling** stop accepting, then wait for every request in flight (and
  for complete requests still queued for a thread). ``max_requests`` is checked by the
  main thread after each request, ``max_memory`` by the app thread just before the write
  that ends its response; a recycling worker tells the master at once (its replacement
  starts now) and finishes what it runs (up to ``workers.timeout``) instead of dropping it.
* **A hung request**: the master dumps every thread's stack (faulthandler, all threads),
  then stops the worker gracefully so the other threads get ``graceful_timeout`` to finish,
  then kills it (see the master's timeout check).

``app.post_fork`` runs in the forked worker before this worker is built, so before any app
thread exists.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from typing import Any, Deque, Dict, List, Tuple, Union

from ..escaping import escape
from ..scoreboard import Scoreboard, ThreadSlotWriter
from .connection import IDLE_CONN_TIMEOUT, Conn
from .conntable import EPOLLHUP
from .handoff import HANDOFF_AFTER, SENT
from .life import EXIT_OK
from .loop import Worker
from .parts import WorkerParts
from .responder import Lane, Need, Result

log = logging.getLogger("fcgi_manager.worker")


class ThreadedWorker:
    """The worker loop for ``workers.threads`` > 1 (see the module docstring)."""

    def __init__(self, parts: WorkerParts) -> None:
        self.parts = parts
        self.cfg = parts.config
        self.threads = len(parts.thread_slots)
        self.life = parts.life
        self.table = parts.table
        self.table.on_readable = self._readable
        self.responder = parts.responder
        self.client = parts.client
        self.lanes = [self._lane(s) for s in parts.thread_slots]
        self.free = self.threads  # app threads not running a request (main thread's count)
        self.jobs: queue.SimpleQueue[Tuple[Conn, Lane]] = queue.SimpleQueue()
        self.idle_lanes: List[Lane] = list(self.lanes)
        self.done: Deque[Tuple[Conn, Lane, Result]] = collections.deque()
        self.waiting: Deque[Conn] = collections.deque()  # complete, no thread free yet
        self.held: Deque[Conn] = collections.deque()  # a request unread, no thread free yet
        self.running: Dict[int, Conn] = {}  # fd -> connection handed to an app thread
        self.begun: Dict[int, float] = {}  # fd -> when its request went to a thread
        self._done_r, self._done_w = os.pipe()
        os.set_blocking(self._done_r, False)
        self._wake_sent = False  # a byte is in the done pipe that the main thread has not read
        self._backlog_turn = False

    def _lane(self, slot: ThreadSlotWriter) -> Lane:
        errors, environ = self.parts.app_streams()
        access = self.life.access
        return Lane(slot, errors, environ,
                    access.thread_meter() if access is not None else None,
                    check_memory=self._check_memory if self.life.max_memory else None)

    def _check_memory(self) -> None:
        """From an app thread, just before the write that ends a response."""
        if not self.life.stopping:
            self.life.check_memory()

    # -- the main thread's loop -----------------------------------------------------------

    def run(self) -> int:
        return self.parts.run(self._loop, self._done_r)

    def _loop(self) -> None:
        for index in range(self.threads):
            threading.Thread(target=self._thread_main, name=f"fcgi-app-{index + 1}",
                             daemon=True).start()
        life = self.life
        table = self.table
        ep = table.epoll
        conns = table.conns
        listen_fd = table.listen_fd
        done_r = self._done_r
        client = self.client
        stopping_turn = self.parts.stopping_turn
        on_other = self.parts.on_other
        housekeep = self.parts.housekeep
        deadline = 0.0
        while True:
            if client is not None and client.released:
                client.close_released()
            if life.stopping:
                now = time.monotonic()
                stopping_turn(now)
                if not conns and not self.running:
                    return
                if life.access is not None and life.access.pending:
                    life.flush_access(None)  # a kill may end the stop: lines go out now
                if not deadline:
                    deadline = now + self._stop_limit()
                elif now > deadline:
                    self._log_left_running()
                    return
            # Idle, it still wakes up: for the heartbeat, and for lines app threads left
            # in the access log; holding connections, soon enough to hand them on.
            timeout = (0.1 if life.stopping else 1.0) if (
                conns or life.stopping or table.resume_accept_at) else life.heartbeat_every
            if self.held and client is not None:
                timeout = min(timeout, HANDOFF_AFTER)
            if table.resume_accept_at:
                timeout = table.backoff_timeout(timeout)
            try:
                events = ep.poll(timeout)
            except InterruptedError:
                continue
            if not events:
                life.idle_beat()
                if life.access is not None:
                    life.access.flush_due(time.monotonic())
            for fd, ev in events:
                if fd == listen_fd:
                    if table.accepting:
                        table.accept(budget=max(1, min(16, self.free - len(self.waiting))))
                    continue
                conn = conns.get(fd)
                if conn is not None:
                    if ev & EPOLLHUP and conn.last_used and not conn.mid_request():
                        table.close(conn)  # nginx closed a kept connection (see loop.py)
                    elif self.free <= len(self.waiting) and not conn.mid_request() \
                            and not conn.pending:
                        table.unregister(conn)  # no thread free: hold it, unread
                        self.held.append(conn)
                    else:
                        self._readable(conn)
                elif fd == done_r:
                    self._collect()
                else:
                    on_other(fd)
            if conns or table.resume_accept_at:
                now = time.monotonic()
                if now >= table.next_sweep or table.resume_accept_at:
                    housekeep(now)
            if self.held:
                self._hand_on_held()
            self._pace()

    def _stop_limit(self) -> float:
        """How long a stopping worker waits for its requests: ``graceful_timeout`` when
        asked to stop; when recycling (nobody asked), as long as a request may run."""
        w = self.cfg.workers
        if self.life.exit_code == EXIT_OK:
            return float(w.graceful_timeout)
        return float(max(w.graceful_timeout, w.timeout))

    def _pace(self) -> None:
        """Watch the listening socket and the hand-off channels only while a thread is
        free for a new request."""
        room = self.free > len(self.waiting)
        self.table.pace(room)
        if self.client is not None and self.client.hand_on is None:
            self.client.watch(room and not self.life.stopping)

    def _log_left_running(self) -> None:
        for conn in self.running.values():
            params = conn.params or {}
            log.warning("exiting with a request still running after the stop's time limit: "
                        "%s (its client gets an error)",
                        escape(f"{params.get('REQUEST_METHOD', '?')} "
                               f"{(params.get('REQUEST_URI') or '')[:200]}"))

    # -- handing requests to threads and taking them back ---------------------------------

    def _hand_on_held(self) -> None:
        """Every thread is held by a request older than ``HANDOFF_AFTER``: hand the held
        connections (their requests unread) to siblings rather than make them wait here."""
        held = self.held
        conns = self.table.conns
        while held and conns.get(held[0].fd) is not held[0]:
            held.popleft()  # closed meanwhile (a cap, a deadline) or handed on at a stop
        client = self.client
        begun = self.begun
        if not held or client is None or self.life.stopping or not begun \
                or time.monotonic() - max(begun.values()) < HANDOFF_AFTER:
            return
        while held:
            conn = held[0]
            if conns.get(conn.fd) is conn and client.offer(conn) != SENT:
                return  # the queue is full: they wait here for a thread
            held.popleft()

    def _readable(self, conn: Conn) -> None:
        events = self.table.read(conn)
        if events is not None and self._handle_events(conn, events):
            self.table.park(conn)

    def _handle_events(self, conn: Conn, events: List[Any]) -> bool:
        """Records in on the main thread; a complete request goes to a thread (the events
        after it wait in ``conn.pending`` until the thread hands the connection back).
        False if the connection left the table."""
        need = self.responder.receive(conn, events)
        if need is Need.MORE:
            return True
        if need is Need.CLOSE:
            self.table.close(conn)
        else:
            self._dispatch(conn)
        return False

    def _dispatch(self, conn: Conn) -> None:
        """Take ``conn`` out of the epoll set and give its request to a free thread."""
        self.table.unwatch(conn)
        self.running[conn.fd] = conn
        if self.free > 0:
            self._start(conn)
        else:
            self.waiting.append(conn)
        self._pace()

    def _start(self, conn: Conn) -> None:
        self.free -= 1
        self.begun[conn.fd] = time.monotonic()
        self.jobs.put((conn, self.idle_lanes.pop()))

    def _collect(self) -> None:
        """Take back the connections app threads have finished with."""
        try:
            os.read(self._done_r, 4096)
        except OSError:
            pass
        self._wake_sent = False  # before draining: a later append writes again
        done = self.done
        while done:
            conn, lane, result = done.popleft()
            self.running.pop(conn.fd, None)
            self.begun.pop(conn.fd, None)
            self.idle_lanes.append(lane)
            self.free += 1
            self._finished(conn, result)
        self._fill_threads()

    def _fill_threads(self) -> None:
        """Give freed threads the queued requests, taking turns with the listening socket.

        Requests queue here only when they arrive on kept connections while every thread
        is busy; new connections meanwhile wait in the listen backlog (the listening socket
        is out of the epoll set). Under saturation nginx keeps sending on its kept
        connections, so serving the queue first would starve the backlog for good (p99 of
        seconds). Each freed thread therefore alternates: one queued request, then one new
        connection if the backlog has one.
        """
        table = self.table
        waiting = self.waiting
        paused = not table.accepting and not self.life.stopping and not table.resume_accept_at
        while self.free > 0 and waiting:
            if self._backlog_turn and paused:
                self._backlog_turn = False
                if table.ready_now(table.listen_fd):
                    table.accept(budget=1)
                    continue
            self._backlog_turn = True
            self._start(waiting.popleft())
        held = self.held
        conns = table.conns
        while self.free > len(self.waiting) and held:
            conn = held.popleft()
            if conns.get(conn.fd) is conn:
                self._readable(conn)  # its request goes to the free thread
        if self.free > 0 and paused:
            # The listening socket was left out while every thread was busy, so a
            # connection is likely waiting: take it now rather than after one more
            # epoll_ctl and poll (this is what keeps a saturated worker's threads fed).
            table.accept(budget=self.free)

    def _finished(self, conn: Conn, result: Result) -> None:
        life = self.life
        table = self.table
        if result is not Result.GONE:
            life.served += 1
            if life.max_requests:
                life.check_recycle()
        if result is not Result.KEEP or not conn.parser.keep_conn:
            table.close(conn)
            return
        conn.last_used = now = time.monotonic()
        conn.deadline = now + IDLE_CONN_TIMEOUT
        table.conns[conn.fd] = conn
        if life.stopping:
            client = self.client
            if client is None or not client.hand_on_at_stop(conn, life.master_gone):
                table.close(conn)  # while stopping: FIN right behind END_REQUEST
                return
        elif conn.pending:
            events, conn.pending = conn.pending, []
            if not self._handle_events(conn, events):
                return
        if conn.fd in table.conns:
            table.park(conn)

    # -- app threads ----------------------------------------------------------------------

    def _thread_main(self) -> None:
        jobs = self.jobs
        done = self.done
        done_w = self._done_w
        respond = self.responder.respond
        while True:
            conn, lane = jobs.get()
            try:
                result = respond(conn, lane)
            except BaseException as exc:  # noqa: BLE001 - the thread must live on
                log.exception("app thread: unexpected %s; closing the connection",
                              type(exc).__name__)
                lane.slot.idle()
                result = Result.CLOSE
            done.append((conn, lane, result))
            if not self._wake_sent:  # one byte wakes the main thread for every hand-back
                self._wake_sent = True
                try:
                    os.write(done_w, b".")
                except OSError:
                    pass


AnyWorker = Union[Worker, ThreadedWorker]


def build_worker(board: Scoreboard, slot_index: int, **kwargs: Any) -> AnyWorker:
    """The worker loop the config asks for: the one-thread loop, or the threaded one with
    the thread entries the master reserved for this slot."""
    if kwargs["config"].workers.threads > 1:
        return ThreadedWorker(WorkerParts(thread_slots=board.thread_writers(slot_index),
                                          **kwargs))
    return Worker(WorkerParts(**kwargs))
