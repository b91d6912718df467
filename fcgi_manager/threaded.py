"""Threads per worker (``workers.threads`` > 1): several requests at once in one process.

For apps that spend their time waiting (a database, a cache, another HTTP API), a whole
process per waiting request is memory spent on nothing; gunicorn's ``gthread`` and
uWSGI's ``--threads`` run a pool of threads per process instead. This is the same idea,
built so that the ``threads = 1`` loop in :mod:`.worker` stays untouched (no lock, no queue
on its hot path): a threaded worker is a different loop.

* **The main thread owns the epoll**: the listening socket, every connection that is not
  running a request (new ones, idle kept ones, ones still sending their request), the
  master's death pipe, the signal pipe, and the *done* pipe on which app threads say a
  request has finished. Reading, parsing, accepting and closing happen only here, so the
  connection table has one owner and needs no lock.
* **App threads run requests.** A complete request (params and body read) is handed to a
  free thread through a queue; the thread builds the environ, runs the app and writes the
  response on the connection it was given (blocking writes bounded by ``write_timeout``
  through ``SO_SNDTIMEO``, ``FCGI_ABORT_REQUEST`` and client hang-ups checked at each
  flush, exactly as in the one-thread worker), then hands the connection back. While it
  runs, the connection is out of the epoll set: only its thread touches it.
* **No free thread, no accepting.** The listening socket leaves the epoll set when every
  thread is busy, so a new connection goes to a sibling worker instead of waiting behind
  busy threads; kept connections are still read, and a request that arrives on one waits
  for the next free thread. It comes back when a thread frees up.
* **Status without locks.** Each app thread writes its own scoreboard entry
  (:class:`.scoreboard.ThreadSlotWriter`); the main thread writes only the slot's state.
* **Stopping and recycling** stop accepting, then wait for every request in flight (and
  for complete requests still queued for a thread). ``max_requests`` is checked by the
  main thread after each request, ``max_memory`` by the app thread right after its
  response; a recycling worker tells the master at once (its replacement starts now) and
  finishes what it runs (up to ``workers.timeout``) instead of dropping it.
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
import select
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from . import protocol
from .escaping import escape
from .scoreboard import Scoreboard, ThreadSlotWriter
from .worker import EXIT_OK, IDLE_CONN_TIMEOUT, Conn, Worker
from .wsgi import (
    ClientGone,
    EnvironBuilder,
    ErrorStream,
    RequestAborted,
    run_app,
    simple_response,
)

log = logging.getLogger("fcgi_manager.worker")

# What an app thread reports for a connection it hands back.
KEEP = 0  # the request was answered; the connection may serve another
CLOSE_SERVED = 1  # answered (or cut short by the client): close it, count the request
CLOSE_UNSERVED = 2  # aborted and the end could not be sent: close it

_EPOLLIN = select.EPOLLIN


class AppThread:
    """What one app thread owns: its scoreboard entry, wsgi.errors and environ template."""

    __slots__ = ("index", "slot", "errors", "environ")

    def __init__(self, index: int, slot: ThreadSlotWriter, errors: ErrorStream,
                 environ: EnvironBuilder) -> None:
        self.index = index
        self.slot = slot
        self.errors = errors
        self.environ = environ


class ThreadedWorker(Worker):
    """The worker loop for ``workers.threads`` > 1 (see the module docstring)."""

    def __init__(self, *, thread_slots: List[ThreadSlotWriter], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threads = len(thread_slots)
        self.thread_slots = thread_slots
        self.free = self.threads  # app threads not running a request (main thread's count)
        self.jobs: queue.SimpleQueue[Conn] = queue.SimpleQueue()
        self.done: Deque[Tuple[Conn, int]] = collections.deque()
        self.waiting: Deque[Conn] = collections.deque()  # complete, no thread free yet
        self.running: Dict[int, Conn] = {}  # fd -> connection handed to an app thread
        self._done_r, self._done_w = os.pipe()
        os.set_blocking(self._done_r, False)
        self._app_threads: List[threading.Thread] = []
        self._shed_lock = threading.Lock()
        self._wake_sent = False  # a byte is in the done pipe that the main thread has not read
        self._backlog_turn = False
        self._meters = [self.access.thread_meter() for _ in thread_slots] \
            if self.access is not None else []

    # -- set-up ---------------------------------------------------------------------------

    def _start_threads(self) -> None:
        for index, slot in enumerate(self.thread_slots):
            errors = ErrorStream(self._app_error_line)
            environ = EnvironBuilder(errors, True, self.cfg.app.script_name,
                                     self.cfg.app.fix_root_url)
            environ.template["wsgi.multithread"] = True
            state = AppThread(index, slot, errors, environ)
            thread = threading.Thread(target=self._thread_main, args=(state,),
                                      name=f"fcgi-app-{index + 1}", daemon=True)
            thread.start()
            self._app_threads.append(thread)

    def _get_values(self, names: List[str]) -> Dict[str, str]:
        known = {"FCGI_MAX_CONNS": str(self.max_idle + self.threads),
                 "FCGI_MAX_REQS": str(self.threads), "FCGI_MPXS_CONNS": "0"}
        return {n: known[n] for n in names if n in known}

    # -- the main thread's loop -----------------------------------------------------------

    def _loop(self) -> None:
        self._start_threads()
        ep = self.epoll
        ep.register(self._done_r, _EPOLLIN)
        conns = self.conns
        listen_fd = self.listen_fd
        done_r = self._done_r
        deadline = 0.0
        while True:
            if self.stopping:
                if self._accepting:
                    self._stop_accepting()
                now = time.monotonic()
                self._retire_idle_kept(now)
                if not conns and not self.running:
                    return
                if self.access is not None and self.access.pending:
                    self._flush_access(None)  # a kill may end the stop: lines go out now
                if not deadline:
                    deadline = now + self._stop_limit()
                elif now > deadline:
                    self._log_left_running()
                    return
            # Idle, it still wakes up: for the heartbeat, and for lines app threads left
            # in the access log.
            timeout = (0.1 if self.stopping else 1.0) if (
                conns or self.stopping or self._resume_accept_at) else self.heartbeat_every
            if self._resume_accept_at:
                timeout = self._backoff_timeout(timeout)
            try:
                events = ep.poll(timeout)
            except InterruptedError:
                continue
            if not events:
                self._idle_beat()
                if self.access is not None:
                    self.access.flush_due(time.monotonic())
            for fd, _ev in events:
                if fd == listen_fd:
                    if self._accepting:
                        self._accept(budget=max(1, min(16, self.free - len(self.waiting))))
                    continue
                conn = conns.get(fd)
                if conn is not None:
                    self._readable(conn)
                elif fd == done_r:
                    self._collect()
                elif fd == self.master_fd:
                    log.warning("the master process is gone: finishing and exiting")
                    ep.unregister(fd)
                    self.stopping = True
                elif fd == self._wakeup_r:
                    try:
                        os.read(fd, 512)
                    except OSError:
                        pass
                    self._reopen_if_asked()
            if conns or self._resume_accept_at:
                now = time.monotonic()
                if self._resume_accept_at and now >= self._resume_accept_at:
                    self._resume_accepting()
                if now >= self._next_sweep:
                    self._sweep(now)
            self._pace_accepting()

    def _stop_limit(self) -> float:
        """How long a stopping worker waits for its requests: ``graceful_timeout`` when
        asked to stop; when recycling (nobody asked), as long as a request may run."""
        if self.exit_code == EXIT_OK:
            return self.graceful_timeout
        return max(self.graceful_timeout, self.cfg.workers.timeout)

    def _pace_accepting(self) -> None:
        """Watch the listening socket only while a thread is free for a new request."""
        room = self.free > len(self.waiting)
        if room and not self._accepting and not self.stopping and not self._resume_accept_at:
            try:
                self.epoll.register(self.listen_fd,
                                    _EPOLLIN | getattr(select, "EPOLLEXCLUSIVE", 0))
                self._accepting = True
            except (OSError, ValueError):
                pass
        elif not room and self._accepting:
            try:
                self.epoll.unregister(self.listen_fd)
            except (OSError, ValueError):
                pass
            self._accepting = False

    def _resume_accepting(self) -> None:
        """The back-off is over: :meth:`_pace_accepting` watches the listener again when a
        thread is free."""
        self._resume_accept_at = 0.0

    def _log_left_running(self) -> None:
        for conn in self.running.values():
            params = conn.params or {}
            log.warning("exiting with a request still running after the stop's time limit: "
                        "%s (its client gets an error)",
                        escape(f"{params.get('REQUEST_METHOD', '?')} "
                               f"{(params.get('REQUEST_URI') or '')[:200]}"))

    # -- handing requests to threads and taking them back ---------------------------------

    def _handle_events(self, conn: Conn, events: List[Any]) -> bool:
        """As the one-thread worker, except that a complete request goes to a thread: the
        events after it wait in ``conn.pending`` until the thread hands the connection back
        (only one thread may touch a connection at a time)."""
        for i, ev in enumerate(events):
            if type(ev) is protocol.StdinEnd:
                if i and not super()._handle_events(conn, events[:i]):
                    return False
                rest = events[i + 1:]
                if any(type(e) is protocol.AbortRequest and e.request_id == ev.request_id
                       for e in rest):
                    conn.pending = rest + conn.pending
                    if not self._end_request(conn, 0):  # aborted before the app ran
                        return False
                    return self._handle_events(conn, self._take_pending(conn))
                conn.pending = rest + conn.pending
                self._dispatch(conn)
                return False
        return super()._handle_events(conn, events)

    def _dispatch(self, conn: Conn) -> None:
        """Take ``conn`` out of the epoll set and give its request to a free thread."""
        self.conns.pop(conn.fd, None)
        if conn.registered:
            try:
                self.epoll.unregister(conn.fd)
            except (OSError, ValueError):
                pass
            conn.registered = False
        self.running[conn.fd] = conn
        if self.free > 0:
            self.free -= 1
            self.jobs.put(conn)
        else:
            self.waiting.append(conn)
        self._pace_accepting()

    def _collect(self) -> None:
        """Take back the connections app threads have finished with."""
        try:
            os.read(self._done_r, 4096)
        except OSError:
            pass
        self._wake_sent = False  # before draining: a later append writes again
        done = self.done
        while done:
            conn, outcome = done.popleft()
            self.running.pop(conn.fd, None)
            self.free += 1
            self._finished(conn, outcome)
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
        waiting = self.waiting
        paused = not self._accepting and not self.stopping and not self._resume_accept_at
        while self.free > 0 and waiting:
            if self._backlog_turn and paused:
                self._backlog_turn = False
                if self._ready_now(self.listen_fd):
                    self._accept(budget=1)
                    continue
            self._backlog_turn = True
            self.free -= 1
            self.jobs.put(waiting.popleft())
        if self.free > 0 and paused:
            # The listening socket was left out while every thread was busy, so a
            # connection is likely waiting: take it now rather than after one more
            # epoll_ctl and poll (this is what keeps a saturated worker's threads fed).
            self._accept(budget=self.free)

    def _finished(self, conn: Conn, outcome: int) -> None:
        if outcome != CLOSE_UNSERVED:
            self.served += 1
            if self.max_requests:
                self._check_recycle()
        if outcome != KEEP or not conn.parser.keep_conn or self.stopping:
            self._close(conn)  # while stopping: FIN right behind END_REQUEST
            return
        conn.last_used = now = time.monotonic()
        conn.deadline = now + IDLE_CONN_TIMEOUT
        self.conns[conn.fd] = conn
        if conn.pending and not self._handle_events(conn, self._take_pending(conn)):
            return
        if conn.fd in self.conns:
            self._park(conn)

    # -- app threads ----------------------------------------------------------------------

    def _thread_main(self, state: AppThread) -> None:
        jobs = self.jobs
        done = self.done
        done_w = self._done_w
        while True:
            conn = jobs.get()
            try:
                outcome = self._respond(state, conn)
            except BaseException as exc:  # noqa: BLE001 - the thread must live on
                log.exception("app thread %d: unexpected %s; closing the connection",
                              state.index + 1, type(exc).__name__)
                state.slot.idle()
                outcome = CLOSE_SERVED
            done.append((conn, outcome))
            if not self._wake_sent:  # one byte wakes the main thread for every hand-back
                self._wake_sent = True
                try:
                    os.write(done_w, b".")
                except OSError:
                    pass

    def _respond(self, state: AppThread, conn: Conn) -> int:
        """Run the app for the complete request on ``conn`` and send its response."""
        params = conn.params or {}
        rid = conn.request_id
        method = params.get("REQUEST_METHOD", "GET")
        uri = params.get("REQUEST_URI") or params.get("SCRIPT_NAME", "") + params.get(
            "PATH_INFO", "")
        slot = state.slot
        slot.busy(method, uri)
        send = conn.send
        meter = self._meters[state.index] if self._meters else None
        if meter is not None:
            meter.begin()
            send = meter.counting(send)
        checked = [False]
        if self.max_memory:
            send = self._memory_checked(send, checked)
        outcome = KEEP
        conn.replies = 0
        code = 499  # nginx's "client closed the request", unless the response went out
        try:
            special = self._own_answer(conn, params)
            if special is not None:
                status, body, ctype, extra = special
                simple_response(send, rid, status, body, ctype, extra)
                code = int(status[:3])
            else:
                environ = state.environ.build(params, conn.body.stream())  # type: ignore
                code = run_app(self.app, environ, send, rid, state.errors,
                               self._log_exception, conn.check_abort)
        except RequestAborted as exc:
            log.info("%s: %s", escape(f"{method} {uri[:200]}"), exc)
            state.errors.reset()
            try:
                send(protocol.end_of_request(rid, 0))
            except ClientGone:
                outcome = CLOSE_UNSERVED
        except ClientGone as exc:
            log.info("%s: %s (client abort?)", escape(f"{method} {uri[:200]}"), exc)
            state.errors.reset()
            outcome = CLOSE_SERVED
        slot.idle()
        if self.max_memory and not checked[0] and not self.stopping:
            self._check_memory()  # the response did not end normally
        if meter is not None:
            meter.end(params, uri, code)
        conn.parser.request_done()
        conn.request_id = 0
        conn.params = conn.body = None
        return outcome

    def _memory_checked(self, send: Callable[[bytes], None], checked: List[bool]
                        ) -> Callable[[bytes], None]:
        """``send`` that checks ``max_memory`` just before the write that ends the
        response (END_REQUEST is its last record): once the client has its answer it may
        send the next request at once, and the main thread -- holding the GIL while this
        thread waits for it -- could give it to another thread before a check made after
        the write. Checked first, a worker past the limit has stopped accepting by then."""
        def checking(data: bytes) -> None:
            if len(data) >= 16 and data[-15] == protocol.END_REQUEST and data[-16] == 1 \
                    and not checked[0]:
                checked[0] = True
                if not self.stopping:
                    self._check_memory()
            send(data)
        return checking

    def _special(self, params: Dict[str, str]) -> Optional[tuple]:
        """The worker's own answers (ping, status, shedding), from an app thread: the shed
        counter of the slot is shared by the threads, so it is counted under a lock."""
        with self._shed_lock:
            return super()._special(params)


def build_worker(board: Scoreboard, slot_index: int, **kwargs: Any) -> Worker:
    """The worker loop the config asks for: the one-thread loop, or the threaded one with
    the thread entries the master reserved for this slot."""
    if kwargs["config"].workers.threads > 1:
        return ThreadedWorker(thread_slots=board.thread_writers(slot_index), **kwargs)
    return Worker(**kwargs)
