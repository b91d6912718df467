"""The master's shell: one selector, the processes, the pipes and sockets.

Every decision is the supervisor's (``rules/supervisor.py``: events in, actions out); this
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

:class:`Master` owns the loop, the sockets and what every child must close; its parts
share a :class:`~fcgi_manager.master.context.MasterContext`: ``actions`` carries
out the supervisor's actions, ``pipes`` reads the workers' pipes and samples them,
``channels`` keeps the hand-off channels, ``zygote_keeper`` the zygote,
``reload`` the reload's check and re-exec, ``commands`` the commands and the
scoreboard's header, ``signals`` the queued signals.
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
from typing import Any, Callable, Dict, List, Optional

from .. import fdutil, logs, sockets
from ..config import Config, settings_environment
from ..errors import FcgiManagerError
from ..privileges import apply_environment, resolve_user
from ..rules import supervisor as sv
from ..scoreboard import MAX_SLOTS, Scoreboard
from ..version import __version__
from ..wire import control
from ..worker.appload import load_app, prepare_import
from . import execsig, procctl, proctitle
from .actions import ActionExecutor
from .channels import HandoffChannels
from .children import HANDLED_SIGNALS, MasterFds, WorkerSetup
from .commands import Commands, open_access_log
from .context import MasterContext
from .control_server import ControlConnection, ControlServer
from .pipes import WorkerIO, WorkerPipes
from .reload import ReloadCheck, reexec
from .resume import ResumeState, take_state
from .signals import SignalQueue
from .zygote_keeper import ZygoteKeeper

log = logging.getLogger("fcgi_manager.master")

TICK = 0.25
SAMPLE_EVERY = 2.0  # memory and CPU of every worker (and at each status request)


class Master:
    """The shell. Build it, call :meth:`prepare`, then :meth:`run`.

    It owns the loop, the sockets and the descriptors every child must close; its parts
    (the modules beside this one) read the workers' pipes, keep the hand-off channels and
    the zygote, run the reload's check and the commands, and carry out the supervisor's actions.
    """

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
        self.sup = sv.Supervisor(cfg.workers, master_pid=os.getpid(), max_slots=MAX_SLOTS,
                                 log_path=cfg.manager.log, in_place_reload=self.app_given,
                                 shutdown_delay=cfg.manager.shutdown_delay,
                                 strict=os.environ.get("FCGI_MANAGER_STRICT") == "1")
        self.ctx = MasterContext(cfg, self.log_handler, self.user, self.sup, self.feed)
        self.selector = self.ctx.selector
        self.listener_watched = False
        self.sock_inode = 0
        self.status_listener: Any = None  # status_listen.StatusListener, for status.listen
        self.death_r = self.death_w = -1
        self.resumed: Optional[ResumeState] = None
        self.child_close_fds: List[int] = []  # e.g. the start handshake pipe
        self.pidfile_fd = -1  # locked by this process while it runs (see daemon.py)
        self.client_filter: Optional[sockets.ClientFilter] = None
        self.exec_env: Dict[str, str] = dict(os.environ)
        self.running = False
        self.next_tick = self.next_sample = 0.0
        # The parts, each with what it needs.
        self.signals = SignalQueue()
        self.pipes = WorkerPipes(self.ctx)
        self.channels = HandoffChannels(self.sup, self.user)
        # The settings' variables as the master found them (see ReloadCheck).
        self.check = ReloadCheck(self.ctx, self.child_fds, settings_environment())
        self.zygotes = ZygoteKeeper(self.ctx, self.pipes, self.check, self.app_given,
                                    self.setup, self.child_fds, self.worker_exited)
        self.commands = Commands(self.ctx, self.pipes)
        self.actions = ActionExecutor(self.ctx, self, self.pipes, self.channels,
                                      self.zygotes, self.check)

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
        cfg, ctx = self.cfg, self.ctx
        _stop_signals_end_the_start()
        self.resumed = take_state()
        self.zygotes.resumed = self.resumed is not None
        if self.resumed is not None:  # signals held across the exec: queue them for the loop
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, self.signals.queue)
            execsig.release(HANDLED_SIGNALS)
        if self.resumed is None:
            ctx.listener = sockets.create_listener(self.address, cfg.listen.backlog,
                                                   cfg.listen.mode, cfg.listen.owner,
                                                   cfg.listen.group)
            self.sock_inode = sockets.socket_file_inode(self.address)
            from .. import acl

            acl.grant(self.address.path if self.address.kind == "unix" else "",
                      cfg.listen.acl_users, cfg.listen.acl_groups)
        from .. import limits
        from . import status_listen

        limits.check(cfg.manager)
        self.status_listener = status_listen.open_for(cfg, self.selector, lambda: ctx.board,
                                                      time.monotonic)
        os.umask(cfg.manager.umask)
        # Before app.clear_env empties the environment: the filter never depends on it.
        self.client_filter = sockets.ClientFilter.from_config(cfg.listen.allowed_clients)
        self.exec_env = dict(os.environ)  # the master's own, for the reload's exec
        apply_environment(cfg.app)
        if not self.app_given:
            prepare_import(cfg.app.path, cfg.app.chdir)
        self.check.base_modules = frozenset(sys.modules)
        if cfg.app.preload and not self.app_given and not self.zygotes.wanted():
            # Not root, or no manager.user, and not re-executed by a reload: this is
            # `start`, which waits for the import anyway; no loop runs yet.
            self.app = load_app(cfg.app.module)
            gc.collect()
            if hasattr(gc, "freeze"):
                gc.freeze()  # keep the imported app's pages shared with the workers
        ctx.board.close()  # the empty stand-in from MasterContext
        if self.resumed is None:
            ctx.board = Scoreboard(MAX_SLOTS)
            self.death_r, self.death_w = os.pipe()
            control_sock = control.bind_control(cfg.manager.control)
        else:
            control_sock = self._adopt(self.resumed)
        ctx.control = ControlServer(control_sock, self.selector, self._on_control_request,
                                    time.monotonic)
        if self.resumed is not None:
            self._adopt_workers(self.resumed)
        self._close_on_exec()
        open_access_log(cfg, self.user)
        if self.zygotes.wanted() and self.resumed is None:
            self.zygotes.start(self.sup.generation).wait_ready()  # `start` waits for it
        _warn_web_user(cfg, self.address)
        _warn_keepalive(cfg)

    def _close_on_exec(self) -> None:
        """Nothing the master owns reaches a program the app starts. Descriptors carried
        across the reload's exec arrive inheritable: make them close-on-exec again."""
        fds = [self.death_r, self.death_w, self.pidfile_fd]
        if self.ctx.listener is not None:
            fds.append(self.ctx.listener.fileno())
        if self.ctx.board.fd is not None:
            fds.append(self.ctx.board.fd)
        fds += self.channels.fds()
        fds += self.child_fds().fds
        fdutil.set_cloexec(fds)

    def _adopt(self, state: ResumeState) -> socket.socket:
        self.ctx.listener = socket.socket(fileno=state.listener_fd)
        self.sock_inode = state.sock_inode
        if state.handoff_fds:  # the old generation's: it is shut and closed when it ends
            self.channels.adopt(state.generation, state.handoff_fds, state.handoff_uid)
        self.ctx.board = Scoreboard(MAX_SLOTS, fd=state.board_fd)
        self.death_r, self.death_w = state.death_r, state.death_w
        if state.zygote_pid:
            self.zygotes.retired.add(state.zygote_pid)  # it exits now that we exec'd
        self.ctx.started_at = state.started_at
        return socket.socket(fileno=state.control_fd)

    def _adopt_workers(self, state: ResumeState) -> None:
        control_server, board = self.ctx.control, self.ctx.board
        assert control_server is not None
        adopted = []
        for r in state.workers:
            adopted.append(sv.AdoptedWorker(r.slot, r.pid, r.generation, r.started, r.ready,
                                            board.worker_id(r.slot), r.stop_reason,
                                            r.kill_at))
            self.pipes.watch(WorkerIO(r.pid, r.slot, r.out_fd, r.notify_fd))
        waiters = tuple(control_server.adopt(fd) for fd in state.waiter_fds)
        self.feed(sv.Resumed(tuple(adopted), state.generation, waiters, time.monotonic(),
                             totals=state.totals, max_queue=state.max_queue,
                             scale=state.scale))

    # -- the loop -------------------------------------------------------------------------

    def run(self, ready_callback: Optional[Callable[[bool, str], None]] = None) -> int:
        """The loop; returns the exit status once every worker is gone."""
        # A re-executed master is already "started": its readiness is the reload's.
        self.actions.ready_callback = None if self.resumed else ready_callback
        proctitle.set_master(proctitle.title_name(self.cfg), proctitle.title_config(self.cfg))
        self.signals.install()
        self.selector.register(self.signals.wakeup_r, selectors.EVENT_READ, ("wakeup", None))
        self.commands.write_header()
        if self.resumed:
            log.info("reloaded (generation %d): starting new workers, the %d old ones keep "
                     "serving until they are ready", self.sup.generation, len(self.pipes.io))
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
                self.signals.drain_wakeup()
            elif kind == "control" and self.ctx.control is not None:
                self.ctx.control.on_event(obj, mask)
            elif kind == "status_listen" and self.status_listener is not None:
                self.status_listener.on_event(obj, mask)
            elif kind == "listener":
                self.feed(sv.ListenerReadable(time.monotonic(), self.pipes.slot_views()))
            elif kind == "out":
                self.pipes.read_output(obj)
            elif kind == "notify":
                self.pipes.read_notify(obj)
            elif kind == "validation":
                self.check.read()
            elif kind == "zygote":
                self.zygotes.on_readable(obj)
        self.signals.handle(self.command)
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
                follow_up = self.actions.perform(action)
                if follow_up is not None:
                    queue.append(follow_up)

    def end_loop(self) -> None:
        self.running = False

    # -- commands (signals and control socket) ----------------------------------------------

    def command(self, name: str, args: Dict[str, Any],
                client: Optional[ControlConnection]) -> Optional[Dict[str, Any]]:
        """Run one command; returns the reply, or None when the supervisor replies."""
        return self.commands.run(name, args, client)

    def _on_control_request(self, conn: ControlConnection, req_id: Any, name: str,
                            args: Dict[str, Any]) -> None:
        assert self.ctx.control is not None
        try:
            result = self.command(name, args, conn)
        except FcgiManagerError as exc:
            self.ctx.control.reply(conn, ok=False, error=exc.message)
            return
        if result is not None:
            self.ctx.control.reply(conn, ok=True, result=result)

    # -- workers --------------------------------------------------------------------------

    def child_fds(self) -> MasterFds:
        """What a child must close: what only the master may hold (the death pipe's write
        end, the control socket, the other workers' pipes, the pidfile, the log)."""
        fds = [self.signals.wakeup_r, self.signals.wakeup_w, self.death_w, self.pidfile_fd,
               *self.child_close_fds]
        if self.ctx.control is not None:
            fds += self.ctx.control.child_fds()
        if self.status_listener is not None:
            fds += self.status_listener.child_fds()
        fds += self.pipes.fds()
        fds += self.check.fds()
        fds += self.zygotes.fds()
        return MasterFds(self.selector, fds, self.log_handler)

    def setup(self, generation: int) -> WorkerSetup:
        """What a worker of ``generation`` (or its zygote) gets from the master."""
        previous = self.channels.take_previous(generation)
        return WorkerSetup(cfg=self.cfg, app=self.app, listener=self.ctx.listener,
                           board=self.ctx.board, death_r=self.death_r, user=self.user,
                           master_pid=os.getpid(), client_filter=self.client_filter,
                           handoff=self.channels.channel(generation), generation=generation,
                           previous=previous[1] if previous else None,
                           previous_generation=previous[0] if previous else 0)

    def _reap(self) -> None:
        for pid, status in procctl.exited_children():
            if self.check.reaped(pid, status) or self.zygotes.reaped(pid, status):
                continue
            self.worker_exited(pid, status)

    def worker_exited(self, pid: int, status: int) -> None:
        counts = self.pipes.finish(pid)
        if counts is None:
            self.zygotes.unknown_exit(pid, status)
            counts = [0, 0, 0, 0]
        self.feed(sv.WorkerExited(pid, status, time.monotonic(), *counts))

    # -- the tick -------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        queue = -1
        listener = self.ctx.listener
        if listener is not None:
            q = sockets.listen_queue(listener)
            queue = q[0] if q is not None else -1
        waiting = (self.cfg.workers.mode == "ondemand" and listener is not None
                   and _readable(listener))
        self.feed(sv.Tick(now, self.pipes.slot_views(), queue, waiting))
        if now >= self.next_sample:
            self.next_sample = now + SAMPLE_EVERY
            self.pipes.sample(now)
        self.zygotes.check_expiry(now)
        self.channels.retire()
        if self.ctx.control is not None:
            self.ctx.control.sweep(now)
        self.commands.write_header()

    # -- ondemand: the listening socket ------------------------------------------------------

    def watch_listener(self, on: bool) -> None:
        """ondemand: wake the master when a connection waits and no worker is idle."""
        listener = self.ctx.listener
        if on == self.listener_watched or listener is None:
            return
        if on:
            self.selector.register(listener, selectors.EVENT_READ, ("listener", None))
        else:
            self.selector.unregister(listener)
        self.listener_watched = on

    # -- reload ---------------------------------------------------------------------------

    def reexec(self) -> Optional[sv.ReExecFailed]:
        """Replace this process's image (same pid) with a fresh one that resumes the pool;
        returns only if that fails (with the event saying so)."""
        ctx, sup = self.ctx, self.sup
        assert ctx.listener is not None and ctx.control is not None
        assert sup.reload is not None and ctx.board.fd is not None
        channel = self.channels.current()
        state = ResumeState(
            listener_fd=ctx.listener.fileno(), sock_inode=self.sock_inode,
            control_fd=ctx.control.sock.fileno(), board_fd=ctx.board.fd,
            death_r=self.death_r, death_w=self.death_w, started_at=ctx.started_at,
            generation=sup.generation, totals=dict(sup.totals),
            max_queue=sup.max_queue, workers=self.pipes.resumed(sup.workers),
            zygote_pid=self.zygotes.pid,
            handoff_fds=channel.fds() if channel is not None else None,
            handoff_uid=channel.uid if channel is not None else -1,
            waiter_fds=[c.sock.fileno() for c in sup.reload.waiters
                        if c.state == "waiting"], scale=sup.scale_state())
        self.commands.write_header()
        return reexec(state, self.exec_env, self.cfg.source, self.pidfile_fd, self.signals,
                      self.log_handler)

    # -- the end --------------------------------------------------------------------------

    def abandon(self) -> None:
        """Undo a failed :meth:`prepare`: nothing may be left behind (socket files)."""
        self._cleanup()
        self.ctx.board.close()

    def close_listener(self) -> None:
        listener = self.ctx.listener
        if listener is None:
            return
        self.watch_listener(False)
        sockets.remove_unix_socket(self.address, self.sock_inode)
        self.sock_inode = 0
        try:
            listener.close()
        except OSError:
            pass
        self.ctx.listener = None

    def _cleanup(self) -> None:
        self.zygotes.stop()
        self.close_listener()
        if self.status_listener is not None:
            self.status_listener.close_all()
            self.status_listener = None
        control_server = self.ctx.control
        if control_server is not None:
            reload = self.sup.reload
            for conn in reload.waiters if reload is not None else []:
                control_server.reply(conn, ok=False, error="the master stopped")
            control_server.close_all()
            try:
                os.unlink(self.cfg.manager.control)
            except OSError:
                pass
            control_server.sock.close()
            self.ctx.control = None


def _warn_web_user(cfg: Config, address: sockets.Address) -> None:
    li = cfg.listen
    if address.kind == "unix" and li.owner and not (int(li.mode, 8) & 0o006):
        try:
            import pwd
            pw = pwd.getpwnam(li.owner)
            st = os.stat(address.path)
            if st.st_uid != pw.pw_uid and (st.st_gid not in os.getgrouplist(
                    li.owner, pw.pw_gid) or not int(li.mode, 8) & 0o060):
                log.warning("the web server user %s cannot connect to %s (mode %s): fix "
                            "listen.owner/group/mode", li.owner, address.path, li.mode)
        except (KeyError, OSError):
            pass


def _warn_keepalive(cfg: Config) -> None:
    w = cfg.workers
    if w.max_idle_connections and w.effective_count * w.max_idle_connections < 16:
        log.warning("workers hold at most %d idle kept connections in all; an nginx "
                    "upstream keepalive above that makes nginx reconnect often: raise "
                    "workers.max_idle_connections", w.effective_count * w.max_idle_connections)


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
