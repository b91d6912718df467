"""The master's shell: one selector, the processes, the pipes and sockets.

Every decision is the supervisor's (``supervisor.py``: events in, actions out); this
module performs its actions and feeds it what happened. One thread and one selector
watch: the signal wakeup pipe, the control socket and its connections
(``control_server``), each worker's output pipe (logged line by line) and notify pipe
(ready, or its boot error: ``notify``), the reload's check process, and, for ``ondemand``,
the listening socket. Signal handlers only queue the signal; signals and control commands
meet in :meth:`Master.command`. The loop reaps children (``waitpid(-1, WNOHANG)``) on
every turn, and every ``TICK`` reads the scoreboard into a ``Tick`` for the supervisor's
timers; every ``SAMPLE_EVERY`` seconds it samples each worker's memory and CPU. Nothing
in the loop waits: a slow reload check, a slow control client, a slow worker each cost
one descriptor in the selector.

Workers never outlive the master: each holds the read end of a pipe whose write end only
the master has; its EOF (the master died, even by SIGKILL) makes them finish and exit.

Reload with fresh code re-executes the master in place (``resume.py``): the new image
adopts the listening socket, control socket, scoreboard and the old workers, starts the
new generation, and the supervisor retires the old one once all of the new is ready.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import selectors
import signal
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import psutil

from .. import accesslog, fdutil, logs, sockets
from .. import status as status_mod
from ..config import Config, settings_environment
from ..errors import FcgiManagerError
from ..escaping import escape
from ..privileges import apply_environment, resolve_user
from ..rules import supervisor as sv
from ..rules.restarts import describe_exit
from ..scoreboard import MAX_SLOTS, Scoreboard
from ..version import __version__
from ..wire import control, notify
from ..wire.codes import WAKE_SIGNAL
from ..wire.states import WorkerState
from ..worker.appload import load_app, prepare_import
from ..worker.handoff import HandoffChannel
from . import daemon, execsig, kinship, procctl, proctitle
from .children import (
    HANDLED_SIGNALS,
    MasterFds,
    WorkerSetup,
    close_quietly,
    fork_validation,
    fork_worker,
    start_zygote,
)
from .control_server import ControlConnection, ControlServer
from .resume import ResumedWorker, ResumeState, take_state
from .zygote import FAILED, IMPORT_ERROR, READY, SPAWNED, Zygote, new_zygote_wanted

log = logging.getLogger("fcgi_manager.master")

TICK = 0.25
SAMPLE_EVERY = 2.0  # memory and CPU of every worker (and at each status request)
MAX_LINE = 16384  # a worker's output line longer than this is logged in pieces
UNCLAIMED_MAX = 64  # exits of unknown children remembered for a zygote report still due
CHANNEL_DRAIN_AFTER = 1.0  # seconds the new workers have to take the old generation's last
SIGNAL_COMMANDS: Dict[int, Tuple[str, Dict[str, object]]] = {
    signal.SIGTERM: ("stop", {}), signal.SIGQUIT: ("stop", {}),
    signal.SIGINT: ("stop", {"now": True}), signal.SIGHUP: ("reload", {}),
    signal.SIGUSR1: ("reopen-logs", {}), signal.SIGTTIN: ("scale", {"value": "+1"}),
    signal.SIGTTOU: ("scale", {"value": "-1"}),
}


class WorkerIO:
    """The master's end of one worker's pipes."""

    __slots__ = ("pid", "slot", "out_fd", "notify_fd", "out_buf", "notes", "proc")

    def __init__(self, pid: int, slot: int, out_fd: int, notify_fd: int) -> None:
        self.pid = pid
        self.slot = slot
        self.out_fd = out_fd
        self.notify_fd = notify_fd
        self.out_buf = b""
        self.notes = notify.Decoder()
        self.proc: Optional[psutil.Process] = None


class Validation:
    """The reload's check process while it runs: its pipe's text and, once reaped, status."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd
        self.chunks: List[bytes] = []
        self.status: Optional[int] = None


class Master:
    """The shell. Build it, call :meth:`prepare`, then :meth:`run`."""

    def __init__(self, cfg: Config, app: Optional[Callable] = None,
                 log_handler: Optional[logs.ReopenableHandler] = None) -> None:
        self.cfg = cfg
        self.app = app  # given directly by the Python API; else imported from app.module
        self.app_given = app is not None
        self.log_handler = log_handler or logs.setup_master(
            cfg.manager.log, cfg.manager.log_level, cfg.manager.log_format)
        # Under socket activation, a passed socket that is listen.bind serves as "systemd".
        self.address = sockets.activated(sockets.parse_address(cfg.listen.bind))
        self.user = resolve_user(cfg.manager.user, cfg.manager.group)
        self.selector = selectors.DefaultSelector()
        self.sup = sv.Supervisor(cfg.workers, master_pid=os.getpid(), max_slots=MAX_SLOTS,
                                 log_path=cfg.manager.log, in_place_reload=self.app_given,
                                 shutdown_delay=cfg.manager.shutdown_delay,
                                 strict=os.environ.get("FCGI_MANAGER_STRICT") == "1")
        self.listener: Optional[socket.socket] = None
        self.listener_watched = False
        # Idle kept connections, worker to worker: one channel per generation (handoff.py).
        self.channels: Dict[int, HandoffChannel] = {}
        self.taken_generation = 0  # the older generation whose channel new workers take from
        self.retire_at = 0.0  # when that channel, shut, is drained and closed
        self.sock_inode = 0
        self.control: Optional[ControlServer] = None
        self.status_listener: Any = None  # status_listen.StatusListener, for status.listen
        self.board = Scoreboard(0)  # replaced in prepare()
        self.death_r = self.death_w = -1
        self.wakeup_r = self.wakeup_w = -1
        self.io: Dict[int, WorkerIO] = {}
        self.validation: Optional[Validation] = None
        self.cancelled_checks: Set[int] = set()
        self.signals: List[int] = []
        self.started_at = time.time()
        self.resumed: Optional[ResumeState] = None
        self.base_modules: frozenset = frozenset(sys.modules)
        self.child_close_fds: List[int] = []  # e.g. the start handshake pipe
        self.ready_callback: Optional[Callable[[bool, str], None]] = None
        self.pidfile_fd = -1  # locked by this process while it runs (see daemon.py)
        self.client_filter: Optional[sockets.ClientFilter] = None
        self.zygote: Optional[Zygote] = None  # preload as root, or in a re-executed master
        self.retired_zygotes: Set[int] = set()  # killed or the previous image's: reaped quietly
        self.unclaimed: Dict[int, int] = {}  # pid -> status: children reaped before reported
        self.exec_env: Dict[str, str] = dict(os.environ)
        # The settings' variables as the master found them: app.clear_env empties its
        # environment, and every re-read of the config must see the same settings.
        self.settings_env: Dict[str, str] = settings_environment()
        self.running = False
        self.next_tick = self.next_sample = 0.0

    # -- what the CLI uses ------------------------------------------------------------------

    @property
    def workers(self) -> Dict[int, sv.WorkerRecord]:
        return self.sup.workers

    @property
    def exit_code(self) -> int:
        return self.sup.exit_code

    def stop(self, now: bool) -> None:
        self.feed(sv.Command("stop", {"now": now}, None, time.monotonic()))

    def pidfile_failed(self, error: str) -> None:
        """Ready, but the pidfile could not be written: stop now and exit 1."""
        self.feed(sv.PidfileFailed(error, time.monotonic()))

    # -- preparing ------------------------------------------------------------------------

    def prepare(self) -> None:
        """Bind, import (with preload), create the scoreboard and control socket.

        Every failure raises a FcgiManagerError whose message ``start`` prints.
        """
        cfg = self.cfg
        _stop_signals_end_the_start()
        self.resumed = take_state()
        if self.resumed is not None:  # signals held across the exec: queue them for the loop
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, self._queue_signal)
            execsig.release(HANDLED_SIGNALS)
        if self.resumed is None:
            self.listener = sockets.create_listener(self.address, cfg.listen.backlog,
                                                    cfg.listen.mode, cfg.listen.owner,
                                                    cfg.listen.group)
            self.sock_inode = sockets.socket_file_inode(self.address)
            from .. import acl

            acl.grant(self.address.path if self.address.kind == "unix" else "",
                      cfg.listen.acl_users, cfg.listen.acl_groups)
        from .. import limits
        from . import status_listen

        limits.check(cfg.manager)
        self.status_listener = status_listen.open_for(cfg, self.selector, lambda: self.board,
                                                      time.monotonic)
        os.umask(cfg.manager.umask)
        # Before app.clear_env empties the environment: the filter never depends on it.
        self.client_filter = sockets.ClientFilter.from_config(cfg.listen.allowed_clients)
        self.exec_env = dict(os.environ)  # the master's own, for the reload's exec
        apply_environment(cfg.app)
        if not self.app_given:
            prepare_import(cfg.app.path, cfg.app.chdir)
        self.base_modules = frozenset(sys.modules)
        if cfg.app.preload and not self.app_given and not self._zygote_wanted():
            # Not root, or no manager.user, and not re-executed by a reload: this is
            # `start`, which waits for the import anyway; no loop runs yet.
            self.app = load_app(cfg.app.module)
            gc.collect()
            if hasattr(gc, "freeze"):
                gc.freeze()  # keep the imported app's pages shared with the workers
        self.board.close()  # the empty stand-in from __init__
        if self.resumed is None:
            self.board = Scoreboard(MAX_SLOTS)
            self.death_r, self.death_w = os.pipe()
            control_sock = control.bind_control(cfg.manager.control)
        else:
            control_sock = self._adopt(self.resumed)
        self.control = ControlServer(control_sock, self.selector, self._on_control_request,
                                     time.monotonic)
        if self.resumed is not None:
            self._adopt_workers(self.resumed)
        self._close_on_exec()
        self._prepare_access_log()
        if self._zygote_wanted() and self.resumed is None:
            self._start_zygote(self.sup.generation).wait_ready()  # `start` waits for it
        self._warn_web_user()
        self._warn_keepalive()

    def _prepare_access_log(self) -> None:
        try:
            accesslog.prepare_master(self.cfg, self.user.uid, self.user.gid)
        except OSError as exc:
            raise FcgiManagerError(f"cannot open the access log {self.cfg.manager.access_log}: "
                                   f"{exc.strerror}", "check manager.access_log and its "
                                   "directory's permissions") from None

    def _close_on_exec(self) -> None:
        """Nothing the master owns reaches a program the app starts. Descriptors carried
        across the reload's exec arrive inheritable: make them close-on-exec again."""
        fds = [self.death_r, self.death_w, self.pidfile_fd]
        if self.listener is not None:
            fds.append(self.listener.fileno())
        if self.board.fd is not None:
            fds.append(self.board.fd)
        for channel in self.channels.values():
            fds += channel.fds()
        fds += self._child_fds().fds
        fdutil.set_cloexec(fds)

    def _adopt(self, state: ResumeState) -> socket.socket:
        self.listener = socket.socket(fileno=state.listener_fd)
        self.sock_inode = state.sock_inode
        if state.handoff_fds:  # the old generation's: it is shut and closed when it ends
            old = HandoffChannel.from_fds(state.handoff_fds)
            old.uid = state.handoff_uid
            if old.uid < 0:
                old.shut()  # the new workers take nothing: the old ones close theirs
            self.channels[state.generation] = old
        self.board = Scoreboard(MAX_SLOTS, fd=state.board_fd)
        self.death_r, self.death_w = state.death_r, state.death_w
        if state.zygote_pid:
            self.retired_zygotes.add(state.zygote_pid)  # it exits now that we exec'd
        self.started_at = state.started_at
        return socket.socket(fileno=state.control_fd)

    def _adopt_workers(self, state: ResumeState) -> None:
        assert self.control is not None
        adopted = []
        for r in state.workers:
            adopted.append(sv.AdoptedWorker(r.slot, r.pid, r.generation, r.started, r.ready,
                                            self.board.worker_id(r.slot), r.stop_reason,
                                            r.kill_at))
            self._watch(WorkerIO(r.pid, r.slot, r.out_fd, r.notify_fd))
        waiters = tuple(self.control.adopt(fd) for fd in state.waiter_fds)
        self.feed(sv.Resumed(tuple(adopted), state.generation, waiters, time.monotonic(),
                             totals=state.totals, max_queue=state.max_queue,
                             scale=state.scale))

    def _warn_web_user(self) -> None:
        li = self.cfg.listen
        if self.address.kind == "unix" and li.owner and not (int(li.mode, 8) & 0o006):
            try:
                import pwd
                pw = pwd.getpwnam(li.owner)
                st = os.stat(self.address.path)
                if st.st_uid != pw.pw_uid and (st.st_gid not in os.getgrouplist(
                        li.owner, pw.pw_gid) or not int(li.mode, 8) & 0o060):
                    log.warning("the web server user %s cannot connect to %s (mode %s): fix "
                                "listen.owner/group/mode", li.owner, self.address.path, li.mode)
            except (KeyError, OSError):
                pass

    def _warn_keepalive(self) -> None:
        w = self.cfg.workers
        if w.max_idle_connections and w.effective_count * w.max_idle_connections < 16:
            log.warning("workers hold at most %d idle kept connections in all; an nginx "
                        "upstream keepalive above that makes nginx reconnect often: raise "
                        "workers.max_idle_connections", w.effective_count * w.max_idle_connections)

    # -- the loop -------------------------------------------------------------------------

    def run(self, ready_callback: Optional[Callable[[bool, str], None]] = None) -> int:
        """The loop; returns the exit status once every worker is gone."""
        # A re-executed master is already "started": its readiness is the reload's.
        self.ready_callback = None if self.resumed else ready_callback
        proctitle.set_master(proctitle.title_name(self.cfg), proctitle.title_config(self.cfg))
        self._install_signals()
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, ("wakeup", None))
        self._write_header()
        if self.resumed:
            log.info("reloaded (generation %d): starting new workers, the %d old ones keep "
                     "serving until they are ready", self.sup.generation, len(self.io))
        else:
            log.info("fcgi-manager %s master started on %s: %d worker(s), app %s",
                     __version__, self.address, self.sup.target, self.cfg.app.module)
        self.running = True
        self.feed(sv.Started(time.monotonic()))
        while self.running:
            self._turn()
        self._cleanup()
        log.info("master stopped")
        return self.sup.exit_code

    def _turn(self) -> None:
        """One turn of the loop: wait for something, handle it, reap, tick."""
        timeout = max(0.0, self.next_tick - time.monotonic())
        try:
            events = self.selector.select(timeout)
        except InterruptedError:
            events = []
        for key, mask in events:
            kind, obj = key.data
            if kind == "wakeup":
                self._drain_wakeup()
            elif kind == "control" and self.control is not None:
                self.control.on_event(obj, mask)
            elif kind == "status_listen" and self.status_listener is not None:
                self.status_listener.on_event(obj, mask)
            elif kind == "listener":
                self.feed(sv.ListenerReadable(time.monotonic(), self._slot_views()))
            elif kind == "out":
                self._read_output(obj)
            elif kind == "notify":
                self._read_notify(obj)
            elif kind == "validation":
                self._read_validation()
            elif kind == "zygote":
                self._on_zygote(obj)
        self._handle_signals()
        self._reap()
        now = time.monotonic()
        if now >= self.next_tick and self.running:
            self.next_tick = now + TICK
            self._tick(now)
            if self.status_listener is not None:
                self.status_listener.sweep(now)

    def feed(self, event: sv.Event) -> None:
        """Give the supervisor one event and perform its actions (which may feed more)."""
        queue = [event]
        while queue:
            for action in self.sup.handle(queue.pop(0)):
                follow_up = self._perform(action)
                if follow_up is not None:
                    queue.append(follow_up)

    # -- signals --------------------------------------------------------------------------

    def _install_signals(self) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self.wakeup_r, self.wakeup_w = r, w
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._queue_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _queue_signal(self, signum: int, frame: Any) -> None:
        # Only record it: the loop acts on it (logging here could deadlock).
        self.signals.append(signum)

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self.wakeup_r, 4096):
                pass
        except OSError:
            pass

    def _handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            action = SIGNAL_COMMANDS.get(sig)
            if action is None:
                continue  # SIGCHLD: reaping follows in this turn of the loop
            log.info("got %s: %s", signal.Signals(sig).name, action[0])
            try:
                self.command(action[0], dict(action[1]), None)
            except FcgiManagerError as exc:
                log.error("%s failed: %s", action[0], exc.message)

    # -- commands (signals and control socket) ----------------------------------------------

    def command(self, name: str, args: Dict[str, Any],
                client: Optional[ControlConnection]) -> Optional[Dict[str, Any]]:
        """Run one command; returns the reply, or None when the supervisor replies."""
        if name in ("status", "ping"):
            self._sample(time.monotonic())
            self._write_header()
            return status_mod.snapshot(self.cfg, self.board)
        if name == "reopen-logs":
            error = self.log_handler.reopen()
            if error:
                log.error("reopen-logs: %s; logging goes on to the old file", error)
                raise FcgiManagerError(f"{error} (logging goes on to the old file, if any)")
            log.info("reopened the log file %s", self.cfg.manager.log)
            if self.cfg.manager.access_log:
                self._prepare_access_log()
            if self.cfg.manager.access_log or self.cfg.manager.log not in ("", "-"):
                # Workers write both files themselves (a log file: outpipe.FileLineWriter).
                self.board.bump_log_epoch()
                # Busy workers reopen at their next write; idle ones now (the signal only
                # wakes their loop), so a rotated file is not held open by a quiet worker.
                # Only ready ones: a worker still starting has no handler for it yet.
                for w in self.sup.workers.values():
                    if w.ready:
                        try:
                            os.kill(w.pid, WAKE_SIGNAL)
                        except ProcessLookupError:
                            pass
            return {"reopened": self.cfg.manager.log}
        if name in ("stop", "scale", "reload"):
            self.feed(sv.Command(name, args, client, time.monotonic()))
            self._write_header()
            return None
        raise FcgiManagerError(f"unknown command {name!r}")

    def _on_control_request(self, conn: ControlConnection, req_id: Any, name: str,
                            args: Dict[str, Any]) -> None:
        assert self.control is not None
        try:
            result = self.command(name, args, conn)
        except FcgiManagerError as exc:
            self.control.reply(conn, ok=False, error=exc.message)
            return
        if result is not None:
            self.control.reply(conn, ok=True, result=result)

    # -- actions --------------------------------------------------------------------------

    def _perform(self, action: sv.Action) -> Optional[sv.Event]:
        """Carry out one action; an event to feed back, if it has one."""
        if isinstance(action, sv.Log):
            log.log(action.level, "%s", action.message)
        elif isinstance(action, sv.Spawn):
            return self._spawn(action.slot, action.generation, action.worker_id)
        elif isinstance(action, sv.Signal):
            self._signal(action.pid, action.sig)
        elif isinstance(action, sv.MarkStopping):
            self.board.mark_stopping(action.slot)
        elif isinstance(action, sv.MarkStuck):
            self.board.mark_stuck(action.slot)
        elif isinstance(action, sv.MarkSlowDumped):
            self.board.mark_slow_dumped(action.slot, action.request_no)
        elif isinstance(action, sv.Reply):
            self._reply(action)
        elif isinstance(action, sv.Validate):
            self._start_validation()
        elif isinstance(action, sv.CancelValidation):
            self._cancel_validation()
        elif isinstance(action, sv.ReExec):
            return self._reexec()
        elif isinstance(action, sv.NotifySystemd):
            self._notify_systemd(action.message)
        elif isinstance(action, sv.ReportReady):
            self._report_ready(action.ok, action.text)
        elif isinstance(action, sv.CloseListener):
            self._close_listener()
            for channel in self.channels.values():
                channel.shut()  # nobody is left to take a kept connection
            if self.zygote is not None:  # a full stop: no worker is wanted any more
                self._zygote_gone(self.zygote, "is not needed: the master stops")
        elif isinstance(action, sv.SetDraining):
            self.board.set_draining(True)
        elif isinstance(action, sv.WatchListener):
            self._watch_listener(action.on)
        elif isinstance(action, sv.Exit):
            self.running = False
        else:
            raise TypeError(f"unknown supervisor action {action!r}")
        return None

    def _reply(self, reply: sv.Reply) -> None:
        if reply.client is None:  # the command came from a signal: the log is the answer
            if not reply.ok:
                log.error("%s", reply.error)
        elif self.control is not None:
            self.control.reply(reply.client, reply.ok, reply.result, reply.error)

    def _report_ready(self, ok: bool, text: str) -> None:
        """Run the ready callback (it writes the pidfile) before telling systemd: an
        ``ExecReload`` that reads the pidfile right after ``READY=1`` must find it."""
        callback, self.ready_callback = self.ready_callback, None
        if callback is not None:
            callback(ok, text)
        if ok:
            self._notify_systemd(f"READY=1\nMAINPID={os.getpid()}")

    def _notify_systemd(self, message: str) -> None:
        from .systemd import notify as sd_notify

        sd_notify(message)

    # -- workers --------------------------------------------------------------------------

    def _child_fds(self) -> MasterFds:
        """What a child must close: what only the master may hold (the death pipe's write
        end, the control socket, the other workers' pipes, the pidfile, the log)."""
        fds = [self.wakeup_r, self.wakeup_w, self.death_w, self.pidfile_fd,
               *self.child_close_fds]
        if self.control is not None:
            fds += self.control.child_fds()
        if self.status_listener is not None:
            fds += self.status_listener.child_fds()
        for io in self.io.values():
            fds += [io.out_fd, io.notify_fd]
        if self.validation is not None:
            fds.append(self.validation.fd)
        if self.zygote is not None:
            fds.append(self.zygote.sock.fileno())
        return MasterFds(self.selector, fds, self.log_handler)

    def _setup(self, generation: int) -> WorkerSetup:
        previous = self._previous_channel(generation)
        if previous is not None:
            self.taken_generation = previous[0]
        return WorkerSetup(cfg=self.cfg, app=self.app, listener=self.listener,
                           board=self.board, death_r=self.death_r, user=self.user,
                           master_pid=os.getpid(), client_filter=self.client_filter,
                           handoff=self._channel(generation), generation=generation,
                           previous=previous[1] if previous else None,
                           previous_generation=previous[0] if previous else 0)

    def _channel(self, generation: int) -> HandoffChannel:
        """The hand-off channel of ``generation``, made before its first worker forks."""
        channel = self.channels.get(generation)
        if channel is None:
            channel = self.channels[generation] = HandoffChannel.create()
            channel.uid = self._worker_uid()
        return channel

    def _worker_uid(self) -> int:
        """The uid the workers run as (the kernel's word on a hand-off's sender)."""
        return self.user.uid if self.user.switching and self.user.uid is not None \
            else os.geteuid()

    def _previous_channel(self, generation: int) -> Optional[Tuple[int, HandoffChannel]]:
        """The channel of the generation a reload replaces, while it has workers:
        ``generation``'s workers take from it too (its receive end only), so that the
        old workers hand their idle kept connections on instead of closing them under
        nginx. Its gate admits only the old generation's own workers."""
        alive = {w.generation for w in self.sup.workers.values()}
        older = [g for g in self.channels if g < generation and g in alive
                 and not self.channels[g].closed and self.channels[g].uid >= 0]
        if not older:
            return None
        g = max(older)
        return g, self.channels[g]

    def _retire_channels(self) -> None:
        """A generation's channel ends with its last worker: drain what is queued (nobody
        would take it) and close it, so that nothing left behind can use it.

        The channel the current generation's workers also take from (a reload's old one)
        is shut at once -- nothing can be sent on it any more -- but drained a moment
        later: what its last worker handed on just before it exited is taken first."""
        alive = {w.generation for w in self.sup.workers.values()}
        alive |= {gen for gen, _ in self.sup.pending.values()}
        now = time.monotonic()
        for generation in [g for g in self.channels
                           if g != self.sup.generation and g not in alive]:
            channel = self.channels[generation]
            if generation == self.taken_generation and channel.uid >= 0:
                if not channel.closed:
                    channel.shut()
                    self.retire_at = now + CHANNEL_DRAIN_AFTER
                if now < self.retire_at:
                    continue
            del self.channels[generation]
            channel.shut()
            dropped = channel.drain()
            if dropped:
                log.info("closed %d kept connection(s) left in generation %d's hand-off "
                         "channel", dropped, generation)
            channel.close()

    def _signal(self, pid: int, sig: int) -> None:
        """Signal a worker (accepted as our own child: kinship.py). Before an older
        generation's worker is told to stop, its channel is shut: its siblings stop too, so
        a connection handed on there would wait for nobody; they close them instead."""
        w = self.sup.workers.get(pid)
        if w is not None and w.generation != self.sup.generation \
                and w.generation != self.taken_generation \
                and sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGKILL):
            channel = self.channels.get(w.generation)
            if channel is not None:
                channel.shut()
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _max_requests(self) -> int:
        import random

        w = self.cfg.workers
        if not w.max_requests:
            return 0
        return w.max_requests + (random.randint(0, w.max_requests_jitter)
                                 if w.max_requests_jitter else 0)

    def _spawn(self, slot: int, generation: int, worker_id: int = 0) -> Optional[sv.Event]:
        # Pid -1 until the worker is known: the slot is taken (its thread entries too) but
        # status shows no worker in it; a zygote's answer may come turns later.
        self.board.assign(slot, -1, generation, worker_id)
        if self.cfg.workers.threads > 1:
            self.board.reserve_threads(slot, self.cfg.workers.threads)
        try:
            if self._zygote_wanted():
                self._fork_from_zygote(slot, generation)
                return None  # its answer comes through the selector (_on_zygote)
            pid, out_fd, notify_fd = fork_worker(self._setup(generation), slot,
                                                 self._max_requests(), self._child_fds())
        except (OSError, FcgiManagerError) as exc:
            self.board.clear(slot)
            text = exc.message if isinstance(exc, FcgiManagerError) else str(exc)
            return sv.SpawnFailed(slot, text, time.monotonic())
        return self._spawned(slot, pid, out_fd, notify_fd)

    def _spawned(self, slot: int, pid: int, out_fd: int, notify_fd: int) -> sv.Spawned:
        os.set_blocking(out_fd, False)
        os.set_blocking(notify_fd, False)
        self.board.set_pid(slot, pid)
        self._watch(WorkerIO(pid, slot, out_fd, notify_fd))
        return sv.Spawned(slot, pid, time.monotonic())

    # -- the zygote (preload as root with manager.user, or in a re-executed master) ---------

    def _zygote_wanted(self) -> bool:
        """Preload as root with manager.user (no app code as root), or preload in a master
        re-executed by a reload (its loop must not wait for an import: the next
        generation's zygote imports while the loop goes on)."""
        if new_zygote_wanted(self.cfg.app.preload, self.app_given, self.user):
            return True
        return self.cfg.app.preload and not self.app_given and self.resumed is not None

    def _start_zygote(self, generation: int) -> Zygote:
        """Fork the zygote of ``generation``; it imports while the loop goes on."""
        zygote = start_zygote(self._setup(generation), self._child_fds(), sv.READY_TIMEOUT)
        self.zygote = zygote
        self.selector.register(zygote.sock, selectors.EVENT_READ, ("zygote", zygote))
        log.info("importing the app in pid %d as %s (workers are forked from it)",
                 zygote.pid, self.cfg.manager.user or "the master's user")
        return zygote

    def _fork_from_zygote(self, slot: int, generation: int) -> None:
        """Ask the generation's zygote for a worker, starting one if there is none (it
        died, was replaced, or is of an older generation)."""
        zygote = self.zygote
        if zygote is not None and (not zygote.alive or zygote.generation != generation):
            self._zygote_gone(zygote, "replaced" if zygote.alive else "gone")
            zygote = None
        if zygote is None:
            zygote = self._start_zygote(generation)
        zygote.request(slot, self._max_requests())
        if not zygote.alive:
            self._zygote_gone(zygote, "it stopped answering")

    def _on_zygote(self, zygote: Zygote) -> None:
        """What the zygote said: ready, its import failed, a worker forked, or not."""
        for event in zygote.on_readable():
            if event[0] == READY:
                log.info("the app is imported in pid %d", zygote.pid)
            elif event[0] == IMPORT_ERROR:
                log.error("importing the app in pid %d failed: %s", zygote.pid,
                          event[1].message)
            elif event[0] == SPAWNED:
                self._zygote_spawned(zygote, *event[1:])
            elif event[0] == FAILED:
                self.board.clear(event[1])
                self.feed(sv.SpawnFailed(event[1], str(event[2]), time.monotonic()))
        if not zygote.alive:
            self._zygote_gone(zygote, "it exited")

    def _zygote_spawned(self, zygote: Zygote, slot: int, pid: int, out_fd: int,
                        notify_fd: int) -> None:
        """The zygote says ``pid`` is the worker for ``slot``: believed only if the kernel
        agrees (kinship.py). Otherwise the zygote runs code that lies: it is replaced."""
        expected = self.user.uid if self.user.switching and self.user.uid is not None \
            else os.geteuid()
        known = set(self.io) | self.retired_zygotes | {zygote.pid}
        if self.validation is not None:
            known.add(self.validation.pid)
        status = self.unclaimed.pop(pid, None)
        why = (f"pid {pid} is already one of the master's processes" if pid in known
               else None if status is not None else kinship.why_not_our_child(pid, expected))
        if why is not None:
            close_quietly(out_fd)
            close_quietly(notify_fd)
            log.error("the zygote (pid %d) reported pid %d as a new worker, but %s: "
                      "ignored, and the zygote is replaced", zygote.pid, pid, why)
            self.board.clear(slot)
            self.feed(sv.SpawnFailed(slot, f"the zygote reported a process that is not "
                                           f"its worker ({why})", time.monotonic()))
            self._zygote_gone(zygote, "it reported a process that is not its worker")
            return
        self.feed(self._spawned(slot, pid, out_fd, notify_fd))
        if status is not None:  # it died before we heard of it: reaped already
            self._worker_exited(pid, status)

    def _zygote_gone(self, zygote: Zygote, why: str, reaped: bool = False) -> None:
        """Kill a zygote that died, hung, lied or is of an older generation, without
        waiting; the slots it still owed a worker fail (the supervisor retries)."""
        try:
            self.selector.unregister(zygote.sock)
        except (KeyError, ValueError, OSError):
            pass
        pending = zygote.pending_slots() if zygote.alive or zygote.asked or zygote.queued \
            else []
        zygote.kill()
        zygote.asked, zygote.queued = [], []
        if not reaped:
            self.retired_zygotes.add(zygote.pid)
        if self.zygote is zygote:
            self.zygote = None
        if pending:
            log.warning("the app's zygote (pid %d) is replaced: %s", zygote.pid, why)
        for slot in pending:
            self.board.clear(slot)
            self.feed(sv.SpawnFailed(slot, f"the app's zygote {why}", time.monotonic()))

    def _watch(self, io: WorkerIO) -> None:
        self.io[io.pid] = io
        self.selector.register(io.out_fd, selectors.EVENT_READ, ("out", io))
        self.selector.register(io.notify_fd, selectors.EVENT_READ, ("notify", io))

    def _unwatch_fd(self, fd: int) -> None:
        if fd < 0:
            return
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass
        close_quietly(fd)

    def _read_output(self, io: WorkerIO, final: bool = False) -> None:
        """Log what the worker wrote, a line at a time; ``final``: all of it, it exited."""
        while io.out_fd >= 0:
            data = fdutil.read_pipe(io.out_fd, final)
            if data is None:
                return
            if not data:
                self._unwatch_fd(io.out_fd)
                io.out_fd = -1
                break
            *lines, rest = (io.out_buf + data).split(b"\n")
            for line in lines:
                self._log_worker_line(io, line)
            if len(rest) > MAX_LINE:
                self._log_worker_line(io, rest)
                rest = b""
            io.out_buf = rest
            if not final:
                return
        if io.out_buf:
            self._log_worker_line(io, io.out_buf)
            io.out_buf = b""

    def _log_worker_line(self, io: WorkerIO, line: bytes) -> None:
        logs.worker_line(self.log_handler, self.board.worker_id(io.slot), io.pid,
                         line.rstrip(b"\r").decode("utf-8", "replace"))

    def _read_notify(self, io: WorkerIO, final: bool = False) -> None:
        """Frames from the notify pipe; ``final``: all of them, the worker exited."""
        while io.notify_fd >= 0:
            data = fdutil.read_pipe(io.notify_fd, final)
            if data is None:
                return
            if not data:
                self._unwatch_fd(io.notify_fd)
                io.notify_fd = -1
                return
            for kind, payload in io.notes.feed(data):
                if kind == notify.READY:
                    self.feed(sv.WorkerReady(io.pid, time.monotonic()))
                elif kind == notify.BOOT_ERROR:
                    self.feed(sv.WorkerBootError(io.pid, payload.decode("utf-8", "replace")))
                elif kind == notify.LEAVING:
                    self.feed(sv.WorkerLeaving(io.pid, payload.decode("ascii", "replace"),
                                               time.monotonic()))
            if not final:
                return

    def _reap(self) -> None:
        for pid, status in procctl.exited_children():
            if self.validation is not None and pid == self.validation.pid:
                self.validation.status = status
                self._validation_done()
                continue
            if pid in self.cancelled_checks:
                self.cancelled_checks.discard(pid)
                continue
            if pid in self.retired_zygotes:
                self.retired_zygotes.discard(pid)
                log.debug("a former zygote (pid %d) %s", pid, describe_exit(status))
                continue
            if self.zygote is not None and pid == self.zygote.pid:
                log.warning("the app's zygote (pid %d) %s; a new one imports the app when a "
                            "worker must start", pid, describe_exit(status))
                self._zygote_gone(self.zygote, describe_exit(status), reaped=True)
                continue
            self._worker_exited(pid, status)

    def _worker_exited(self, pid: int, status: int) -> None:
        io = self.io.pop(pid, None)
        counts = [0, 0, 0, 0]
        if io is not None:
            # What the worker said before it died: its last lines, a boot error.
            self._read_output(io, final=True)
            self._read_notify(io, final=True)
            slot = self.board.read_slot(io.slot)
            counts = [slot.requests, slot.shed, slot.accept_backoffs, slot.log_lines_lost]
            self.board.clear(io.slot)
        elif self.zygote is not None and self.zygote.asked:
            # Maybe a worker the zygote has not reported yet: remember how it ended.
            self.unclaimed[pid] = status
            while len(self.unclaimed) > UNCLAIMED_MAX:
                del self.unclaimed[next(iter(self.unclaimed))]
        self.feed(sv.WorkerExited(pid, status, time.monotonic(), *counts))

    # -- the tick -------------------------------------------------------------------------

    def _slot_views(self) -> Dict[int, sv.SlotView]:
        views = {}
        for pid, io in self.io.items():
            s = self.board.read_slot(io.slot)
            what = escape(f"{s.method} {logs.shown_uri(s.uri, self.cfg.status.show_query)}")
            views[pid] = sv.SlotView(
                busy=s.state is WorkerState.BUSY, busy_since=s.busy_since,
                requests=s.requests, what=what, slow_dumped=s.slow_dumped, threads=s.threads,
                in_flight=len(s.in_flight), heartbeat=s.heartbeat)
        return views

    def _tick(self, now: float) -> None:
        queue = -1
        if self.listener is not None:
            q = sockets.listen_queue(self.listener)
            queue = q[0] if q is not None else -1
        waiting = (self.cfg.workers.mode == "ondemand" and self.listener is not None
                   and _readable(self.listener))
        self.feed(sv.Tick(now, self._slot_views(), queue, waiting))
        if now >= self.next_sample:
            self.next_sample = now + SAMPLE_EVERY
            self._sample(now)
        if self.zygote is not None and self.zygote.expired(now):
            self._zygote_gone(self.zygote, "did not answer in time (stopped or hung)")
        self._retire_channels()
        if self.control is not None:
            self.control.sweep(now)
        self._write_header()

    def _sample(self, now: float) -> None:
        """RSS and CPU of every worker into the scoreboard (the master's psutil, not the
        workers': the request path stays free of it); the supervisor checks max_memory."""
        rss: Dict[int, int] = {}
        for io in self.io.values():
            try:
                if io.proc is None:
                    io.proc = psutil.Process(io.pid)
                    io.proc.cpu_percent(None)
                with io.proc.oneshot():
                    rss[io.pid] = io.proc.memory_info().rss
                    cpu = io.proc.cpu_percent(None)
                self.board.write_sample(io.slot, rss[io.pid], cpu)
            except (psutil.Error, OSError):
                pass
        self.feed(sv.Sample(now, rss))

    def _write_header(self) -> None:
        if self.board.slots == 0:
            return
        sup = self.sup
        wait = sup.next_start_at - time.monotonic() if sup.next_start_at else 0.0
        self.board.write_header({
            "master_pid": os.getpid(), "generation": sup.generation,
            "started_at": self.started_at, "queue": sup.queue, "max_queue": sup.max_queue,
            "target": sup.target, "backoff_ms": int(max(0.0, wait) * 1000), **sup.totals,
            "master_log_lost": getattr(self.log_handler, "lost_total", 0),
            "master_log_errno": getattr(self.log_handler, "errno", 0),
        })

    # -- ondemand: the listening socket ------------------------------------------------------

    def _watch_listener(self, on: bool) -> None:
        """ondemand: wake the master when a connection waits and no worker is idle."""
        if on == self.listener_watched or self.listener is None:
            return
        if on:
            self.selector.register(self.listener, selectors.EVENT_READ, ("listener", None))
        else:
            self.selector.unregister(self.listener)
        self.listener_watched = on

    # -- reload ---------------------------------------------------------------------------

    def _start_validation(self) -> None:
        self.validation = None
        pid, fd = fork_validation(self._reload_config, self.base_modules, self._child_fds())
        self.validation = Validation(pid, fd)
        self.selector.register(fd, selectors.EVENT_READ, ("validation", None))

    def _reload_config(self) -> Config:
        from .. import config as config_mod

        if self.cfg.source:
            return config_mod.load(self.cfg.source, environ=self.settings_env)
        return self.cfg

    def _read_validation(self) -> None:
        v = self.validation
        if v is None or v.fd < 0:
            return
        data = fdutil.read_pipe(v.fd, final=False)
        if data is None:
            return
        if data:
            v.chunks.append(data)
            return
        self._unwatch_fd(v.fd)
        v.fd = -1
        self._validation_done()

    def _validation_done(self) -> None:
        """Once the check's pipe is at EOF and its process reaped: the verdict."""
        v = self.validation
        if v is None or v.fd >= 0 or v.status is None:
            return
        self.validation = None
        text = b"".join(v.chunks).decode("utf-8", "replace")
        ok = os.WIFEXITED(v.status) and os.WEXITSTATUS(v.status) == 0
        self.feed(sv.ValidationDone(ok, "" if ok else text or
                                    f"the check process {describe_exit(v.status)}",
                                    time.monotonic()))

    def _cancel_validation(self) -> None:
        v, self.validation = self.validation, None
        if v is None:
            return
        try:
            os.kill(v.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.cancelled_checks.add(v.pid)  # reaped later, without a word
        self._unwatch_fd(v.fd)

    def _reexec(self) -> Optional[sv.ReExecFailed]:
        """Replace this process's image (same pid) with a fresh one that resumes the pool;
        returns only if that fails (with the event saying so)."""
        assert self.listener is not None and self.control is not None
        assert self.sup.reload is not None and self.board.fd is not None
        workers = [ResumedWorker(w.slot, w.pid, w.generation, w.started, self.io[pid].out_fd,
                                 self.io[pid].notify_fd, w.stop_reason, w.kill_at, w.ready)
                   for pid, w in self.sup.workers.items() if pid in self.io]
        state = ResumeState(
            listener_fd=self.listener.fileno(), sock_inode=self.sock_inode,
            control_fd=self.control.sock.fileno(), board_fd=self.board.fd,
            death_r=self.death_r, death_w=self.death_w, started_at=self.started_at,
            generation=self.sup.generation, totals=dict(self.sup.totals),
            max_queue=self.sup.max_queue, workers=workers,
            zygote_pid=self.zygote.pid if self.zygote is not None else 0,
            handoff_fds=self.channels[self.sup.generation].fds()
            if self.sup.generation in self.channels else None,
            handoff_uid=self.channels[self.sup.generation].uid
            if self.sup.generation in self.channels else -1,
            waiter_fds=[c.sock.fileno() for c in self.sup.reload.waiters
                        if c.state == "waiting"], scale=self.sup.scale_state())
        self._write_header()
        # The environment the master was started with, not the app's (app.clear_env
        # would drop PYTHONPATH or FCGI_WEB_SERVER_ADDRS): the new image applies app.env
        # and clear_env of the new config itself.
        env = dict(self.exec_env)
        daemon.carry_pidfile_fd(self.pidfile_fd, env)
        # The command line may name the config relative to a directory we left.
        state_fd = state.to_environment(env, self.cfg.source)
        for fd in state.descriptors() + [state_fd]:
            os.set_inheritable(fd, True)
        argv = list(getattr(sys, "orig_argv", []) or []) or \
            [sys.executable, "-m", "fcgi_manager", *sys.argv[1:]]
        log.info("reload: re-executing the master with fresh code (pid %d stays)", os.getpid())
        self.log_handler.flush()
        signal.set_wakeup_fd(-1)
        execsig.hold(HANDLED_SIGNALS, self.signals)
        try:
            os.execve(sys.executable, [sys.executable, *argv[1:]], env)
        except OSError as exc:
            execsig.release(HANDLED_SIGNALS)
            signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
            close_quietly(state_fd)
            return sv.ReExecFailed(f"{sys.executable}: {exc}", time.monotonic())
        return None  # pragma: no cover - execve does not return

    # -- the end --------------------------------------------------------------------------

    def abandon(self) -> None:
        """Undo a failed :meth:`prepare`: nothing may be left behind (socket files)."""
        self._cleanup()
        self.board.close()

    def _close_listener(self) -> None:
        if self.listener is None:
            return
        self._watch_listener(False)
        sockets.remove_unix_socket(self.address, self.sock_inode)
        self.sock_inode = 0
        try:
            self.listener.close()
        except OSError:
            pass
        self.listener = None

    def _cleanup(self) -> None:
        if self.zygote is not None:
            self.zygote.stop()
            self.zygote = None
        self._close_listener()
        if self.status_listener is not None:
            self.status_listener.close_all()
            self.status_listener = None
        if self.control is not None:
            reload = self.sup.reload
            for conn in reload.waiters if reload is not None else []:
                self.control.reply(conn, ok=False, error="the master stopped")
            self.control.close_all()
            try:
                os.unlink(self.cfg.manager.control)
            except OSError:
                pass
            self.control.sock.close()
            self.control = None


def _stop_signals_end_the_start() -> None:
    """As PID 1 (a container without an init) the kernel drops every signal whose
    handler is the default: a TERM sent while the app is being imported would be lost,
    and the container runtime would wait its whole grace period before SIGKILL. Until
    :meth:`Master.run` installs the loop's handlers, TERM and QUIT end the start, at
    once (an exception could be taken for the app's own import error, or caught by it)."""
    if os.getpid() != 1:
        return

    def stop(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        os.write(2, f"fcgi-manager: got {name} while starting, as PID 1: exiting\n".encode())
        os._exit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, stop)


def _readable(sock: socket.socket) -> bool:
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return False


__all__ = ["Master"]
