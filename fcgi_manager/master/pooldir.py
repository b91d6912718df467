"""The pool directory's parent: one small process that runs one master per app file.

``fcgi-manager -c DIR run`` (or ``start``, as a daemon) reads every ``DIR/*.toml`` and runs
each as an ordinary master, ``python -m fcgi_manager -c FILE start --foreground``, in a
fresh interpreter: the parent never imports app code, never takes an app's user, and one
app's crash, reload or bad file touches no other app. The rules (what a reload changes,
when a dead master is restarted, when it is ``fatal``) are in
:mod:`~fcgi_manager.rules.pooldir`; this module is their shell.

What the parent watches, in one ``selectors`` loop (no threads: it forks):

* the signal wakeup fd: ``TERM``/``QUIT`` stop every app gracefully (in parallel, bounded
  by the largest ``graceful_timeout``), ``INT`` stops them at once, ``HUP`` reloads the
  directory, ``USR2`` re-executes the parent (an upgrade; the masters keep serving),
  ``CHLD`` reaps;
* one ``sd_notify`` datagram socket (abstract, ``SO_PASSCRED``) that every master gets as
  its ``NOTIFY_SOCKET``: ``READY=1``, ``RELOADING=1``, ``STOPPING=1`` are how the parent
  knows an app's state without asking; the kernel's credentials say which master sent a
  datagram, so a worker or an app cannot speak for another;
* each master's stdout and stderr (one pipe), copied to the parent's log line by line as
  ``[NAME] line``, the last lines kept as the app's last error;
* its own control socket (``control`` framing, ``control_server`` connections): ``status``,
  ``start``, ``stop`` and ``reload`` with optional app names, and ``ping``.

Per-app questions go to the app's master itself (its own control socket): the command
line asks the parent which apps there are and in what state, then asks each master for
its workers, and reloads a master with the master's own ``reload`` (which answers with
its result). A ``HUP`` to the parent reloads changed masters with ``HUP`` (the result is
in the log).

Files: the parent's pidfile (by default in the runtime directory, named after DIR), its
control socket beside it (``.ctl``) and, in the background, its log (``.log``).

The parent's parts: :mod:`pooldir_masters` (the masters as processes: spawn, output,
notify datagrams, reaping), :mod:`pooldir_reload` (reading the directory, applying a
reload) and :mod:`pooldir_control` (the commands of the control socket). This module
holds them together: the loop, the signals, readiness, and the re-exec.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from .. import config as config_mod
from .. import fdutil
from ..errors import FcgiManagerError
from ..rules.pooldir import App, AppFile, AppState, stop_deadline
from . import daemon
from .pooldir_control import POOL_COMMANDS as POOL_COMMANDS
from .pooldir_control import PoolControl
from .pooldir_control import Waiter as Waiter
from .pooldir_control import decode_request as decode_request
from .pooldir_masters import CHILD_ENV_DROP as CHILD_ENV_DROP
from .pooldir_masters import HANDLED_SIGNALS, Masters
from .pooldir_masters import TAIL_LINES as TAIL_LINES
from .pooldir_masters import Output as Output
from .pooldir_masters import last_error as last_error
from .pooldir_reload import Reloader, scan
from .pooldir_reload import directory_signature as directory_signature
from .pooldir_reload import read_app as read_app

POOL_SUFFIX = ".fcgi-manager-pool"
RESUME_ENV = "FCGI_MANAGER_POOL_RESUME"  # the state a re-executed parent takes over
STOP_NOW_TIMEOUT = 5.0


# -- where things are ---------------------------------------------------------------------

def is_pool_dir(path: Optional[str]) -> bool:
    return bool(path) and os.path.isdir(str(path))


def default_pidfile(directory: str) -> str:
    """``<runtime dir>/<DIR's name>.fcgi-manager-pool.pid``: the runtime directory the
    masters' own defaults use (``$XDG_RUNTIME_DIR``, ``/run`` for root, else ``/tmp``)."""
    name = os.path.basename(os.path.normpath(os.path.abspath(directory))) or "pool"
    name = re.sub(r"[^\w.-]+", "_", name)
    return os.path.join(config_mod._runtime_dir(), f"{name}{POOL_SUFFIX}.pid")


def control_path(pidfile: str) -> str:
    return os.path.splitext(pidfile)[0] + ".ctl"


def log_path(pidfile: str) -> str:
    return os.path.splitext(pidfile)[0] + ".log"


# -- what crosses a re-exec ---------------------------------------------------------------

def _app_state(app: App) -> Dict[str, Any]:
    f = app.file
    return {"file": {"name": f.name, "path": f.path, "digest": f.digest,
                     "claims": [list(c) for c in f.claims],
                     "graceful_timeout": f.graceful_timeout, "control": f.control},
            "state": app.state.value, "pid": app.pid, "started_at": app.started_at,
            "ready": app.ready, "error": app.error, "wanted": app.wanted,
            "restart_after_stop": app.restart_after_stop, "restarts": app.restarts,
            "failures": app.tracker.failures, "last_failure_at": app.tracker.last_failure_at,
            "next_start_at": app.tracker.next_start_at}


def _app_from_state(item: Dict[str, Any]) -> App:
    f = dict(item["file"])
    f["claims"] = tuple(tuple(c) for c in f["claims"])
    app = App(AppFile(**f), state=AppState(item["state"]), pid=int(item["pid"]),
              started_at=float(item["started_at"]), ready=bool(item["ready"]),
              error=item["error"], wanted=bool(item["wanted"]),
              restart_after_stop=bool(item["restart_after_stop"]),
              restarts=int(item["restarts"]))
    app.tracker.failures = int(item["failures"])
    app.tracker.last_failure_at = float(item["last_failure_at"])
    app.tracker.next_start_at = float(item["next_start_at"])
    return app


# -- the parent --------------------------------------------------------------------------

class PoolParent:
    """Runs the apps of one directory until stopped (see the module docstring)."""

    def __init__(self, directory: str, pidfile: str, only: Sequence[str] = (),
                 watch: float = 0.0) -> None:
        self.pidfile = pidfile
        self.only = list(only)
        self.apps: Dict[str, App] = {}  # the pool's table, shared with its parts
        self.signals: List[int] = []
        self.stopping = False
        self.kill_at = 0.0
        self.stop_signal = signal.SIGTERM
        self.ready_sent = False
        self.pidfile_fd = -1
        self.parent_notify = os.environ.get("NOTIFY_SOCKET", "")
        self.selector = selectors.DefaultSelector()
        self.masters = Masters(self.apps, self.selector, self.say)
        self.reloader = Reloader(directory, watch, self.apps, self.masters, self.say)
        self.control = PoolControl(self, self.apps, self.masters, self.reloader,
                                   self.selector)
        self.wake_r: Optional[socket.socket] = None

    @property
    def directory(self) -> str:
        """The pool directory (absolute); the reloader's, which reads it."""
        return self.reloader.directory

    # -- logging ----------------------------------------------------------------------

    def say(self, text: str, who: str = "pool") -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        line = f"{stamp} [{who}] {text}\n"
        try:
            os.write(2, line.encode("utf-8", "replace"))
        except OSError:
            pass

    # -- set up and run ----------------------------------------------------------------

    def prepare(self) -> None:
        """Everything that can fail before any app starts: the pidfile, the sockets."""
        resumed = os.environ.pop(RESUME_ENV, "")
        if resumed:
            self._resume(json.loads(resumed))
        else:
            self._prepare_fresh()
        self.wake_r, wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake_w = wake_w
        signal.set_wakeup_fd(wake_w.fileno())
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._queue_signal)
        self.selector.register(self.wake_r, selectors.EVENT_READ, ("signal", None))
        if resumed:
            self.signals.append(signal.SIGCHLD)  # masters that ended during the exec

    def _prepare_fresh(self) -> None:
        state = daemon.inspect_pidfile(self.pidfile)
        if state.live and state.pid != os.getpid():
            raise FcgiManagerError(f"the pool {self.directory} is already running (pid "
                                   f"{state.pid}, pidfile {self.pidfile})",
                                   "stop it first, or use reload")
        daemon.remove_stale_pidfile(state)
        files, errors = scan(self.directory)
        unknown = [n for n in self.only if n not in {f.name for f in files}
                   | {e.name for e in errors}]
        if unknown:
            raise FcgiManagerError(f"no app named {', '.join(unknown)} in {self.directory}",
                                   "an app is DIR/NAME.toml, or the file's [manager] name")
        self.control.bind(control_path(self.pidfile))
        self.masters.bind_notify()
        for f in files:
            app = App(f)
            if not self.only or f.name in self.only:
                app.start()
            self.apps[f.name] = app
        for e in errors:
            self.reloader.refused(e)
        self.reloader.remember()

    # -- upgrade: the parent re-executes itself, its masters keep serving ----------------

    def reexec(self) -> None:
        """SIGUSR2 (nginx's binary upgrade): exec a fresh ``python -m fcgi_manager`` in
        this process, so new fcgi-manager code runs the pool, while every master -- still
        this pid's child -- keeps serving. What the new image needs crosses the exec: the
        control and notify sockets, the locked pidfile, each master's output pipe (as
        inherited descriptors), and each app's state (as JSON in the environment).
        Control clients waiting for an answer are disconnected."""
        server, notify_sock = self.control.server, self.masters.notify_sock
        if self.stopping or server is None or notify_sock is None:
            return
        self.masters.flush()
        self.control.drop_clients()
        state: Dict[str, Any] = {
            "directory": self.directory, "pidfile": self.pidfile,
            "notify_name": self.masters.notify_name, "notify_fd": notify_sock.fileno(),
            "control_fd": server.sock.fileno(), "pidfile_fd": self.pidfile_fd,
            "parent_notify": self.parent_notify, "ready_sent": self.ready_sent,
            "outputs": self.masters.handover(),
            "apps": [_app_state(app) for app in self.apps.values()],
        }
        fds: List[int] = [state["notify_fd"], state["control_fd"], *self.masters.outputs]
        if self.pidfile_fd >= 0:
            fds.append(self.pidfile_fd)
        env = dict(os.environ)
        env[RESUME_ENV] = json.dumps(state)
        if self.parent_notify:
            env["NOTIFY_SOCKET"] = self.parent_notify
        watch = self.reloader.watch
        argv = [sys.executable, "-m", "fcgi_manager", "-c", self.directory, "run",
                "--pidfile", self.pidfile] + (["--watch", str(watch)] if watch else [])
        argv += ["--allow-env-override"] if config_mod.env_override_allowed() else []
        self.say("SIGUSR2: re-executing the parent; the masters keep serving")
        for fd in fds:
            os.set_inheritable(fd, True)
        signal.set_wakeup_fd(-1)
        try:
            os.execve(sys.executable, argv, env)
        except OSError as exc:
            fdutil.set_cloexec(fds)
            signal.set_wakeup_fd(self._wake_w.fileno())
            self.say(f"cannot re-execute ({exc.strerror}): the running parent goes on")

    def _resume(self, state: Dict[str, Any]) -> None:
        """The new image after :meth:`reexec`: adopt what the old one handed over."""
        self.reloader.directory, self.pidfile = state["directory"], state["pidfile"]
        self.control.adopt(state["control_fd"])
        self.masters.adopt_notify(state["notify_fd"], state["notify_name"])
        self.pidfile_fd = int(state["pidfile_fd"])
        self.parent_notify = state["parent_notify"]
        self.ready_sent = bool(state["ready_sent"])
        self.reloader.remember()
        for item in state["apps"]:
            app = _app_from_state(item)
            self.apps[app.file.name] = app
        self.masters.adopt_running()
        fds = [state["notify_fd"], state["control_fd"]]
        fds += self.masters.adopt_outputs(state["outputs"])
        if self.pidfile_fd >= 0:
            fds.append(self.pidfile_fd)
        fdutil.set_cloexec(fds)
        self.say(f"re-executed: pid {os.getpid()} goes on with {len(self.apps)} app(s), "
                 f"{sum(1 for a in self.apps.values() if a.pid)} master(s) running")

    def _queue_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)  # only queued: the loop acts on it

    def run(self, ready: Callable[[bool, str], None]) -> int:
        """The loop; ``ready`` is called once every app is up or has failed."""
        self.say(f"pool {self.directory}: {len(self.apps)} app(s), pid {os.getpid()}")
        try:
            while True:
                now = time.monotonic()
                if not self.stopping:
                    self.masters.start_due(now)
                watch = self.reloader.watch
                if watch and now >= self.reloader.next_look and not self.stopping:
                    self.reloader.look(now)
                self.control.answer_waiters()
                if not self.ready_sent and self._settled():
                    self._ready(ready)
                if self.stopping:
                    if not any(a.pid for a in self.apps.values()):
                        break
                    if now >= self.kill_at:
                        self._kill_remaining()
                events = self.selector.select(self._timeout(now))
                for key, _ in events:
                    kind, obj = key.data
                    if kind == "signal":
                        self._drain_wakeup()
                    elif kind == "notify":
                        self.masters.read_notify()
                    elif kind == "out":
                        self.masters.read_output(obj)
                    elif kind == "control":
                        self.control.on_event(obj)
                self._handle_signals()
                self.control.sweep(time.monotonic())
        finally:
            self._close()
        self.say("pool stopped")
        return 0

    def _timeout(self, now: float) -> float:
        deadlines = [a.next_start_at for a in self.apps.values()
                     if a.pid == 0 and a.wanted and a.next_start_at]
        if self.stopping:
            deadlines.append(self.kill_at)
        if self.control.busy():
            deadlines.append(now + 0.5)
        if self.reloader.watch:
            deadlines.append(self.reloader.next_look)
        if not deadlines:
            return 5.0
        return max(0.0, min(min(deadlines) - now, 5.0))

    def _settled(self) -> bool:
        return all(a.state in (AppState.RUNNING, AppState.FATAL, AppState.STOPPED)
                   for a in self.apps.values())

    def _ready(self, ready: Callable[[bool, str], None]) -> None:
        self.ready_sent = True
        try:
            self.pidfile_fd = daemon.write_pidfile(self.pidfile, os.getpid())
        except OSError as exc:
            ready(False, f"cannot write the pidfile {self.pidfile}: {exc.strerror}")
            self.stop_all(now=True)
            return
        running = sum(1 for a in self.apps.values() if a.state is AppState.RUNNING)
        self.say(f"ready: {running} of {len(self.apps)} app(s) running")
        self._notify_systemd(f"READY=1\nMAINPID={os.getpid()}\n"
                             f"STATUS={running} of {len(self.apps)} app(s) running")
        ready(True, json.dumps(self.snapshot()))

    def _notify_systemd(self, message: str) -> None:
        if not self.parent_notify:
            return
        from .systemd import notify

        mine = os.environ.get("NOTIFY_SOCKET")
        os.environ["NOTIFY_SOCKET"] = self.parent_notify
        try:
            notify(message)
        finally:
            if mine is None:
                os.environ.pop("NOTIFY_SOCKET", None)
            else:
                os.environ["NOTIFY_SOCKET"] = mine

    def _close(self) -> None:
        self.control.close(control_path(self.pidfile))
        daemon.remove_pidfile(self.pidfile, os.getpid())
        signal.set_wakeup_fd(-1)
        self._notify_systemd("STOPPING=1")

    def _kill_remaining(self) -> None:
        self.masters.kill_remaining()
        self.kill_at = time.monotonic() + 3600

    # -- signals ----------------------------------------------------------------------

    def _drain_wakeup(self) -> None:
        assert self.wake_r is not None
        try:
            while self.wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _handle_signals(self) -> None:
        queued, self.signals = self.signals, []
        for sig in queued:
            if sig == signal.SIGCHLD:
                self.masters.reap()
            elif sig in (signal.SIGTERM, signal.SIGQUIT):
                self.stop_all(now=False)
            elif sig == signal.SIGINT:
                self.stop_all(now=True)
            elif sig == signal.SIGHUP:
                self.say("SIGHUP: reloading the directory")
                self.reloader.reload_dir(signal_masters=True)
            elif sig == signal.SIGUSR2:
                self.reexec()

    # -- what the operator asks ---------------------------------------------------------

    def stop_all(self, now: bool) -> None:
        apps = [a for a in self.apps.values() if a.pid]
        if not self.stopping:
            self.say(f"stopping {len(apps)} app(s)" + (" now" if now else " gracefully"))
            self.stopping = True
            self.kill_at = time.monotonic() + (STOP_NOW_TIMEOUT + 5 if now
                                               else stop_deadline(apps))
        self._notify_systemd("STOPPING=1")
        for app in self.apps.values():
            app.stop()
            self.masters.signal_app(app, signal.SIGINT if now else signal.SIGTERM)

    def snapshot(self) -> Dict[str, Any]:
        return {
            "pid": os.getpid(), "directory": self.directory, "pidfile": self.pidfile,
            "stopping": self.stopping,
            "apps": [{"name": n, "state": a.state.shown, "pid": a.pid or None,
                      "error": a.error or None, "file": a.file.path,
                      "control": a.file.control or None, "restarts": a.restarts}
                     for n, a in sorted(self.apps.items())],
        }
