"""A worker: the FastCGI responder loop around the WSGI app, in a forked child.

One thread, one ``epoll``. It watches the listening socket (``EPOLLEXCLUSIVE``, so one
connection wakes one worker), the pipe whose other end only the master holds (EOF = the
master died: finish and exit), its signal wakeup pipe, and every connection it holds that
is not running a request:

* **Input never blocks the worker.** Bytes are read with ``MSG_DONTWAIT`` and fed to the
  sans-I/O parser; a connection whose request is not complete yet stays in the epoll set
  with a deadline. A silent or slow-drip client therefore costs a file descriptor, never a
  worker (php-fpm and flup park a whole process on it).
* **Only the app and the response block.** When a request is complete (params and body)
  the app runs and its response is sent with blocking ``sendall`` bounded by
  ``SO_SNDTIMEO`` (a client that stops reading cannot hold the worker past
  ``write_timeout``).
* **Keep-conn without pinning.** After END_REQUEST a kept connection goes back into the
  epoll set beside the listening socket; the worker serves whichever is ready first, so
  nginx's cached connections never make new connections wait in the accept queue (the
  php-fpm/flup stall). At most ``max_idle_connections`` are held (checked each time one
  becomes idle); past that the oldest idle one is closed (nginx sees a clean FIN and opens
  a new one).
* **Bounded.** At most ``MAX_UNFINISHED`` connections still sending their request (past
  that the oldest is closed); a body past ``workers.max_body`` is answered 413 without
  calling the app; a connection that sends more than ``MAX_REPLIES`` records needing a
  reply (management records, refused or aborted requests) without a request is closed.
* **Hand-off.** Idle kept connections move to sibling workers through the master's shared
  hand-off socket (``handoff.py``) when this worker's request has run a few milliseconds
  (a watchdog thread does it while the app runs) and when it retires (recycle, scale-down,
  old generation of a reload); it takes theirs the same way, wake-one, like the listener.

Exit codes tell the master why the worker ended (see ``EXIT_*``); the master logs them.
Stacks: ``SIGUSR2`` makes faulthandler write every thread's stack to stderr (which the
master captures into the log), even while the app is stuck in a C call.
"""

from __future__ import annotations

import errno
import faulthandler
import gc
import logging
import os
import resource
import select
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from . import accesslog, notify, protocol
from .errors import ProtocolError
from .escaping import escape
from .handoff import CLOSED, FLAG_KEPT, FLAG_SNDTIMEO, SENT, HandoffChannel, Watchdog
from .nbaccept import nonblocking_acceptor
from .scoreboard import SlotWriter
from .sockets import ClientFilter
from .states import WorkerState
from .wsgi import (
    BodyBuffer,
    ClientGone,
    EnvironBuilder,
    ErrorStream,
    RequestAborted,
    content_length,
    new_body,
    request_path,
    run_app,
    simple_response,
)

EXIT_OK = 0  # asked to stop (stop, reload, scale down, master gone)
EXIT_BOOT_ERROR = 3  # the app could not be imported: the master must not respawn in a loop
EXIT_RECYCLE_REQUESTS = 10  # served max_requests
EXIT_RECYCLE_MEMORY = 11  # RSS passed max_memory

STACK_SIGNAL = signal.SIGUSR2
RECV_SIZE = 256 * 1024
IDLE_CONN_TIMEOUT = 300.0
ACCEPT_BACKOFF_FIRST = 0.005  # seconds without accepting after EMFILE; doubled while it lasts
ACCEPT_BACKOFF_MAX = 0.2
HEARTBEAT_EVERY = 1.0  # seconds at most between two heartbeats of an idle worker
STOP_IDLE_GRACE = 1.0  # seconds an idle kept connection stays open once stopping
FIRST_READ_WAIT = 0.01  # seconds the read right after accept may wait for the request
MAX_UNFINISHED = 128  # connections per worker still sending their request (SPEC: Limits)
MAX_REPLIES = 64  # records answered on a connection without a request being served
UNBOUNDED_SEND = 65536  # bytes a unix connection may be sent before it needs SO_SNDTIMEO
_EPOLLIN = select.EPOLLIN
_EPOLLHUP = select.EPOLLHUP

log = logging.getLogger("fcgi_manager.worker")
_getrusage = resource.getrusage
_RUSAGE_SELF = resource.RUSAGE_SELF


class Conn:
    """One connection from the web server, and the request being received on it.

    It is a raw file descriptor, not a ``socket.socket``: building a socket object costs a
    hidden ``getsockname`` per connection, and ``os.read``/``os.write`` on the fd are all
    the request path needs. Timeouts come from the kernel: accepted TCP sockets inherit
    ``SO_RCVTIMEO``/``SO_SNDTIMEO`` from the listener (see :meth:`Worker._set_timeouts`);
    unix sockets are accepted non-blocking (:mod:`.nbaccept`) and never wait in a read.
    """

    __slots__ = ("fd", "parser", "params", "body", "request_id", "deadline",
                 "registered", "last_used", "peer", "pending", "_poller", "timed",
                 "untimed_sent", "replies")

    lazy_sndtimeo: Optional[bytes] = None  # set by the worker for unix sockets
    write_timeout = 60.0  # set by the worker: bounds each wait for room on a non-blocking fd

    def __init__(self, fd: int, peer: Any, max_params: int) -> None:
        self.fd = fd
        self.parser = protocol.ServerConnection(max_params=max_params)
        self.params: Optional[Dict[str, str]] = None
        self.body: Optional[BodyBuffer] = None
        self.request_id = 0
        self.deadline = 0.0
        self.registered = False
        self.last_used = 0.0
        self.peer = peer
        self.pending: List[Any] = []  # events that arrived while the app ran
        self._poller: Any = None
        self.timed = False
        self.untimed_sent = 0  # bytes written before SO_SNDTIMEO was set (unix sockets)
        self.replies = 0  # records answered since the last request served (see MAX_REPLIES)

    def _set_send_timeout(self) -> None:
        """SO_SNDTIMEO on this connection (unix sockets do not inherit the listener's)."""
        self.timed = True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=self.fd)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self.lazy_sndtimeo)
        except OSError:
            pass
        finally:
            sock.detach()

    def check_abort(self) -> bool:
        """While a response streams: did the web server abort the request or hang up?

        One ``poll`` with a zero timeout per 64 KiB flushed; bytes that are not an abort
        (a management record, say) are parsed and kept for after the request.
        """
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.fd, select.POLLIN)
        if not self._poller.poll(0):
            return False
        try:
            data = os.read(self.fd, RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        if not data:
            return True
        try:
            events = self.parser.feed(data)
        except ProtocolError:
            return True
        aborted = False
        for ev in events:
            if not aborted and type(ev) is protocol.AbortRequest and \
                    ev.request_id == self.request_id:
                aborted = True
            else:
                self.pending.append(ev)
        return aborted

    def send(self, data: bytes) -> None:
        """Write all of ``data``: blocking, bounded by SO_SNDTIMEO or, on a non-blocking
        socket, by ``write_timeout`` per wait for room (:meth:`_send_rest`)."""
        fd = self.fd
        if self.lazy_sndtimeo is not None and not self.timed:
            # A fresh unix socket's send buffer (~208 KiB) takes the first 64 KiB without
            # blocking; anything more could block (a large or streamed response, a kept
            # connection, a flood of management replies): bound it from then on.
            self.untimed_sent += len(data)
            if self.untimed_sent >= UNBOUNDED_SEND:
                self._set_send_timeout()
        try:
            sent = os.write(fd, data)
            if sent < len(data):
                self._send_rest(data, sent)
        except BlockingIOError as exc:
            if os.get_blocking(fd):  # SO_SNDTIMEO ran out
                raise ClientGone("write timeout: the web server stopped reading") from exc
            self._send_rest(data, 0)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ClientGone("the web server closed the connection") from exc
        except OSError as exc:
            raise ClientGone(f"write failed: {exc.strerror}") from exc

    def _send_rest(self, data: bytes, sent: int) -> None:
        """The rest of a write the socket did not take at once.

        A blocking socket (bounded by SO_SNDTIMEO) that fails with EAGAIN timed out. A
        non-blocking one (accepted with :mod:`.nbaccept`) waits for room with ``poll``,
        each wait bounded by ``write_timeout``, as SO_SNDTIMEO bounds each blocking write.
        """
        fd = self.fd
        view = memoryview(data)
        total = len(data)
        poller = None
        try:
            while sent < total:
                try:
                    sent += os.write(fd, view[sent:])
                except BlockingIOError:
                    if os.get_blocking(fd):
                        raise
                    if poller is None:
                        poller = select.poll()
                        poller.register(fd, select.POLLOUT)
                    if not poller.poll(self.write_timeout * 1000.0):
                        raise
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ClientGone("the web server closed the connection") from exc
        except BlockingIOError as exc:
            raise ClientGone("write timeout: the web server stopped reading") from exc
        except OSError as exc:
            raise ClientGone(f"write failed: {exc.strerror}") from exc

    def mid_request(self) -> bool:
        return self.request_id != 0 or self.parser.buffered > 0


class Worker:
    """The responder loop of one worker process (built and run in the child)."""

    def __init__(
        self,
        *,
        app: Callable,
        config: Any,
        listener: socket.socket,
        slot: SlotWriter,
        worker_id: int,
        master_fd: int,
        notify_fd: int,
        max_requests: int,
        status_page: Optional[Callable[[str], tuple]] = None,
        client_filter: Optional[ClientFilter] = None,
        handoff: Optional[HandoffChannel] = None,
        previous: Optional[HandoffChannel] = None,
    ) -> None:
        self.app = app
        self.cfg = config
        w = config.workers
        self.listener = listener
        self.listen_fd = listener.fileno()
        self.slot = slot
        self.worker_id = worker_id
        self.master_fd = master_fd
        self.notify_fd = notify_fd
        self.max_requests = max_requests
        self.max_memory = w.max_memory
        self.max_body_in_memory = w.max_body_in_memory
        self.max_body = w.max_body
        self.read_timeout = w.read_timeout
        self.max_idle = max(1, w.max_idle_connections)
        self.queue_timeout = w.queue_timeout
        self.graceful_timeout = w.graceful_timeout
        self.status_path = config.status.path
        self.ping_path = config.status.ping_path
        self.ping_body = (config.status.ping_response + "\n").encode()
        self.has_special = bool(self.status_path or self.ping_path or self.queue_timeout)
        self.special_prefixes = tuple(p for p in (self.ping_path, self.status_path) if p)
        self.status_page = status_page
        self.filter = client_filter  # parsed by the master at start (see ClientFilter)
        self.errors = ErrorStream(self._app_error_line)
        self.environ = EnvironBuilder(self.errors, True, config.app.script_name,
                                      config.app.fix_root_url)
        self.conns: Dict[int, Conn] = {}
        self.stopping = False
        self.exit_code = EXIT_OK
        self.served = 0
        self._signals: List[int] = []
        self.epoll: Any = None
        self._wakeup_r = -1
        self._accepting = False
        self._next_sweep = 0.0
        self._resume_accept_at = 0.0
        self._emfile_logged = 0.0
        self._backoff_delay = 0.0
        self._backoff_last = 0.0
        # Often enough that the master sees an idle worker alive well within
        # workers.timeout; an idle worker waking once a second costs nothing measurable.
        self.heartbeat_every = max(0.05, min(HEARTBEAT_EVERY, w.timeout / 4 if w.timeout
                                             else HEARTBEAT_EVERY))
        self._stop_began = 0.0
        # Hand-off of idle connections to sibling workers (see handoff.py).
        self.handoff = handoff
        # The channel of the generation a reload replaces: its workers hand their idle
        # kept connections on to us there (taken from, never sent on).
        self.previous = previous
        self._handoff_lock: Any = None  # with the watchdog, once a connection is parked
        self._app_calls = 0
        self._serving: Optional[Conn] = None
        self._released: List[int] = []  # numbers of handed-off fds, now placeholders
        self._placeholder = -1
        self._hand_on: Optional[bool] = None  # decided once stopping: hand on, or close
        self._master_gone = False
        self.access = accesslog.for_worker(config, worker_id, slot.log_epoch)

    # -- set-up ---------------------------------------------------------------------------

    def _install_signals(self) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wakeup_r = r
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGQUIT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGINT, lambda *_: os._exit(EXIT_OK))
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)
        # The master's "reopen your logs": the handler does nothing, the wakeup pipe wakes
        # the loop, which looks at the scoreboard's log epoch (_reopen_if_asked).
        signal.signal(signal.SIGUSR1, lambda *_: None)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        # The stack dump comes first (C level, even inside a stuck C call); then, chained,
        # a Python handler writes the access-log lines of the requests already finished:
        # this signal is the master's last word before a kill for workers.timeout.
        signal.signal(STACK_SIGNAL, self._on_stack_signal)
        faulthandler.register(STACK_SIGNAL, file=sys.stderr, all_threads=True, chain=True)

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True
        self._flush_access(frame)  # a kill may follow graceful_timeout

    def _on_stack_signal(self, signum: int, frame: Any) -> None:
        self._flush_access(frame)

    def _flush_access(self, frame: Any) -> None:
        """Write the finished requests' access-log lines now, from a signal handler (in
        the main thread, between two bytecodes: a sleeping app is interrupted and resumes).
        Not when the signal interrupted the access log itself: it is writing already."""
        access = self.access
        if access is None or not access.pending:
            return
        while frame is not None:
            if frame.f_code.co_filename == accesslog.__file__:
                return
            frame = frame.f_back
        lock = access.lock
        if lock is None:
            access.flush()
        elif lock.acquire(timeout=0.5):  # app threads hold it only to add a line
            try:
                access.flush()
            finally:
                lock.release()

    def _notify(self, kind: bytes, payload: bytes = b"") -> None:
        try:
            os.write(self.notify_fd, notify.encode(kind, payload))
        except OSError:
            pass

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

        timeouts = [(socket.SO_SNDTIMEO, timeval(self.cfg.workers.write_timeout)),
                    (socket.SO_RCVTIMEO, timeval(FIRST_READ_WAIT))]
        for option, value in timeouts:
            try:
                self.listener.setsockopt(socket.SOL_SOCKET, option, value)
            except OSError:
                pass
        # AF_UNIX sockets do not inherit them from the listener (only TCP does). Setting
        # them on every connection would cost three syscalls per request, so instead:
        # the first read is preceded by a zero-timeout poll (see _accept), and the send
        # timeout is set on a connection only once it could block -- a write of 64 KiB
        # or more, or a second request on a kept connection (Conn.send).
        self._unix = self.listener.family == socket.AF_UNIX
        Conn.lazy_sndtimeo = timeouts[0][1] if self._unix else None
        Conn.write_timeout = self.cfg.workers.write_timeout
        # Better still on unix sockets: accept them non-blocking (no probe, no SO_SNDTIMEO).
        self._accept_nb = nonblocking_acceptor(self.listen_fd) if self._unix else None
        self._probe = select.poll()

    def _ready_now(self, fd: int) -> bool:
        """Has ``fd`` bytes to read right now? (select.poll register/unregister are not
        syscalls: this costs one poll().)"""
        probe = self._probe
        probe.register(fd, select.POLLIN)
        try:
            return bool(probe.poll(0))
        finally:
            probe.unregister(fd)

    # -- main loop ------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        self._set_timeouts()
        self.listener.setblocking(False)
        ep = self.epoll = select.epoll()
        ep.register(self.listen_fd, _EPOLLIN | getattr(select, "EPOLLEXCLUSIVE", 0))
        self._accepting = True
        ep.register(self.master_fd, _EPOLLIN)
        ep.register(self._wakeup_r, _EPOLLIN)
        if self.handoff is not None:
            self._start_handoff()
        _freeze_setup()
        self.slot.set_state(WorkerState.IDLE)
        self._notify(notify.READY)
        try:
            self._loop()
        finally:
            self._shutdown()
        return self.exit_code

    def _loop(self) -> None:
        ep = self.epoll
        conns = self.conns
        listen_fd = self.listen_fd
        access = self.access
        poll_deadline = 0.0
        while True:
            if self._released:
                self._close_released()
            if self.stopping:
                if self._accepting:
                    self._stop_accepting()
                self._retire_idle_kept(time.monotonic())
                # Fresh connections (accepted, request not here yet) and requests in
                # progress are owed an answer: wait for them too.
                if not conns:
                    return
                if not poll_deadline:
                    poll_deadline = time.monotonic() + self.graceful_timeout
                elif time.monotonic() > poll_deadline:
                    return
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
            for fd, ev in events:
                if fd == listen_fd:
                    if self._accepting:
                        self._accept()
                    continue
                conn = conns.get(fd)
                if conn is not None:
                    if ev & _EPOLLHUP and conn.last_used and not conn.mid_request():
                        # The web server closed a kept connection between two requests
                        # (nginx does for each one past its keepalive cache): no read to
                        # find the EOF (unix sockets report the close as HUP).
                        self._close(conn)
                    else:
                        self._readable(conn)
                elif fd == self._handoff_fd:
                    self._take_handed(self.handoff)  # type: ignore[arg-type]
                elif fd == self._previous_fd:
                    self._take_handed(self.previous)  # type: ignore[arg-type]
                elif fd == self.master_fd:
                    log.warning("the master process is gone: finishing and exiting")
                    ep.unregister(fd)
                    self._master_gone = True
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
            if not events and access is not None and access.pending:
                access.flush_due(time.monotonic())  # idle: write what waits (busy: end() does)

    def _idle_beat(self) -> None:
        """The loop woke up with nothing to do: say it is alive (the master replaces an
        idle worker whose heartbeat stops: SIGSTOPped, or hung outside a request), write
        output the master could not take earlier, reopen the logs if asked."""
        self.slot.beat(time.monotonic())
        output = sys.stderr
        if getattr(output, "pending", False):
            output.retry()  # type: ignore[union-attr]
        self._reopen_if_asked()

    def _reopen_if_asked(self) -> None:
        """Reopen the access log now if the master asked (its log epoch moved): an idle
        worker must not keep a rotated file open (its space is not freed)."""
        access = self.access
        if access is None or access.epoch == self.slot.log_epoch():
            return
        if access.lock is None:
            access.flush()  # reopens first (and writes what waits, if anything)
        else:
            with access.lock:
                access.flush()

    def _stop_accepting(self) -> None:
        """Leave the listening socket to the other workers (or the next generation).

        Kept connections are not closed here: nginx may be sending a request on one at
        this very moment, and closing it then makes nginx see a reset and fail that
        request (a POST is not retried). Instead, while stopping, each kept connection
        serves the requests that come and is closed right after its END_REQUEST: the FIN
        follows the response at once, so nginx finds the connection closed when it goes
        to cache it and drops it (it checks a connection it caches for EOF). Kept
        connections that stay idle are closed after ``STOP_IDLE_GRACE`` seconds:
        nginx reuses its cached connections most recent first, so one that idle is the
        least likely to be picked at that moment.
        """
        self._accepting = False
        self._stop_began = time.monotonic()
        try:
            self.epoll.unregister(self.listen_fd)
        except (OSError, ValueError):
            pass
        # Take what is already queued, then let go of our copy of the listening socket:
        # when the last copy closes (a full stop), new connects are refused at once --
        # nginx then tries the next upstream cleanly, even for a POST -- instead of
        # waiting in a queue nobody serves and being reset when the workers exit.
        # A worker that leaves on its own (recycling) takes nothing more: the listening
        # socket stays open in the master, and its replacement takes the queue.
        if self._resume_accept_at == 0.0 and self.exit_code == EXIT_OK:
            self._accept(budget=256, while_stopping=True)
        try:
            self.listener.close()
        except OSError:
            pass

    def _retire_idle_kept(self, now: float) -> None:
        if self.handoff is not None and self._hands_on():
            self._release_idle(None)
        for conn in list(self.conns.values()):
            if conn.last_used and not conn.mid_request() and \
                    now - max(conn.last_used, self._stop_began) >= STOP_IDLE_GRACE:
                self._close(conn)

    def _accept(self, budget: int = 16, while_stopping: bool = False) -> None:
        # A bounded batch: serve what is queued, but come back to poll so that kept
        # connections with requests waiting are not starved by a stream of new ones.
        accept = self.listener._accept  # (fd, address): no socket object per connection
        accept_nb = self._accept_nb
        for _ in range(budget):
            if self.stopping and not while_stopping:
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
            conn = Conn(fd, peer, protocol.DEFAULT_MAX_PARAMS)
            conn.deadline = time.monotonic() + self.read_timeout
            self.conns[conn.fd] = conn
            if accept_nb is not None:
                conn.timed = True  # non-blocking: writes wait with poll, never SO_SNDTIMEO
                self._readable(conn)  # EAGAIN parks it
            elif self._unix and not self._ready_now(fd):
                self._park(conn)  # no SO_RCVTIMEO on unix sockets: never read blind
            else:
                self._readable(conn)

    def _accept_error(self, exc: OSError) -> None:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            self._back_off_accepting(exc)
        elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
            log.warning("accept failed: %s", exc)

    def _back_off_accepting(self, exc: OSError) -> None:
        """Out of descriptors (or kernel memory): stop watching the listener instead of
        spinning on it, until one of our connections closes (:meth:`_close`) or a short
        delay is over -- milliseconds, doubled while the error repeats (a fixed second
        left workers idle most of the time at the limit). Counted in status; logged once
        per worker with the limit to raise."""
        now = time.monotonic()
        self.slot.count_backoff()
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
        try:
            self.epoll.unregister(self.listen_fd)
        except (OSError, ValueError):
            pass
        self._accepting = False
        self._resume_accept_at = now + self._backoff_delay

    def _backoff_timeout(self, timeout: float) -> float:
        """The poll timeout while accepting is paused: no later than its end."""
        left = max(0.0, self._resume_accept_at - time.monotonic())
        return left if timeout < 0 else min(timeout, left)

    def _resume_accepting(self) -> None:
        """The back-off is over (a descriptor is free, or its delay ran out)."""
        self._resume_accept_at = 0.0
        if not self.stopping and not self._accepting:
            try:
                self.epoll.register(self.listen_fd,
                                    _EPOLLIN | getattr(select, "EPOLLEXCLUSIVE", 0))
                self._accepting = True
            except (OSError, ValueError):
                pass

    def _sweep(self, now: float) -> None:
        """Close connections past their deadline."""
        self._next_sweep = now + 1.0
        self.slot.beat(now)  # busy with connections: the sweep is the heartbeat
        for conn in list(self.conns.values()):
            if conn.deadline and now > conn.deadline:
                if not conn.mid_request() and self._ready_now(conn.fd):
                    # Its request came while this worker was held (a long request, a
                    # stalled write): the lateness is ours. Closing it now, with the
                    # request unread, would reset the web server's connection; the next
                    # poll serves it. Only once: after a read it is mid-request.
                    conn.deadline = now + self.read_timeout
                    continue
                if conn.mid_request():
                    log.warning("dropped a connection that sent an incomplete request for "
                                "%.0f s (read timeout)", self.read_timeout)
                self._close(conn)

    # -- reading --------------------------------------------------------------------------

    def _readable(self, conn: Conn) -> None:
        """Read what ``conn`` has (epoll said so, or it was just accepted) and act on it."""
        try:
            data = os.read(conn.fd, RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            self._park(conn)
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            if conn.mid_request():
                log.info("the web server closed a connection in the middle of a request")
            self._close(conn)
            return
        try:
            events = conn.parser.feed(data)
        except ProtocolError as exc:
            log.warning("closed a connection from %s: %s", _peer_name(conn.peer), exc)
            self._close(conn)
            return
        if self._handle_events(conn, events):
            self._park(conn)

    def _handle_events(self, conn: Conn, events: List[Any]) -> bool:
        """Act on parsed events; False if the connection was closed."""
        for i, ev in enumerate(events):
            kind = type(ev)
            if kind is protocol.Stdin:
                body = conn.body
                try:
                    body.append(ev.data)
                except OSError as exc:  # the spool file: disk full, file too large
                    return self._spool_failed(conn, exc)
            elif kind is protocol.Params:
                conn.params = ev.params
                try:
                    conn.body = new_body(ev.params, self.max_body_in_memory, self.max_body)
                except OSError as exc:  # no temporary file: out of descriptors, no space
                    return self._spool_failed(conn, exc)
            elif kind is protocol.StdinEnd:
                aborted = i + 1 < len(events) and any(  # usually the last event: no scan
                    type(e) is protocol.AbortRequest and e.request_id == ev.request_id
                    for e in events[i + 1 :])
                if not self._serve(conn, aborted):
                    return False
            elif kind is protocol.BeginRequest:
                conn.request_id = ev.request_id
                conn.deadline = time.monotonic() + self.read_timeout
            elif kind is protocol.AbortRequest:
                if conn.request_id == ev.request_id:
                    # Aborted before the app ran: end it without calling the app.
                    if not self._end_request(conn, 0):
                        return False
            elif kind is protocol.GetValues:
                if not self._send(conn, protocol.encode_get_values_result(
                        self._get_values(ev.names))):
                    return False
            elif kind is protocol.Rejected:
                if not self._send(conn, protocol.encode_end_request(ev.request_id, 0,
                                                                    ev.protocol_status)):
                    return False
            elif kind is protocol.UnknownType:
                if not self._send(conn, protocol.encode_unknown_type(ev.record_type)):
                    return False
        return True

    def _spool_failed(self, conn: Conn, exc: OSError) -> bool:
        """A request body that cannot be spooled costs its connection, not the worker."""
        log.error("closed a connection: cannot spool the request body to a temporary file: "
                  "%s", exc.strerror or exc)
        conn.body = None
        self._close(conn)
        return False

    def _get_values(self, names: List[str]) -> Dict[str, str]:
        known = {"FCGI_MAX_CONNS": str(self.max_idle), "FCGI_MAX_REQS": "1",
                 "FCGI_MPXS_CONNS": "0"}
        return {n: known[n] for n in names if n in known}

    def _send(self, conn: Conn, data: bytes) -> bool:
        """Answer a record that needs no app (management, refused or aborted request).

        Bounded twice: the write by ``write_timeout`` (set at once on a unix socket, whose
        peer may flood requests and never read), the number of such answers by
        ``MAX_REPLIES`` between two requests served -- past that the peer is not a web
        server doing its job, and the connection is closed.
        """
        conn.replies += 1
        if conn.replies > MAX_REPLIES:
            log.warning("closed a connection from %s: more than %d records to answer without "
                        "a request (not a web server?)", _peer_name(conn.peer), MAX_REPLIES)
            self._close(conn)
            return False
        if conn.lazy_sndtimeo is not None and not conn.timed:
            conn._set_send_timeout()
        try:
            conn.send(data)
            return True
        except ClientGone:
            self._close(conn)
            return False

    def _end_request(self, conn: Conn, app_status: int) -> bool:
        rid = conn.request_id
        self._request_done(conn)
        return self._send(conn, protocol.end_of_request(rid, app_status))

    def _request_done(self, conn: Conn) -> None:
        conn.parser.request_done()
        conn.request_id = 0
        conn.params = None
        conn.body = None

    def _park(self, conn: Conn) -> None:
        """Watch ``conn`` for its next bytes (a kept connection, or a request in progress)."""
        if self._handoff_lock is None and conn.last_used and self.handoff is not None:
            self._start_watchdog()
        if not conn.registered:
            try:
                self.epoll.register(conn.fd, _EPOLLIN)
            except OSError:
                self._close(conn)
                return
            conn.registered = True
            if len(self.conns) > self.max_idle:
                self._cap_idle()
            if len(self.conns) > MAX_UNFINISHED:
                self._cap_unfinished()

    def _cap_idle(self) -> None:
        """At most ``max_idle_connections`` idle kept connections: close the oldest.

        Called when a connection is first watched and each time one becomes idle again.
        Only kept connections that finished a request count as idle: a new one still
        waiting for its first bytes is never closed under its client.
        """
        idle = [c for c in self.conns.values() if c.last_used and not c.mid_request()]
        if len(idle) > self.max_idle:
            idle.sort(key=lambda c: c.last_used)
            for conn in idle[: len(idle) - self.max_idle]:
                self._close(conn)

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
            self._close(conn)
        log.warning("closed %d connection(s) still sending a request: more than %d "
                    "unfinished in this worker (slow or stalled clients?)",
                    excess, MAX_UNFINISHED)

    def _close(self, conn: Conn) -> None:
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
        if self._resume_accept_at:
            self._resume_accepting()  # a descriptor is free again (after EMFILE)
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

    # -- one request ----------------------------------------------------------------------

    def _serve(self, conn: Conn, aborted: bool) -> bool:
        """Run the app for the complete request on ``conn``; False if ``conn`` was closed."""
        params = conn.params or {}
        rid = conn.request_id
        if aborted:
            return self._end_request(conn, 0)
        slot = self.slot
        method = params.get("REQUEST_METHOD", "GET")
        uri = params.get("REQUEST_URI") or params.get("SCRIPT_NAME", "") + params.get(
            "PATH_INFO", "")
        slot.busy(method, uri)
        send = conn.send
        access = self.access
        if access is not None:
            access.begin()
            send = access.counting(send)
        keep = conn.parser.keep_conn
        conn.replies = 0
        self._app_enter(conn)
        code = 499  # nginx's "client closed the request", unless the response went out
        try:
            special = self._own_answer(conn, params)
            if special is not None:
                status, body, ctype, extra = special
                simple_response(send, rid, status, body, ctype, extra)
                code = int(status[:3])
            else:
                environ = self.environ.build(params, conn.body.stream())  # type: ignore
                code = run_app(self.app, environ, send, rid, self.errors,
                               self._log_exception, conn.check_abort)
        except RequestAborted as exc:
            self._app_exit()
            # Stop the output and end the request; the connection stays usable.
            log.info("%s: %s", escape(f"{method} {uri[:200]}"), exc)
            self.errors.reset()
            try:
                send(protocol.end_of_request(rid, 0))
            except ClientGone:
                slot.idle()
                if access is not None:
                    access.end(params, uri, code)
                self._request_done(conn)
                self._close(conn)
                return False
        except ClientGone as exc:
            self._app_exit()
            log.info("%s: %s (client abort?)", escape(f"{method} {uri[:200]}"), exc)
            self.errors.reset()
            slot.idle()
            if access is not None:
                access.end(params, uri, code)
            self._request_done(conn)
            self._close(conn)
            self.served += 1
            self._check_recycle()
            return False
        self._app_exit()
        slot.idle()
        if access is not None:
            access.end(params, uri, code)
        conn.parser.request_done()
        conn.request_id = 0
        conn.params = conn.body = None
        conn.last_used = now = time.monotonic()
        conn.deadline = now + IDLE_CONN_TIMEOUT
        self.served += 1
        if self.max_requests or self.max_memory:
            self._check_recycle()
        if not keep or self.stopping:
            if keep and self._hand_on_at_stop(conn):
                return conn.fd in self.conns  # handed on, or kept for another try
            self._close(conn)  # while stopping: FIN right behind END_REQUEST (see above)
            return False
        if len(self.conns) > self.max_idle:
            self._cap_idle()
            if conn.fd not in self.conns:
                return False
        if conn.pending:
            return self._handle_events(conn, self._take_pending(conn))
        return True

    @staticmethod
    def _take_pending(conn: Conn) -> List[Any]:
        events, conn.pending = conn.pending, []
        return events

    def _own_answer(self, conn: Conn, params: Dict[str, str]) -> Optional[tuple]:
        """The answer the worker gives without calling the app, if any: 413 for a body
        past ``workers.max_body``, then ping, status page and shedding."""
        if conn.body is not None and conn.body.too_large:
            return self._too_large(conn.body.size, params)
        return self._special(params) if self.has_special else None

    def _too_large(self, received: int, params: Dict[str, str]) -> tuple:
        """The 413 for a body past ``workers.max_body`` (the app is not called)."""
        announced = content_length(params)
        log.warning("answered 413 without calling the app: request body over workers.max_body "
                    "(%d bytes; CONTENT_LENGTH %s, %d bytes received); raise the limit if "
                    "such bodies are expected", self.max_body,
                    "none" if announced is None else announced, received)
        return ("413 Content Too Large",
                b"Content Too Large: the request body is over this server's limit\n",
                "text/plain; charset=utf-8", [])

    def _special(self, params: Dict[str, str]) -> Optional[tuple]:
        """Answers the worker gives itself: ping, status page, queue-timeout shedding."""
        if self.queue_timeout:
            start = params.get("REQUEST_START") or params.get("HTTP_X_REQUEST_START")
            if start:
                try:
                    begun = float(start.lstrip("t="))
                    if begun > 1e12:  # milliseconds or microseconds since the epoch
                        begun /= 1000.0 if begun < 1e15 else 1e6
                    waited = time.time() - begun
                except ValueError:
                    waited = 0.0
                if waited > self.queue_timeout:
                    self.slot.count_shed()
                    return ("503 Service Unavailable",
                            b"Service Unavailable: the request waited too long in the queue\n",
                            "text/plain; charset=utf-8", [("Retry-After", "1")])
        if self.special_prefixes:
            raw = params.get("DOCUMENT_URI") or params.get("REQUEST_URI", "")
            if not raw.startswith(self.special_prefixes) and "%" not in raw and \
                    raw[:1] == "/":
                return None  # the common case, decided without decoding the path
            path = request_path(params)
            if path and path == self.ping_path:
                if self.slot.draining():  # a stop is coming: balancers, take us out
                    return ("503 Service Unavailable", b"draining\n",
                            "text/plain; charset=utf-8", [("Cache-Control", "no-store")])
                return ("200 OK", self.ping_body, "text/plain; charset=utf-8",
                        [("Cache-Control", "no-store")])
            if path and path == self.status_path and self.status_page is not None:
                status, body, ctype = self.status_page(params.get("QUERY_STRING", ""))
                return (status, body, ctype, [("Cache-Control", "no-store")])
        return None

    def _check_recycle(self) -> None:
        """After each request: recycle after max_requests, or past max_memory.

        Memory is the peak RSS (``getrusage``: one system call, ~2 us, cheaper than a
        ``pread`` of ``/proc/self/statm``): a peak over the limit is reason enough, since the
        limit exists to beat the OOM killer. Checked after every request, not now and then:
        a burst of requests inside one second must not blow through it.
        """
        if self.stopping:
            return
        if self.max_requests and self.served >= self.max_requests:
            log.info("served %d requests (workers.max_requests): recycling", self.served)
            self._leave(EXIT_RECYCLE_REQUESTS, "max_requests")
        elif self.max_memory:
            self._check_memory()

    def _check_memory(self) -> None:
        peak = _getrusage(_RUSAGE_SELF).ru_maxrss * 1024
        if peak > self.max_memory and not self.stopping:
            log.info("memory %d MiB is over workers.max_memory (%d MiB): recycling",
                     peak >> 20, self.max_memory >> 20)
            self._leave(EXIT_RECYCLE_MEMORY, "max_memory")

    def _leave(self, exit_code: int, reason: str) -> None:
        """Stop accepting on our own, and say so at once: the master starts the replacement
        now, while this worker finishes what it serves (status shows it ``stopping``)."""
        self.exit_code = exit_code
        self.stopping = True
        self.slot.leaving()
        self._notify(notify.LEAVING, reason.encode())

    def _log_exception(self, message: str, tb: str) -> None:
        log.error("%s\n%s", message, tb.rstrip())

    def _app_error_line(self, line: str) -> None:
        log.warning("wsgi.errors: %s", line)

    def _shutdown(self) -> None:
        self._close_released()
        for conn in list(self.conns.values()):
            if conn.mid_request():
                log.warning("closing a connection with an unfinished request at exit")
            self._close(conn)
        self.slot.set_state(WorkerState.STOPPING)
        if self.access is not None:
            self.access.close()

    # -- hand-off of idle connections to sibling workers (see handoff.py) ----------------

    @property
    def _handoff_fd(self) -> int:
        return self.handoff.recv_fd if self.handoff is not None else -1

    @property
    def _previous_fd(self) -> int:
        return self.previous.recv_fd if self.previous is not None else -1

    def _start_handoff(self) -> None:
        """Watch the shared hand-off socket (wake-one); the watchdog thread starts with the
        first connection this worker parks (:meth:`_start_watchdog`)."""
        assert self.handoff is not None
        self.epoll.register(self.handoff.recv_fd,
                            _EPOLLIN | getattr(select, "EPOLLEXCLUSIVE", 0))
        if self.previous is not None:
            self.epoll.register(self.previous.recv_fd,
                                _EPOLLIN | getattr(select, "EPOLLEXCLUSIVE", 0))
        self._placeholder = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def _start_watchdog(self) -> None:
        """The first kept connection parked: from now on there are idle connections to hand
        off while the app runs. Until then -- keep-conn off, where a connection is parked
        only for the moment its request takes to arrive -- no thread wakes every 5 ms for
        nothing (measured: 0.3 clock_nanosleep and 0.1 futex per request, and its
        memory). Called by the main thread outside the app call."""
        lock = threading.Lock()
        lock.acquire()  # held by this thread except around the app call
        self._handoff_lock = lock
        Watchdog(lock, lambda: self._app_calls,
                 lambda: self._release_idle(self._serving)).start()

    def _app_enter(self, conn: Conn) -> None:
        """The app is about to run for ``conn``: the watchdog may now move the others."""
        lock = self._handoff_lock
        if lock is not None:
            self._serving = conn
            self._app_calls += 1
            lock.release()

    def _app_exit(self) -> None:
        lock = self._handoff_lock
        if lock is not None:
            lock.acquire()  # waits only if the watchdog is handing off at this instant
            self._serving = None

    def _release_idle(self, serving: Optional[Conn]) -> int:
        """Hand every connection that is between requests (except ``serving``) to the
        siblings; return how many movable ones stay here (the queue is full).

        Called by the watchdog while the app runs (the main thread then touches no
        connection but ``serving``), or by the main thread once stopping.
        """
        handoff = self.handoff
        assert handoff is not None
        movable = [c for c in self.conns.values()
                   if c is not serving and not c.pending and not c.mid_request()]
        for i, conn in enumerate(movable):
            flags = (FLAG_KEPT if conn.last_used else 0) | (FLAG_SNDTIMEO if conn.timed else 0)
            result = handoff.offer(conn.fd, conn.peer, flags)
            if result != SENT:
                return 0 if result == CLOSED else len(movable) - i
            self._let_go(conn)
        return 0

    def _let_go(self, conn: Conn) -> None:
        """Forget ``conn`` once handed off, and drop our reference to its socket now.

        Now, not once the app returns: until the last reference is gone, a close by the
        worker that took it would not reach the web server. Unregistered first: epoll
        watches the socket, not the number, and the socket lives on elsewhere. The number
        stays taken by a placeholder until the main thread closes it between two polls
        (:meth:`_close_released`), so that an epoll event already fetched for it can
        never be mistaken for a new connection's.
        """
        fd = conn.fd
        del self.conns[fd]
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        os.dup2(self._placeholder, fd, inheritable=False)
        self._released.append(fd)

    def _close_released(self) -> None:
        """Free the numbers of the connections handed off (see :meth:`_let_go`)."""
        fds, self._released = self._released, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def _take_handed(self, handoff: HandoffChannel) -> None:
        """Take connections a sibling (or an old generation's worker) let go of; their
        next request may already be here."""
        now = time.monotonic()
        for handed in handoff.take():
            conn = Conn(handed.fd, handed.peer, protocol.DEFAULT_MAX_PARAMS)
            conn.timed = bool(handed.flags & FLAG_SNDTIMEO)
            if handed.flags & FLAG_KEPT:
                conn.last_used = now
                conn.deadline = now + IDLE_CONN_TIMEOUT
            else:
                conn.deadline = now + self.read_timeout
            self.conns[conn.fd] = conn
            self._park(conn)  # level-triggered: a waiting request shows at the next poll
        if handoff.closed:
            self._stop_taking(handoff)

    def _stop_taking(self, handoff: Optional[HandoffChannel] = None) -> None:
        """Stop watching ``handoff`` (shut and empty), or both channels (stopping)."""
        for channel in (self.handoff, self.previous):
            if channel is None or (handoff is not None and channel is not handoff):
                continue
            try:
                self.epoll.unregister(channel.recv_fd)
            except (OSError, ValueError):
                pass
            if channel is self.previous:  # the old generation is gone: let go of it
                channel.close()
                self.previous = None

    def _hands_on(self) -> bool:
        """Once stopping: hand idle connections on (recycle, scale-down, reload), or keep
        them and close them once idle (a full stop shuts the channel; the master is
        gone; ondemand, where no sibling may be left to take them)."""
        if self._hand_on is None:
            handoff = self.handoff
            self._hand_on = bool(handoff is not None and not self._master_gone
                                 and self.cfg.workers.mode != "ondemand" and handoff.is_open())
            if self._hand_on:
                self._stop_taking()
        return self._hand_on

    def _hand_on_at_stop(self, conn: Conn) -> bool:
        """Stopping, right after END_REQUEST on a kept connection: False = close it as
        usual; True = hand it on: done (it left ``conns``), or the queue is full and it
        stays, parked, for :meth:`_retire_idle_kept` to try again."""
        if conn.pending or not self._hands_on():
            return False
        assert self.handoff is not None
        result = self.handoff.offer(conn.fd, conn.peer,
                                    FLAG_KEPT | (FLAG_SNDTIMEO if conn.timed else 0))
        if result == SENT:
            self._let_go(conn)
        return result != CLOSED


def _freeze_setup() -> None:
    """Hide what the worker allocated to get here from the garbage collector.

    The master froze the preloaded app before forking; what the worker built since (its
    own objects, the app when it is imported after the fork, ``post_fork``'s work) lives as
    long as the worker too. Frozen, a collection neither walks it (CPU per collection) nor
    writes its headers (pages that stay shared or clean).
    """
    gc.collect()
    if hasattr(gc, "freeze"):
        gc.freeze()


def _peer_name(peer: Any) -> str:
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return "the unix socket"


def current_rss() -> int:
    """This process's resident set size, from /proc (no psutil on the request path)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

