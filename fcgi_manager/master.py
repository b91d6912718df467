"""The master (arbiter): owns the sockets and the worker table, runs one loop.

One thread and one selector watch: the signal wakeup pipe, the control socket, and two
pipes per worker (its stdout/stderr, captured into the log line by line, and a notify
pipe on which it says "ready" or sends its boot traceback). Signal handlers only queue
the signal; signals and control commands meet in :meth:`Master.command`. Every
``TICK`` the master reaps (``waitpid(-1, WNOHANG)``), times busy workers against
``timeout``/``slow_request``, escalates stops (TERM, then KILL after ``graceful_timeout``),
samples memory/CPU and the listen queue, and brings the pool to its target size.

Workers never outlive the master: each holds the read end of a pipe whose write end only
the master has; its EOF (the master died, even by SIGKILL) makes them finish and exit.

Reload re-executes the master in place (same pid, so pidfiles and supervisors stay valid):
the new config and app are first validated in a throwaway child; then the master passes
its listening socket, control socket, scoreboard (a memfd) and the old workers' pipes to
the new image through ``FCGI_MANAGER_RESUME``. The new image imports fresh code (in itself
with ``preload``, in each worker without), starts the new generation, and only when all of
it is ready asks the old one to finish its requests and exit. Any failure leaves the old
workers serving and is reported to whoever asked for the reload.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import psutil

from . import control, daemon, fdutil, logs, procctl, sockets
from . import status as status_mod
from .appload import load_app, prepare_import
from .config import Config
from .errors import AppImportError, FcgiManagerError, ProtocolError
from .handoff import HandoffChannel, channel_for
from .pool import PoolSizer, PoolView, threaded_view
from .privileges import apply_environment, resolve_user
from .scoreboard import MAX_SLOTS, Scoreboard, SlotWriter
from .states import WorkerState, can_change
from .threaded import build_worker
from .worker import (
    EXIT_BOOT_ERROR,
    EXIT_RECYCLE_MEMORY,
    EXIT_RECYCLE_REQUESTS,
    STACK_SIGNAL,
)
from .zygote import Zygote, new_zygote_wanted

log = logging.getLogger("fcgi_manager.master")

TICK = 0.25
SAMPLE_EVERY = 2.0
STACK_GRACE = 1.0  # seconds between the stack-dump signal and SIGKILL for a hung request
READY_TIMEOUT = 120.0
RESUME_ENV = "FCGI_MANAGER_RESUME"
RESUME_CONFIG_ENV = "FCGI_MANAGER_RESUME_CONFIG"
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGHUP,
                   signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)


def describe_exit(status: int) -> str:
    """How a child ended, the way an operator wants to read it."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        core = " (core dumped)" if os.WCOREDUMP(status) else ""
        return f"was killed by signal {sig} ({name}){core}"
    code = os.WEXITSTATUS(status)
    return f"exited with code {code}"


class WorkerRecord:
    """The master's view of one worker process."""

    __slots__ = ("slot", "pid", "generation", "started", "out_fd", "notify_fd", "out_buf",
                 "notify_buf", "state", "stop_reason", "kill_at", "ready", "boot_error",
                 "proc", "last_requests", "idle_since")

    def __init__(self, slot: int, pid: int, generation: int, out_fd: int, notify_fd: int):
        self.slot = slot
        self.pid = pid
        self.generation = generation
        self.started = time.monotonic()
        self.out_fd = out_fd
        self.notify_fd = notify_fd
        self.out_buf = b""
        self.notify_buf = b""
        self.state = WorkerState.STARTING
        self.stop_reason: Optional[str] = None
        self.kill_at = 0.0
        self.ready = False
        self.boot_error = ""
        self.proc: Optional[psutil.Process] = None
        self.last_requests = 0
        self.idle_since = self.started

    @property
    def id(self) -> int:
        return self.slot + 1

    def name(self) -> str:
        return f"worker {self.id} (pid {self.pid})"


class Master:
    """The arbiter. Build it, call :meth:`prepare`, then :meth:`run`."""

    def __init__(self, cfg: Config, app: Optional[Callable] = None,
                 log_handler: Optional[logs.ReopenableHandler] = None) -> None:
        self.cfg = cfg
        self.app = app  # given directly by the Python API; else imported from app.module
        self.app_given = app is not None
        self.log_handler = log_handler or logs.setup_master(cfg.manager.log,
                                                            cfg.manager.log_level)
        self.address = sockets.parse_address(cfg.listen.bind)
        self.listener: Optional[socket.socket] = None
        self.handoff: Optional[HandoffChannel] = None  # idle kept connections, worker to worker
        self.sock_inode = 0
        self.control_sock: Optional[socket.socket] = None
        self.board: Optional[Scoreboard] = None
        self.selector = selectors.DefaultSelector()
        self.death_r = self.death_w = -1
        self.workers: Dict[int, WorkerRecord] = {}
        self.signals: List[int] = []
        self.generation = 1
        self.started_at = time.time()
        self.totals = {k: 0 for k in ("accepted_dead", "respawns", "crashes", "timeouts",
                                      "slow", "recycled", "shed_dead", "max_children_reached",
                                      "max_active", "spawn_failures")}
        self.max_queue = -1
        self.queue = -1
        self.target = cfg.workers.effective_count if cfg.workers.mode != "ondemand" else 0
        self.stopping: Optional[str] = None  # None, "graceful", "now"
        self.draining_until = 0.0  # monotonic end of manager.shutdown_delay, once asked to stop
        self.stop_deadline = 0.0
        self.failures = 0
        self.last_failure_at = 0.0  # monotonic time of the last quick failure
        self.next_spawn_at = 0.0
        self.pending_respawns = 0
        self.ready_callback: Optional[Callable[[bool, str], None]] = None
        self.reload_waiters: List[socket.socket] = []
        self.reloading_from: Optional[int] = None  # old generation while a reload is pending
        self.reload_deadline = 0.0
        self.next_tick = 0.0
        self.next_sample = 0.0
        self.exit_code = 0
        self.user = resolve_user(cfg.manager.user, cfg.manager.group)
        self.resumed = False
        self.wakeup_r = self.wakeup_w = -1
        self.base_modules: frozenset = frozenset(sys.modules)
        self.child_close_fds: List[int] = []  # e.g. the start handshake pipe
        self.sizer = PoolSizer(cfg.workers)
        self.listener_watched = False
        self.pidfile_fd = -1  # locked by this process while it runs (see daemon.py)
        self.client_filter: Optional[sockets.ClientFilter] = None
        self.zygote: Optional[Zygote] = None
        self.old_zygote = 0
        self.exec_env: Dict[str, str] = dict(os.environ)

    # -- preparing ----------------------------------------------------------------------

    def prepare(self) -> None:
        """Bind, import (with preload), create the scoreboard and control socket.

        Every failure raises a FcgiManagerError whose message ``start`` prints.
        """
        cfg = self.cfg
        _stop_signals_end_the_start()
        resume = self._take_resume_state()
        if resume is None:
            self.listener = sockets.create_listener(self.address, cfg.listen.backlog,
                                                    cfg.listen.mode, cfg.listen.owner,
                                                    cfg.listen.group)
            self.sock_inode = sockets.socket_file_inode(self.address)
            self.handoff = channel_for(cfg.workers.threads, None)
        os.umask(cfg.manager.umask)
        # Before app.clear_env empties the environment: the filter never depends on it.
        self.client_filter = sockets.ClientFilter.from_config(cfg.listen.allowed_clients)
        self.exec_env = dict(os.environ)  # the master's own, for the reload's exec
        apply_environment(cfg.app)
        if not self.app_given:
            prepare_import(cfg.app.path, cfg.app.chdir)
        self.base_modules = frozenset(sys.modules)
        if cfg.app.preload and not self.app_given and not zygote_wanted(self):
            self.app = load_app(cfg.app.module)  # not root, or no manager.user
            gc.collect()
            if hasattr(gc, "freeze"):
                gc.freeze()  # keep the imported app's pages shared with the workers
        if resume is None:
            self.board = Scoreboard(MAX_SLOTS)
            r, w = os.pipe()
            self.death_r, self.death_w = r, w
            self.control_sock = control.bind_control(cfg.manager.control)
        else:
            self._adopt(resume)
        self._close_on_exec()
        if zygote_wanted(self):
            self._start_zygote()
        self._warn_web_user()
        self._warn_keepalive()

    def _close_on_exec(self) -> None:
        """Nothing the master owns reaches a program the app starts. Descriptors carried
        across the reload's exec arrive inheritable: make them close-on-exec again."""
        fds = [self.death_r, self.death_w, self.pidfile_fd]
        if self.listener is not None:
            fds.append(self.listener.fileno())
        if self.control_sock is not None:
            fds.append(self.control_sock.fileno())
        if self.board is not None and self.board.fd is not None:
            fds.append(self.board.fd)
        for rec in self.workers.values():
            fds += [rec.out_fd, rec.notify_fd]
        fds += [c.fileno() for c in self.reload_waiters]
        fdutil.set_cloexec(fds)

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

    # -- resume after re-exec ------------------------------------------------------------

    def _take_resume_state(self) -> Optional[Dict[str, Any]]:
        fd_text = os.environ.pop(RESUME_ENV, "")
        if not fd_text:
            return None
        fd = int(fd_text)
        try:
            with os.fdopen(fd, "rb") as f:
                return json.loads(f.read().decode())
        except (OSError, ValueError) as exc:
            raise FcgiManagerError(f"cannot read the state passed across reload: {exc}"
                                   ) from None

    def _adopt(self, state: Dict[str, Any]) -> None:
        self.resumed = True
        self.listener = socket.socket(fileno=state["listener"])
        self.sock_inode = state["sock_inode"]
        self.handoff = channel_for(self.cfg.workers.threads, state.get("handoff"))
        self.control_sock = socket.socket(fileno=state["control"])
        self.board = Scoreboard(MAX_SLOTS, fd=state["board"])
        self.death_r, self.death_w = state["death"]
        self.old_zygote = int(state.get("zygote") or 0)  # exits when we exec'd: reaped
        self.started_at = state["started_at"]
        self.totals.update(state["totals"])
        self.max_queue = state["max_queue"]
        old_generation = state["generation"]
        self.generation = old_generation + 1
        self.reloading_from = old_generation
        self.reload_deadline = time.monotonic() + READY_TIMEOUT
        for w in state["workers"]:
            rec = WorkerRecord(w["slot"], w["pid"], w["generation"], w["out"], w["notify"])
            rec.ready = True
            rec.state = WorkerState.IDLE
            rec.stop_reason = w["stop_reason"]
            self.workers[rec.pid] = rec
        for fd in state["waiters"]:
            self.reload_waiters.append(socket.socket(fileno=fd))
        self._carry_scale(state.get("scale") or {})

    def _carry_scale(self, before: Dict[str, Any]) -> None:
        """A static pool's ``scale`` survives a reload (a deploy in the middle of a traffic
        peak keeps its extra workers), unless ``workers.count`` changed in the file: the
        edited file then wins. Either way the log says which."""
        w = self.cfg.workers
        if w.mode != "static" or before.get("mode") != "static":
            return
        scaled, configured = int(before.get("target", 0)), int(before.get("configured", 0))
        if scaled == configured or not scaled:
            return
        if w.effective_count != configured:
            log.info("reload: workers.count is now %d in the config: it replaces the earlier "
                     "scale to %d workers", w.effective_count, scaled)
            return
        self.target = scaled
        log.info("reload: keeping the scale to %d workers (workers.count is %d; change it "
                 "in the config, or scale again, to change the count)", scaled, configured)

    # -- running ------------------------------------------------------------------------

    def run(self, ready_callback: Optional[Callable[[bool, str], None]] = None) -> int:
        """The loop; returns the exit status once every worker is gone."""
        # A re-executed master is already "started": its readiness is the reload's.
        self.ready_callback = None if self.resumed else ready_callback
        self._install_signals()
        sel = self.selector
        sel.register(self.wakeup_r, selectors.EVENT_READ, "wakeup")
        sel.register(self.control_sock, selectors.EVENT_READ, "control")  # type: ignore
        for rec in self.workers.values():
            self._watch(rec)
        self._write_header()
        if self.resumed:
            log.info("reloaded (generation %d): starting new workers, the %d old ones keep "
                     "serving until they are ready", self.generation, len(self.workers))
        else:
            log.info("fcgi-manager %s master started on %s: %d worker(s), app %s",
                     _version(), self.address, self.target, self.cfg.app.module)
        self._spawn_missing()
        self._check_ready()
        while True:
            now = time.monotonic()
            timeout = max(0.0, min(self.next_tick, self.next_spawn_at or self.next_tick) - now)
            try:
                events = sel.select(timeout)
            except InterruptedError:
                events = []
            for key, _ in events:
                kind = key.data
                if kind == "wakeup":
                    self._drain_wakeup()
                elif kind == "control":
                    self._accept_control()
                elif kind == "listener":
                    self._watch_listener(False)
                    self._manage_workers()
                elif kind[0] == "out":
                    self._read_output(kind[1])
                elif kind[0] == "notify":
                    self._read_notify(kind[1])
            self._handle_signals()
            self._reap()
            now = time.monotonic()
            if now >= self.next_tick:
                self.next_tick = now + TICK
                self._tick(now)
            elif self.next_spawn_at and now >= self.next_spawn_at:
                self._spawn_missing()
            if self.stopping and not self.workers:
                break
        self._cleanup()
        log.info("master stopped")
        return self.exit_code

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
            if sig == signal.SIGCHLD:
                continue
            name = signal.Signals(sig).name
            action = {
                signal.SIGTERM: ("stop", {}), signal.SIGQUIT: ("stop", {}),
                signal.SIGINT: ("stop", {"now": True}), signal.SIGHUP: ("reload", {}),
                signal.SIGUSR1: ("reopen-logs", {}), signal.SIGTTIN: ("scale", {"value": "+1"}),
                signal.SIGTTOU: ("scale", {"value": "-1"}),
            }.get(sig)
            if action:
                log.info("got %s: %s", name, action[0])
                try:
                    self.command(action[0], action[1], None)
                except FcgiManagerError as exc:
                    log.error("%s failed: %s", action[0], exc.message)

    # -- commands (signals and control socket) ------------------------------------------

    def command(self, name: str, args: Dict[str, Any],
                client: Optional[socket.socket]) -> Optional[Dict[str, Any]]:
        """Run one command; returns the reply, or None when the reply comes later."""
        if name == "status" or name == "ping":
            self._sample(time.monotonic())
            self._write_header()
            return status_mod.snapshot(self.cfg, self.board)  # type: ignore[arg-type]
        if name == "stop":
            self.stop(bool(args.get("now")))
            return {"stopping": True, "pid": os.getpid(),
                    "drain_s": max(0.0, self.draining_until - time.monotonic())
                    if self.draining_until else 0.0}
        if name == "reopen-logs":
            error = self.log_handler.reopen()
            if error:
                raise FcgiManagerError(f"{error} (logging goes on to the old file, if any)")
            log.info("reopened the log file %s", self.cfg.manager.log)
            return {"reopened": self.cfg.manager.log}
        if name == "scale":
            return self.scale(str(args.get("value", "")))
        if name == "reload":
            self.reload(client)
            return None
        raise FcgiManagerError(f"unknown command {name!r}")

    def stop(self, now: bool) -> None:
        if self.stopping == "now" or (self.stopping and not now):
            return
        if not now and self.cfg.manager.shutdown_delay > 0:
            self._drain()
            return
        self._begin_stop(now)

    def _drain(self) -> None:
        """The first phase of a graceful stop with ``manager.shutdown_delay``: the ping
        path answers 503 "draining" while every other request is served as before, so
        that load balancers (a Kubernetes readiness probe, an nginx health check) take
        this instance out before it stops accepting. The tick begins the stop itself
        when the delay is over; ``stop --now`` or INT cuts it short."""
        if self.draining_until:
            log.info("already draining: the graceful stop begins in %.1f s",
                     max(0.0, self.draining_until - time.monotonic()))
            return
        delay = self.cfg.manager.shutdown_delay
        self.draining_until = time.monotonic() + delay
        self.board.set_draining(True)  # type: ignore[union-attr]
        self._notify_systemd("STOPPING=1")
        log.info("draining: the ping path answers 503 for %.1f s (manager.shutdown_delay) "
                 "while requests are still served; then the graceful stop", delay)

    def _end_drain(self, now: float) -> None:
        if self.draining_until and now >= self.draining_until and not self.stopping:
            log.info("shutdown_delay is over: stopping gracefully")
            self._begin_stop(False)

    def _begin_stop(self, now: bool) -> None:
        self.draining_until = 0.0
        if self.board is not None:
            self.board.set_draining(True)  # pings on kept connections say so too
        self.stopping = "now" if now else "graceful"
        grace = 0.0 if now else self.cfg.workers.graceful_timeout
        self.stop_deadline = time.monotonic() + grace
        self._notify_systemd("STOPPING=1")
        # Our copy of the listening socket goes first, so that it closes for good as
        # soon as the workers have taken what is queued and closed theirs.
        self._close_listener()
        if self.handoff is not None:
            self.handoff.shut()  # nobody is left to take a kept connection
        for rec in self.workers.values():
            self._stop_worker(rec, "stop", signal.SIGINT if now else signal.SIGTERM, grace)
        for client in self.reload_waiters:
            self._reply(client, ok=False, error="the master is stopping")
        self.reload_waiters = []

    def scale(self, value: str) -> Dict[str, Any]:
        value = value.strip()
        try:
            if value.startswith(("+", "-")):
                new = self.target + int(value)
            else:
                new = int(value)
        except ValueError:
            raise FcgiManagerError(f"scale: {value!r} is not N, +N or -N") from None
        limit = self.cfg.workers.max_workers if self.cfg.workers.mode != "static" else MAX_SLOTS
        if new < 0 or new > limit:
            raise FcgiManagerError(f"scale: {new} workers is outside 0..{limit}")
        if new == 0 and self.cfg.workers.mode == "static":
            raise FcgiManagerError("scale: a static pool needs at least 1 worker")
        old, self.target = self.target, new
        log.info("scaling from %d to %d workers", old, new)
        self._manage_workers()
        return {"workers": new, "was": old}

    def reload(self, client: Optional[socket.socket]) -> None:
        if self.stopping or self.draining_until:
            raise FcgiManagerError("cannot reload: the master is stopping")
        if self.reloading_from is not None:
            if client is not None:
                self.reload_waiters.append(client)
            return
        log.info("reload: checking the new configuration and code")
        self._notify_systemd("RELOADING=1")
        error = self._validate_new_code()
        if error:
            log.error("reload refused, the old workers keep serving:\n%s", error)
            self._notify_systemd("READY=1")
            if client is not None:
                self._reply(client, ok=False, error=f"reload refused, old workers keep "
                                                      f"serving:\n{error}")
            return
        if client is not None:
            self.reload_waiters.append(client)
        if self.app_given:
            self._reload_in_place()
            return
        self._reexec()

    def _validate_new_code(self) -> str:
        """Load the config and import the app in a throwaway child; '' if both work."""
        if self.app_given:
            return ""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os.close(r)
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in HANDLED_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                # The import may leave processes behind: they get none of the master's
                # descriptors (death pipe, listener, control socket, scoreboard).
                fdutil.close_all_but([w])
                cfg = self._reload_config()
                user = resolve_user(cfg.manager.user, cfg.manager.group)
                sockets.ClientFilter.from_config(cfg.listen.allowed_clients)
                apply_environment(cfg.app)
                prepare_import(cfg.app.path, cfg.app.chdir)
                for name in [m for m in sys.modules if m not in self.base_modules]:
                    del sys.modules[name]
                user.drop()  # for good: no app code with uid 0
                load_app(cfg.app.module)
                code = 0
            except FcgiManagerError as exc:
                text = exc.message
                if getattr(exc, "traceback_text", ""):
                    text = exc.traceback_text.rstrip() + "\n" + text  # type: ignore
                if exc.hint:
                    text += f"\nhint: {exc.hint}"
                os.write(w, text.encode("utf-8", "replace")[-60000:])
            except BaseException:
                os.write(w, traceback.format_exc().encode("utf-8", "replace")[-60000:])
            finally:
                os._exit(code)
        os.close(w)
        chunks = []
        deadline = time.monotonic() + READY_TIMEOUT
        os.set_blocking(r, False)
        sel = selectors.DefaultSelector()
        sel.register(r, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                if sel.select(1.0):
                    data = os.read(r, 65536)
                    if not data:
                        break
                    chunks.append(data)
            else:
                os.kill(pid, signal.SIGKILL)
                chunks.append(b"importing the app took longer than 120 s")
        finally:
            sel.close()
            os.close(r)
        _, status = os.waitpid(pid, 0)
        text = b"".join(chunks).decode("utf-8", "replace")
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            return ""
        return text or f"the check process {describe_exit(status)}"

    def _reload_config(self) -> Config:
        from . import config as config_mod

        if self.cfg.source:
            return config_mod.load(self.cfg.source)
        return self.cfg

    def _reload_in_place(self) -> None:
        """Python API with an app object: new workers from the same code (nothing to re-import)."""
        self.reloading_from = self.generation
        self.generation += 1
        self.reload_deadline = time.monotonic() + READY_TIMEOUT
        self._spawn_missing()

    def _reexec(self) -> None:
        """Replace this process's image (same pid) with a fresh one that resumes the pool."""
        assert self.board is not None and self.listener is not None
        keep = [self.listener.fileno(), self.control_sock.fileno(), self.board.fd,  # type: ignore
                self.death_r, self.death_w]
        if self.handoff is not None:
            keep += self.handoff.fds()
        workers = []
        for rec in self.workers.values():
            workers.append({"slot": rec.slot, "pid": rec.pid, "generation": rec.generation,
                            "out": rec.out_fd, "notify": rec.notify_fd,
                            "stop_reason": rec.stop_reason})
            keep += [rec.out_fd, rec.notify_fd]
        waiters = []
        for client in self.reload_waiters:
            waiters.append(client.detach())
        keep += waiters
        self._write_header()
        state = {
            "listener": self.listener.fileno(), "sock_inode": self.sock_inode,
            "control": self.control_sock.fileno(), "board": self.board.fd,  # type: ignore
            "death": [self.death_r, self.death_w], "started_at": self.started_at,
            "totals": self.totals, "max_queue": self.max_queue,
            "generation": self.generation, "workers": workers, "waiters": waiters,
            "scale": {"mode": self.cfg.workers.mode, "target": self.target,
                      "configured": self.cfg.workers.effective_count},
            "zygote": self.zygote.pid if self.zygote is not None else 0,
            "handoff": self.handoff.fds() if self.handoff is not None else None,
        }
        env_extra: Dict[str, str] = {}
        daemon.carry_pidfile_fd(self.pidfile_fd, env_extra)
        state_fd = os.memfd_create("fcgi-manager-state", 0)
        os.write(state_fd, json.dumps(state).encode())
        os.lseek(state_fd, 0, os.SEEK_SET)
        keep.append(state_fd)
        for fd in keep:
            if fd is not None and fd >= 0:
                os.set_inheritable(fd, True)
        # The environment the master was started with, not the app's (app.clear_env
        # would drop PYTHONPATH or FCGI_WEB_SERVER_ADDRS): the new image applies app.env
        # and clear_env of the new config itself.
        env = dict(self.exec_env)
        env[RESUME_ENV] = str(state_fd)
        env.update(env_extra)
        if self.cfg.source:
            # The command line may name the config relative to a directory we left.
            env[RESUME_CONFIG_ENV] = self.cfg.source
        argv = list(getattr(sys, "orig_argv", []) or [])
        if not argv:
            argv = [sys.executable, "-m", "fcgi_manager", *sys.argv[1:]]
        log.info("reload: re-executing the master with fresh code (pid %d stays)", os.getpid())
        self.log_handler.flush()
        signal.set_wakeup_fd(-1)
        try:
            os.execve(sys.executable, [sys.executable, *argv[1:]], env)
        except OSError as exc:
            log.error("reload: cannot re-execute %s: %s; old workers keep serving",
                      sys.executable, exc)
            for client in self.reload_waiters:
                self._reply(client, ok=False, error=f"cannot re-execute: {exc}")
            self.reload_waiters = []
            signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)

    # -- workers ------------------------------------------------------------------------

    def _free_slot(self) -> int:
        used = {rec.slot for rec in self.workers.values()}
        for slot in range(MAX_SLOTS):
            if slot not in used:
                return slot
        raise FcgiManagerError("no free worker slot (1024 workers at most)")

    def _max_requests(self) -> int:
        w = self.cfg.workers
        if not w.max_requests:
            return 0
        return w.max_requests + (random.randint(0, w.max_requests_jitter)
                                 if w.max_requests_jitter else 0)

    def spawn_worker(self) -> Optional[WorkerRecord]:
        assert self.board is not None and self.listener is not None
        slot = self._free_slot()
        self.board.assign(slot, 0, self.generation)
        if self.cfg.workers.threads > 1:
            self.board.reserve_threads(slot, self.cfg.workers.threads)
        max_requests = self._max_requests()
        if self.zygote is not None or zygote_wanted(self):
            forked = self._fork_from_zygote(slot, max_requests)
        else:
            forked = self._fork_worker(slot, max_requests)
        if forked is None:
            self.board.clear(slot)
            self.totals["spawn_failures"] += 1
            return None
        pid, out_r, note_r = forked
        os.set_blocking(out_r, False)
        os.set_blocking(note_r, False)
        self.board.set_pid(slot, pid)
        rec = WorkerRecord(slot, pid, self.generation, out_r, note_r)
        self.workers[pid] = rec
        self._watch(rec)
        log.debug("spawned %s, generation %d", rec.name(), self.generation)
        return rec

    def _fork_worker(self, slot: int, max_requests: int) -> Optional[Tuple[int, int, int]]:
        """Fork a worker here: (pid, its output pipe, its notify pipe), None on failure."""
        out_r, out_w = os.pipe()
        note_r, note_w = os.pipe()
        master_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (out_r, out_w, note_r, note_w):
                os.close(fd)
            log.error("cannot fork a worker: %s (out of memory or process limit?)", exc)
            return None
        if pid == 0:  # pragma: no cover - the child never returns
            os.close(out_r)
            os.close(note_r)
            self._run_child(slot, out_w, note_w, max_requests, master_pid)
        os.close(out_w)
        os.close(note_w)
        return pid, out_r, note_r

    def _run_child(self, slot: int, out_w: int, note_w: int, max_requests: int,
                   master_pid: int) -> None:
        """The life of a worker process: serve, then exit with its status (never returns)."""
        code = 1
        try:
            code = self._child_main(slot, out_w, note_w, max_requests, master_pid)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            try:
                traceback.print_exc()
            except Exception:
                pass
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:
                pass
            os._exit(code)

    def _child_main(self, slot: int, out_w: int, note_w: int, max_requests: int,
                    master_pid: int) -> int:
        """In the forked worker: clean up what belongs to the master, then serve.

        "Did the master die between fork and here?" compares the parent with the master's
        own pid, not with 1: in a container without an init the master *is* pid 1.
        """
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.close(out_w)
        devnull = os.open(os.devnull, os.O_RDONLY)
        listen_fd = self.listener.fileno()  # type: ignore[union-attr]
        if listen_fd != 0:
            os.dup2(devnull, 0)
        os.close(devnull)
        sys.stdout = os.fdopen(1, "w", buffering=1, encoding="utf-8", errors="replace")
        sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="replace")
        logs.setup_worker(self.cfg.manager.log_level)
        self._close_master_fds()
        self.user.drop()
        # After the uid change: the kernel clears the parent-death signal on it.
        _set_pdeathsig(signal.SIGTERM)
        if os.getppid() != master_pid:
            return 0  # the master died between fork and here
        app = self.app
        if app is None:
            try:
                app = load_app(self.cfg.app.module)
            except AppImportError as exc:
                text = (exc.traceback_text.rstrip() + "\n" if exc.traceback_text else "") + \
                    exc.message + (f"\nhint: {exc.hint}" if exc.hint else "")
                payload = text.encode("utf-8", "replace")[-60000:]
                os.write(note_w, b"E" + struct.pack("!I", len(payload)) + payload)
                return EXIT_BOOT_ERROR
        assert self.board is not None
        board = self.board

        def status_page(query: str) -> tuple:
            return status_mod.render_page(status_mod.snapshot(self.cfg, board), query)

        # app.post_fork (per-process set-up of the app) is called here, before build_worker:
        # a threaded worker starts its app threads only in run().
        worker = build_worker(board, slot, app=app, config=self.cfg,
                              listener=self.listener, slot=SlotWriter(board, slot),
                              worker_id=slot + 1, master_fd=self.death_r, notify_fd=note_w,
                              max_requests=max_requests, status_page=status_page,
                              client_filter=self.client_filter,
                              handoff=self.handoff)
        return worker.run()

    def _close_master_fds(self) -> None:
        """In a child (worker or zygote): close what only the master may hold -- the
        write end of the death pipe, the control socket, other workers' pipes, the
        pidfile, the log -- and forget the numbers, so that a later close in a
        grandchild never hits a descriptor that reused one."""
        self.selector.close()
        for fd in (self.wakeup_r, self.wakeup_w, self.death_w):
            _close_quietly(fd)
        self.wakeup_r = self.wakeup_w = self.death_w = -1
        if self.control_sock is not None:
            self.control_sock.close()
            self.control_sock = None
        for rec in self.workers.values():
            _close_quietly(rec.out_fd)
            _close_quietly(rec.notify_fd)
        self.workers = {}
        for client in self.reload_waiters:
            client.close()
        self.reload_waiters = []
        for fd in self.child_close_fds + [self.pidfile_fd]:
            _close_quietly(fd)
        self.child_close_fds = []
        self.pidfile_fd = -1
        if self.zygote is not None:
            self.zygote.sock.close()
        self.log_handler.close()  # a file the app must not be able to write to

    # -- the zygote (preload as root with manager.user) -----------------------------------

    def _start_zygote(self) -> None:
        """Import the app in a child that dropped privileges for good and forks the
        workers (zygote.py): no app code ever runs in this root process."""
        if not procctl.set_child_subreaper() and os.getpid() != 1:
            raise FcgiManagerError("preload with manager.user needs PR_SET_CHILD_SUBREAPER "
                                   "(Linux) to import the app without root",
                                   "set app.preload = false")
        master_pid = os.getpid()

        def prepare_child() -> None:
            signal.set_wakeup_fd(-1)
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            self._close_master_fds()
            self.user.drop()

        def load() -> None:
            self.app = load_app(self.cfg.app.module)

        def spawn(slot: int, out_w: int, note_w: int, max_requests: int) -> None:
            self._run_child(slot, out_w, note_w, max_requests, master_pid)

        if self.zygote is not None:
            self.zygote.stop()
        self.zygote = None
        self.zygote = Zygote.start(prepare_child, load, spawn, self.death_r, READY_TIMEOUT)
        log.info("the app is imported in pid %d as %s (workers are forked from it)",
                 self.zygote.pid, self.cfg.manager.user)

    def _fork_from_zygote(self, slot: int, max_requests: int) -> Optional[Tuple[int, int, int]]:
        """A worker forked by the zygote, starting a new zygote if the last one died."""
        try:
            if self.zygote is None or not self.zygote.alive:
                log.warning("the app's zygote is gone: importing the app again in a new one")
                self._start_zygote()
            assert self.zygote is not None
            return self.zygote.spawn(slot, max_requests)
        except (OSError, FcgiManagerError) as exc:
            text = exc.message if isinstance(exc, FcgiManagerError) else str(exc)
            log.error("cannot start a worker through the zygote: %s", text)
            return None

    def _watch(self, rec: WorkerRecord) -> None:
        self.selector.register(rec.out_fd, selectors.EVENT_READ, ("out", rec))
        self.selector.register(rec.notify_fd, selectors.EVENT_READ, ("notify", rec))

    def _unwatch_fd(self, fd: int) -> None:
        if fd < 0:
            return
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass
        _close_quietly(fd)

    def _read_output(self, rec: WorkerRecord) -> None:
        try:
            data = os.read(rec.out_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._flush_output(rec)
            self._unwatch_fd(rec.out_fd)
            rec.out_fd = -1
            return
        buf = rec.out_buf + data
        *lines, rest = buf.split(b"\n")
        for line in lines:
            self._log_worker_line(rec, line)
        if len(rest) > 16384:
            self._log_worker_line(rec, rest)
            rest = b""
        rec.out_buf = rest

    def _flush_output(self, rec: WorkerRecord) -> None:
        if rec.out_buf:
            self._log_worker_line(rec, rec.out_buf)
            rec.out_buf = b""

    def _log_worker_line(self, rec: WorkerRecord, line: bytes) -> None:
        logs.worker_line(self.log_handler, rec.id, rec.pid,
                         line.rstrip(b"\r").decode("utf-8", "replace"))

    def _read_notify(self, rec: WorkerRecord) -> None:
        try:
            data = os.read(rec.notify_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._unwatch_fd(rec.notify_fd)
            rec.notify_fd = -1
            return
        rec.notify_buf += data
        while len(rec.notify_buf) >= 5:
            kind = rec.notify_buf[:1]
            (length,) = struct.unpack("!I", rec.notify_buf[1:5])
            if len(rec.notify_buf) < 5 + length:
                break
            payload = rec.notify_buf[5 : 5 + length]
            rec.notify_buf = rec.notify_buf[5 + length :]
            if kind == b"R":
                self._on_ready(rec)
            elif kind == b"E":
                rec.boot_error = payload.decode("utf-8", "replace")

    def _on_ready(self, rec: WorkerRecord) -> None:
        rec.ready = True
        self._change_state(rec, WorkerState.IDLE, "ready")
        log.info("%s is ready (generation %d)", rec.name(), rec.generation)
        self._check_ready()

    def _change_state(self, rec: WorkerRecord, new: WorkerState, reason: str) -> None:
        old = rec.state
        if old == new:
            return
        if not can_change(old, new):
            log.debug("%s: ignored %s -> %s (%s)", rec.name(), old, new, reason)
            return
        rec.state = new
        log.debug("%s: %s -> %s (%s)", rec.name(), old, new, reason)

    def _current(self) -> List[WorkerRecord]:
        """Workers of the current generation that are not on their way out."""
        return [r for r in self.workers.values()
                if r.generation == self.generation and r.stop_reason is None]

    def _check_ready(self) -> None:
        current = self._current()
        ready = sum(1 for r in current if r.ready)
        if ready < self.target:
            return
        if self.ready_callback is not None:
            cb, self.ready_callback = self.ready_callback, None
            self._notify_systemd(f"READY=1\nMAINPID={os.getpid()}")
            cb(True, "")
        if self.reloading_from is not None:
            self._finish_reload()

    def _finish_reload(self) -> None:
        old = [r for r in self.workers.values()
               if r.generation != self.generation and r.stop_reason is None]
        log.info("reload: generation %d is ready (%d workers); %d old worker(s) finish their "
                 "requests and exit", self.generation, len(self._current()), len(old))
        for rec in old:
            self._stop_worker(rec, "reload", signal.SIGTERM, self.cfg.workers.graceful_timeout)
        self.reloading_from = None
        self._write_header()
        self._notify_systemd("READY=1")
        for client in self.reload_waiters:
            self._reply(client, ok=True, result={"generation": self.generation,
                                                 "workers": len(self._current())})
        self.reload_waiters = []

    def _fail_reload(self, why: str) -> None:
        log.error("reload failed, the old workers keep serving: %s", why)
        for rec in self._current():
            self._stop_worker(rec, "reload failed", signal.SIGKILL, 0)
        self.generation = self.reloading_from  # type: ignore[assignment]
        self.reloading_from = None
        for client in self.reload_waiters:
            self._reply(client, ok=False, error=f"reload failed, old workers keep serving:\n"
                                                 f"{why}")
        self.reload_waiters = []
        self._notify_systemd("READY=1")

    def _stop_worker(self, rec: WorkerRecord, reason: str, sig: int, grace: float) -> None:
        if rec.stop_reason is not None and sig != signal.SIGKILL and sig != signal.SIGINT:
            return
        if rec.stop_reason is None:
            rec.stop_reason = reason
        self._change_state(rec, WorkerState.STOPPING, reason)
        try:
            os.kill(rec.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        if not rec.kill_at or deadline < rec.kill_at:
            rec.kill_at = deadline

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            rec = self.workers.pop(pid, None)
            if rec is not None:
                self._on_exit(rec, status)
            elif pid == self.old_zygote:
                log.debug("the previous generation's zygote (pid %d) %s", pid,
                          describe_exit(status))
            elif self.zygote is not None and pid == self.zygote.pid:
                self.zygote.alive = False
                log.warning("the app's zygote (pid %d) %s; a new one imports the app when a "
                            "worker must start", pid, describe_exit(status))
            else:
                self._on_orphan_exit(pid, status)

    def _on_orphan_exit(self, pid: int, status: int) -> None:
        """A child that is not a worker: as pid 1 of a container (or a subreaper) the
        kernel hands the master every orphan, such as the grandchild of an app that
        double-forks. Reaping it here is what keeps it from staying a zombie."""
        log.info("reaped pid %d, not a worker (a process the app left behind) that %s",
                 pid, describe_exit(status))

    def _on_exit(self, rec: WorkerRecord, status: int) -> None:
        assert self.board is not None
        # Read what the worker said before it died (its last log lines, a traceback).
        if rec.out_fd >= 0:
            while True:
                try:
                    data = os.read(rec.out_fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                rec.out_buf += data
            *lines, rest = rec.out_buf.split(b"\n")
            for line in lines:
                self._log_worker_line(rec, line)
            rec.out_buf = rest
            self._flush_output(rec)
        if rec.notify_fd >= 0:
            self._read_notify(rec)
        self._unwatch_fd(rec.out_fd)
        self._unwatch_fd(rec.notify_fd)
        slot = self.board.read_slot(rec.slot)
        self.totals["accepted_dead"] += int(slot["requests"])  # type: ignore[call-overload]
        self.totals["shed_dead"] += int(slot["shed"])  # type: ignore[call-overload]
        self.board.clear(rec.slot)
        how = describe_exit(status)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        lived = time.monotonic() - rec.started
        if code == EXIT_BOOT_ERROR or rec.boot_error:
            self._on_boot_error(rec, how)
            return
        if code in (EXIT_RECYCLE_REQUESTS, EXIT_RECYCLE_MEMORY):
            why = "max_requests" if code == EXIT_RECYCLE_REQUESTS else "max_memory"
            self.totals["recycled"] += 1
            log.info("%s %s: recycled (%s)", rec.name(), how, why)
            self.failures = 0
        elif rec.stop_reason == "timeout":
            log.warning("%s %s after its request ran past workers.timeout (%.0f s)",
                        rec.name(), how, self.cfg.workers.timeout)
        elif rec.stop_reason is not None:
            log.info("%s %s (%s)", rec.name(), how, rec.stop_reason)
        else:
            self.totals["crashes"] += 1
            self.pending_respawns += 1
            if lived < 5.0 and not slot["requests"]:  # one that served is no crash loop
                self.failures += 1
                self.last_failure_at = time.monotonic()
            log.error("%s %s unexpectedly after %.1f s; replacing it%s", rec.name(), how,
                      lived, " (check the app: it may crash the interpreter)"
                      if os.WIFSIGNALED(status) else "")
            self._backoff()
        if self.ready_callback is not None and not rec.ready and rec.stop_reason is None:
            if self.failures >= 5:
                self._startup_failed(f"workers keep dying before they are ready ({how}); see "
                                     f"the log {self.cfg.manager.log}")

    def _on_boot_error(self, rec: WorkerRecord, how: str) -> None:
        text = rec.boot_error or f"the worker {how} before it was ready"
        if self.ready_callback is not None:
            self._startup_failed(text)
            return
        if self.reloading_from is not None and rec.generation == self.generation:
            self._fail_reload(text)
            return
        self.failures += 1
        self.last_failure_at = time.monotonic()
        self.pending_respawns += 1
        log.error("%s could not import the app; retrying with backoff:\n%s", rec.name(), text)
        self._backoff()

    def _backoff(self) -> None:
        if self.failures >= 2:
            delay = min(30.0, 0.1 * (2 ** min(self.failures - 1, 10)))
            self.next_spawn_at = time.monotonic() + delay
            log.warning("workers are failing quickly (%d in a row): waiting %.1f s before "
                        "the next start", self.failures, delay)

    def _check_recovered(self, now: float) -> None:
        """End the backoff once a worker started after the last quick failure is healthy:
        it served a request, or stayed up 5 s. Otherwise "failures in a row" would never
        reset: after a burst of deaths (workers killed under load) the pool would refill
        one worker at a time, up to 30 s apart, and stay that way for good."""
        assert self.board is not None
        for rec in self._current():
            if rec.ready and rec.started > self.last_failure_at and (
                    now - rec.started >= 5.0 or self.board.read_slot(rec.slot)["requests"]):
                log.info("%s is healthy: no more backoff (%d quick failure(s) before it)",
                         rec.name(), self.failures)
                self.failures = 0
                self.next_spawn_at = 0.0
                return

    def _startup_failed(self, text: str) -> None:
        cb, self.ready_callback = self.ready_callback, None
        self.exit_code = 1
        self.stop(now=True)
        if cb is not None:
            cb(False, text)

    def _spawn_missing(self) -> None:
        if self.stopping:
            return
        if self.app is None and self.cfg.app.preload and not self.app_given and \
                self.zygote is None:
            return
        now = time.monotonic()
        if self.next_spawn_at and now < self.next_spawn_at:
            return
        self.next_spawn_at = 0.0
        missing = self.target - len(self._current())
        if self.failures >= 2:
            missing = min(missing, 1)  # one at a time while backing off
        for _ in range(max(0, missing)):
            rec = self.spawn_worker()
            if rec is None:
                self.next_spawn_at = now + 1.0
                break
            if self.pending_respawns:
                self.pending_respawns -= 1
                self.totals["respawns"] += 1
        if self.failures >= 2 and self.target > len(self._current()):
            self._backoff()

    def _manage_workers(self) -> None:
        """Bring the current generation to the size its mode wants (see pool.py)."""
        if self.stopping:
            return
        if self.cfg.workers.mode != "static" and self.reloading_from is None:
            self._resize_pool()
        current = self._current()
        if len(current) < self.target:
            self._spawn_missing()
        elif len(current) > self.target:
            assert self.board is not None
            # Retire idle workers first, newest first.
            extra = len(current) - self.target

            def busy(r: WorkerRecord) -> bool:
                return self.board.read_slot(r.slot)["state"] == WorkerState.BUSY  # type: ignore
            for rec in sorted(current, key=lambda r: (busy(r), -r.started))[:extra]:
                self._stop_worker(rec, "scaled down", signal.SIGTERM,
                                  self.cfg.workers.graceful_timeout)

    def _resize_pool(self) -> None:
        assert self.board is not None
        now = time.monotonic()
        current = self._current()
        idle = busy = starting = free_threads = with_room = 0
        idle_since: Dict[int, float] = {}
        for rec in current:
            slot = self.board.read_slot(rec.slot)
            state = slot["state"]
            if not rec.ready:
                starting += 1
                continue
            free = int(slot["threads"]) - len(slot["in_flight"])  # type: ignore
            free_threads += free
            with_room += free > 0
            if state == WorkerState.BUSY or slot["requests"] != rec.last_requests:
                rec.last_requests = slot["requests"]  # type: ignore[assignment]
                rec.idle_since = now
            if state == WorkerState.BUSY:
                busy += 1
            else:
                idle += 1
                idle_since[rec.pid] = rec.idle_since
        waiting = max(self.queue, 0)
        threads = self.cfg.workers.threads
        if threads > 1:  # demand is busy threads, not busy processes
            idle, busy, waiting = threaded_view(self.cfg.workers.mode, threads, free_threads,
                                                with_room, idle + busy, waiting)
        if self.cfg.workers.mode == "ondemand" and not waiting and not idle and self.listener:
            waiting = 1 if _readable(self.listener) else 0
        view = PoolView(total=len(current), idle=idle, busy=busy, starting=starting, now=now,
                        idle_since=idle_since, waiting=waiting)
        decision = self.sizer.decide(view)
        if decision.reached_max:
            self.totals["max_children_reached"] += 1
            log.warning("the pool is at workers.max_workers (%d) and requests are waiting: "
                        "raise max_workers if memory allows", self.cfg.workers.max_workers)
        for pid in decision.retire:
            rec = self.workers.get(pid)
            if rec is not None:
                self._stop_worker(rec, "idle (pool shrinking)", signal.SIGTERM,
                                  self.cfg.workers.graceful_timeout)
        self.target = len(current) - len(decision.retire) + decision.spawn
        if self.cfg.workers.mode == "ondemand":
            # Only when no worker can take a new connection: none idle (counting the
            # ones retired now), none starting or about to (watching then would wake the
            # loop without pause until the starting worker accepts).
            self._watch_listener(idle <= len(decision.retire) and not starting
                                 and not decision.spawn and self.target
                                 < self.cfg.workers.max_workers)

    def _watch_listener(self, on: bool) -> None:
        """ondemand: wake the master when a connection waits and no worker is idle."""
        if on == self.listener_watched or self.listener is None:
            return
        if on:
            self.selector.register(self.listener, selectors.EVENT_READ, "listener")
        else:
            self.selector.unregister(self.listener)
        self.listener_watched = on

    # -- the periodic tick -------------------------------------------------------------

    def _tick(self, now: float) -> None:
        self._end_drain(now)
        if not self.stopping:
            if self.failures:
                self._check_recovered(now)
            self._check_timeouts(now)
            self._manage_workers()
            if self.reloading_from is not None and now > self.reload_deadline:
                self._fail_reload("the new workers did not become ready in time")
        for rec in list(self.workers.values()):
            if rec.kill_at and now >= rec.kill_at:
                if rec.stop_reason == "timeout":
                    log.warning("%s: killing it now that its stack is logged", rec.name())
                else:
                    log.warning("%s did not exit within graceful_timeout (%s): killing it",
                                rec.name(), rec.stop_reason)
                try:
                    os.kill(rec.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                rec.kill_at = now + 5.0
        if self.stopping and self.workers and now > self.stop_deadline + 10:
            # Everything was killed and waited for; a zombie here is not ours to wait on.
            pass
        if now >= self.next_sample:
            self.next_sample = now + SAMPLE_EVERY
            self._sample(now)
        self._sample_queue()
        self._write_header()

    def _check_timeouts(self, now: float) -> None:
        assert self.board is not None
        w = self.cfg.workers
        active = 0
        for rec in list(self.workers.values()):
            slot = self.board.read_slot(rec.slot)
            if slot["state"] != WorkerState.BUSY:
                continue
            active += 1
            busy_since = float(slot["busy_since"])  # type: ignore[arg-type]
            elapsed = now - busy_since
            what = logs.escape(f"{slot['method']} "
                               f"{logs.shown_uri(str(slot['uri']), self.cfg.status.show_query)}")
            if rec.stop_reason == "timeout" and int(slot["threads"]) > 1:  # type: ignore
                self._kill_when_only_hung_left(rec, slot, now)
            if rec.stop_reason is None and elapsed > w.timeout:
                log.error("%s has run %s for %.0f s, past workers.timeout (%.0f s): its stack "
                          "follows, then it is killed and replaced", rec.name(), what,
                          elapsed, w.timeout)
                self.totals["timeouts"] += 1
                self.pending_respawns += 1  # its replacement starts at once
                rec.stop_reason = "timeout"
                self._signal(rec, STACK_SIGNAL)
                rec.kill_at = now + STACK_GRACE
                if int(slot["threads"]) > 1:  # type: ignore[call-overload]
                    self._stop_hung_threaded(rec, slot)
                self._change_state(rec, WorkerState.STOPPING, "timeout")
            elif w.slow_request and elapsed > w.slow_request:
                request_no = (int(slot["requests"]) + 1) & 0xFFFFFFFF  # type: ignore
                if int(slot["threads"]) > 1:  # type: ignore[call-overload]
                    request_no = int(busy_since * 1000) & 0xFFFFFFFF  # the oldest request
                if slot["slow_dumped"] != request_no:
                    self.board.mark_slow_dumped(rec.slot, request_no)
                    self.totals["slow"] += 1
                    log.warning("%s: %s is slow (%.1f s, workers.slow_request = %.1f s); its "
                                "stack follows", rec.name(), what, elapsed, w.slow_request)
                    self._signal(rec, STACK_SIGNAL)
        self.totals["max_active"] = max(self.totals["max_active"], active)

    def _stop_hung_threaded(self, rec: WorkerRecord, slot: Dict[str, Any]) -> None:
        """A threaded worker with a hung request: its other threads get graceful_timeout to
        finish their requests (it stops accepting at once), then it is killed."""
        others = len(slot["in_flight"]) - 1
        log.warning("%s: %d other request(s) in flight get workers.graceful_timeout (%.0f s) "
                    "to finish before it is killed", rec.name(), others,
                    self.cfg.workers.graceful_timeout)
        self._signal(rec, signal.SIGTERM)
        rec.kill_at += self.cfg.workers.graceful_timeout

    def _kill_when_only_hung_left(self, rec: WorkerRecord, slot: Dict[str, Any],
                                  now: float) -> None:
        """Once the other requests of a timed-out threaded worker are done (and its
        stacks had STACK_GRACE to be written), waiting longer serves no one."""
        grace_left = rec.kill_at - self.cfg.workers.graceful_timeout
        if len(slot["in_flight"]) <= 1 and now >= grace_left and rec.kill_at > now:
            log.info("%s: its other requests are done", rec.name())
            rec.kill_at = now

    def _signal(self, rec: WorkerRecord, sig: int) -> None:
        try:
            os.kill(rec.pid, sig)
        except ProcessLookupError:
            pass

    def _sample(self, now: float) -> None:
        """RSS and CPU of every worker into the scoreboard (the master's psutil, not the
        workers': the request path stays free of it)."""
        assert self.board is not None
        for rec in self.workers.values():
            try:
                if rec.proc is None:
                    rec.proc = psutil.Process(rec.pid)
                    rec.proc.cpu_percent(None)
                with rec.proc.oneshot():
                    rss = rec.proc.memory_info().rss
                    cpu = rec.proc.cpu_percent(None)
                self.board.write_sample(rec.slot, rss, cpu)
            except (psutil.Error, OSError):
                pass

    def _sample_queue(self) -> None:
        if self.listener is None:
            return
        q = sockets.listen_queue(self.listener)
        if q is None:
            self.queue = -1
            return
        self.queue = q[0]
        self.max_queue = max(self.max_queue, q[0])

    def _write_header(self) -> None:
        if self.board is None:
            return
        t = self.totals
        self.board.write_header({
            "master_pid": os.getpid(), "generation": self.generation,
            "started_at": self.started_at, "queue": self.queue, "max_queue": self.max_queue,
            "target": self.target,
            "backoff_ms": int(max(0.0, self.next_spawn_at - time.monotonic()) * 1000)
            if self.next_spawn_at else 0,
            **{k: t[k] for k in ("accepted_dead", "respawns", "crashes", "timeouts", "slow",
                                 "recycled", "shed_dead", "max_children_reached", "max_active",
                                 "spawn_failures")},
        })

    # -- control socket ----------------------------------------------------------------

    def _accept_control(self) -> None:
        try:
            client, _ = self.control_sock.accept()  # type: ignore[union-attr]
        except OSError:
            return
        client.settimeout(2.0)
        if not control.peer_allowed(client):
            log.warning("refused a control connection from uid %s (only uid %d and root may "
                        "control this master)", control.peer_uid(client), os.geteuid())
            self._reply(client, ok=False, error="permission denied")
            return
        try:
            req_id, name, args = control.decode_request(control.read_message(client))
        except ProtocolError as exc:
            self._reply(client, ok=False, error=str(exc))
            return
        except OSError:
            client.close()
            return
        try:
            result = self.command(name, args, client)
        except FcgiManagerError as exc:
            self._reply(client, ok=False, error=exc.message, req_id=req_id)
            return
        if result is not None:
            self._reply(client, ok=True, result=result, req_id=req_id)

    def _reply(self, client: socket.socket, ok: bool, result: Any = None, error: str = "",
               req_id: Any = 1) -> None:
        msg: Dict[str, Any] = {"id": req_id, "ok": ok}
        if ok:
            msg["result"] = result
        else:
            msg["error"] = error
        try:
            client.settimeout(2.0)
            client.sendall(control.encode_message(msg))
        except OSError:
            pass
        finally:
            client.close()

    # -- the end -----------------------------------------------------------------------

    def abandon(self) -> None:
        """Undo a failed :meth:`prepare`: nothing may be left behind (socket files)."""
        self._cleanup()
        if self.board is not None:
            self.board.close()
            self.board = None

    def _close_listener(self) -> None:
        if self.listener is not None:
            if self.listener_watched:
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
        if self.control_sock is not None:
            try:
                os.unlink(self.cfg.manager.control)
            except OSError:
                pass
            self.control_sock.close()
            self.control_sock = None
        for client in self.reload_waiters:
            self._reply(client, ok=False, error="the master stopped")
        self.reload_waiters = []

    def _notify_systemd(self, message: str) -> None:
        from .systemd import notify

        notify(message)


def zygote_wanted(master: Master) -> bool:
    return new_zygote_wanted(master.cfg.app.preload, master.app_given, master.user)


def _readable(sock: socket.socket) -> bool:
    import select

    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return False


def _version() -> str:
    from . import __version__

    return __version__


def _close_quietly(fd: int) -> None:
    if fd is None or fd < 0:
        return
    try:
        os.close(fd)
    except OSError:
        pass


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


def _set_pdeathsig(sig: int) -> None:
    """Linux extra: the kernel signals us when the master dies (the pipe is the real
    guarantee; this only makes an idle worker notice at once)."""
    procctl.set_pdeathsig(sig)


__all__ = ["Master", "describe_exit"]
