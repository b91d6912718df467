"""The pool directory's parent: one small process that runs one master per app file.

``fcgi-manager -c DIR run`` (or ``start``, as a daemon) reads every ``DIR/*.toml`` and runs
each as an ordinary master, ``python -m fcgi_manager -c FILE start --foreground``, in a
fresh interpreter: the parent never imports app code, never takes an app's user, and one
app's crash, reload or bad file touches no other app. The rules (what a reload changes,
when a dead master is restarted, when it is ``fatal``) are in :mod:`pooldir_rules`; this
module is their shell.

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
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import re
import secrets
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

from .. import config as config_mod
from .. import fdutil
from ..errors import FcgiManagerError, ProtocolError
from ..rules.pooldir import (
    App,
    AppFile,
    AppState,
    FileError,
    ReloadPlan,
    plan_reload,
    refuse_conflicts,
    stop_deadline,
)
from ..rules.restarts import describe_exit
from ..wire import control
from . import daemon, procctl
from .control_server import ControlConnection, ControlServer

POOL_SUFFIX = ".fcgi-manager-pool"
POOL_COMMANDS = ("status", "start", "stop", "reload", "ping")
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD,
                   signal.SIGUSR2)
RESUME_ENV = "FCGI_MANAGER_POOL_RESUME"  # the state a re-executed parent takes over
STOP_NOW_TIMEOUT = 5.0
TAIL_LINES = 40
# The environment a master must not inherit from the parent: what belongs to the
# parent's own start (systemd's sockets, a reload's hand-over) or names another config.
CHILD_ENV_DROP = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC",
                  "WATCHDOG_PID", "FCGI_MANAGER_CONFIG", daemon.PIDFILE_FD_ENV)


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


# -- reading the directory -------------------------------------------------------------------

def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def read_app(path: str) -> Union[AppFile, FileError]:
    """One file as an app, or its config error (which names the file and the key)."""
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        cfg = config_mod.load(path)
    except FcgiManagerError as exc:
        text = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
        return FileError(path, _stem(path), text)
    except OSError as exc:
        return FileError(path, _stem(path), f"{path}: cannot read it: {exc.strerror}")
    claims: List[Tuple[str, str]] = []
    for bind in (cfg.listen.bind, getattr(cfg.status, "listen", "")):
        if bind and not bind.startswith("fd:") and bind != "systemd":
            claims.append(("socket", bind))
    claims += [("pidfile", cfg.manager.pidfile), ("control socket", cfg.manager.control)]
    return AppFile(name=cfg.manager.name or _stem(path), path=path, digest=digest,
                   claims=tuple(claims),
                   graceful_timeout=cfg.workers.graceful_timeout + cfg.manager.shutdown_delay,
                   control=cfg.manager.control)


def scan(directory: str) -> Tuple[List[AppFile], List[FileError]]:
    """Every ``*.toml`` of the directory: the usable apps, and the files refused."""
    if not os.access(directory, os.R_OK | os.X_OK):
        raise FcgiManagerError(f"cannot read the pool directory {directory}",
                               "check its permissions")
    paths = sorted(glob.glob(os.path.join(glob.escape(os.path.abspath(directory)), "*.toml")))
    parsed = [read_app(p) for p in paths]
    files = [p for p in parsed if isinstance(p, AppFile)]
    errors = [p for p in parsed if isinstance(p, FileError)]
    usable, refused = refuse_conflicts(files)
    return usable, errors + refused


def directory_signature(directory: str) -> Tuple[Tuple[Any, ...], ...]:
    """What ``--watch`` compares: each ``*.toml``'s name, inode, size and mtime."""
    out = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return ()
    for name in names:
        if not name.endswith(".toml"):
            continue
        try:
            st = os.stat(os.path.join(directory, name))
        except OSError:
            continue
        out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def last_error(lines: Sequence[str]) -> str:
    """The line of a master's last output that says why it failed: its ``Error:`` line,
    else the exception line of a traceback, else its last line."""
    lines = [line.strip() for line in lines if line.strip()]
    for line in reversed(lines):
        if line.startswith("Error:") and "the app could not start" not in line:
            return line[len("Error:"):].strip()
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*", line):
            return line
    return lines[-1] if lines else ""


def decode_request(body: bytes) -> Tuple[Any, str, Dict[str, Any]]:
    """A request to the parent: ``control``'s framing and shape, the parent's commands,
    ``args.names`` a list of app names."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"control request is not JSON: {exc}") from None
    if not isinstance(obj, dict) or obj.get("command") not in POOL_COMMANDS:
        raise ProtocolError("unknown control command")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError("control request 'args' must be an object")
    names = args.get("names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ProtocolError("control request 'names' must be a list of app names")
    return obj.get("id"), obj["command"], args


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

class Output:
    """One master's stdout and stderr: partial line, and the last lines said."""

    __slots__ = ("fd", "name", "buf", "tail")

    def __init__(self, fd: int, name: str, tail: Deque[str]) -> None:
        self.fd = fd
        self.name = name
        self.buf = b""
        self.tail = tail  # the app's, kept after the pipe is closed


class Waiter:
    """A control client waiting until ``done()`` is true; then answered with ``result()``."""

    __slots__ = ("conn", "done", "result")

    def __init__(self, conn: ControlConnection, done: Callable[[], bool],
                 result: Callable[[], Tuple[bool, Any, str]]) -> None:
        self.conn, self.done, self.result = conn, done, result


class PoolParent:
    """Runs the apps of one directory until stopped (see the module docstring)."""

    def __init__(self, directory: str, pidfile: str, only: Sequence[str] = (),
                 watch: float = 0.0) -> None:
        self.directory = os.path.abspath(directory)
        self.pidfile = pidfile
        self.only = list(only)
        self.watch = watch  # seconds between looks at the directory (0 = only on reload)
        self.next_look = 0.0
        self.seen: Tuple[Tuple[Any, ...], ...] = ()  # the directory as last applied
        self.pending: Optional[Tuple[Tuple[Any, ...], ...]] = None  # changed, settling
        self.apps: Dict[str, App] = {}
        self.outputs: Dict[int, Output] = {}  # read fd -> output
        self.by_pid: Dict[int, str] = {}
        self.tails: Dict[str, Deque[str]] = {}  # app -> its master's last lines
        self.waiters: List[Waiter] = []
        self.signals: List[int] = []
        self.stopping = False
        self.kill_at = 0.0
        self.stop_signal = signal.SIGTERM
        self.ready_sent = False
        self.pidfile_fd = -1
        self.parent_notify = os.environ.get("NOTIFY_SOCKET", "")
        self.selector = selectors.DefaultSelector()
        self.notify_name = f"fcgi-manager-pool/{os.getpid()}/{secrets.token_hex(8)}"
        self.notify_sock: Optional[socket.socket] = None
        self.wake_r: Optional[socket.socket] = None
        self.control: Optional[ControlServer] = None

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
        self.control = ControlServer(control.bind_control(control_path(self.pidfile)),
                                     self.selector, self._on_command, time.monotonic,
                                     decode=decode_request)
        self.notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.notify_sock.bind("\0" + self.notify_name)
        self.notify_sock.setblocking(False)
        self.selector.register(self.notify_sock, selectors.EVENT_READ, ("notify", None))
        for f in files:
            app = App(f)
            if not self.only or f.name in self.only:
                app.start()
            self.apps[f.name] = app
        for e in errors:
            self._refused(e)
        self.seen = directory_signature(self.directory)

    # -- upgrade: the parent re-executes itself, its masters keep serving ----------------

    def reexec(self) -> None:
        """SIGUSR2 (nginx's binary upgrade): exec a fresh ``python -m fcgi_manager`` in
        this process, so new fcgi-manager code runs the pool, while every master -- still
        this pid's child -- keeps serving. What the new image needs crosses the exec: the
        control and notify sockets, the locked pidfile, each master's output pipe (as
        inherited descriptors), and each app's state (as JSON in the environment).
        Control clients waiting for an answer are disconnected."""
        if self.stopping or self.control is None or self.notify_sock is None:
            return
        for out in list(self.outputs.values()):
            if out.buf:
                self._line(out, out.buf)
                out.buf = b""
        for conn in list(self.control.conns.values()):
            self.control.close(conn)
        self.waiters = []
        state: Dict[str, Any] = {
            "directory": self.directory, "pidfile": self.pidfile,
            "notify_name": self.notify_name, "notify_fd": self.notify_sock.fileno(),
            "control_fd": self.control.sock.fileno(), "pidfile_fd": self.pidfile_fd,
            "parent_notify": self.parent_notify, "ready_sent": self.ready_sent,
            "outputs": [{"fd": fd, "name": out.name} for fd, out in self.outputs.items()],
            "apps": [_app_state(app) for app in self.apps.values()],
        }
        fds: List[int] = [state["notify_fd"], state["control_fd"], *self.outputs]
        if self.pidfile_fd >= 0:
            fds.append(self.pidfile_fd)
        env = dict(os.environ)
        env[RESUME_ENV] = json.dumps(state)
        if self.parent_notify:
            env["NOTIFY_SOCKET"] = self.parent_notify
        argv = [sys.executable, "-m", "fcgi_manager", "-c", self.directory, "run",
                "--pidfile", self.pidfile] + (["--watch", str(self.watch)] if self.watch else [])
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
        self.directory, self.pidfile = state["directory"], state["pidfile"]
        self.control = ControlServer(socket.socket(fileno=state["control_fd"]), self.selector,
                                     self._on_command, time.monotonic, decode=decode_request)
        self.notify_name = state["notify_name"]
        self.notify_sock = socket.socket(fileno=state["notify_fd"])
        self.notify_sock.setblocking(False)
        self.selector.register(self.notify_sock, selectors.EVENT_READ, ("notify", None))
        self.pidfile_fd = int(state["pidfile_fd"])
        self.parent_notify = state["parent_notify"]
        self.ready_sent = bool(state["ready_sent"])
        self.seen = directory_signature(self.directory)
        for item in state["apps"]:
            app = _app_from_state(item)
            self.apps[app.file.name] = app
            if app.pid:
                self.by_pid[app.pid] = app.file.name
        fds = [state["notify_fd"], state["control_fd"]]
        for item in state["outputs"]:
            fd, name = int(item["fd"]), item["name"]
            tail = self.tails.setdefault(name, collections.deque(maxlen=TAIL_LINES))
            out = Output(fd, name, tail)
            self.outputs[fd] = out
            self.selector.register(fd, selectors.EVENT_READ, ("out", out))
            fds.append(fd)
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
                self._start_due(now)
                if self.watch and now >= self.next_look and not self.stopping:
                    self._look(now)
                self._answer_waiters()
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
                        self._read_notify()
                    elif kind == "out":
                        self._read_output(obj)
                    elif kind == "control" and self.control is not None:
                        self.control.on_event(obj, 0)
                self._handle_signals()
                if self.control is not None:
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
        if self.waiters or (self.control is not None and self.control.conns):
            deadlines.append(now + 0.5)
        if self.watch:
            deadlines.append(self.next_look)
        if not deadlines:
            return 5.0
        return max(0.0, min(min(deadlines) - now, 5.0))

    def _look(self, now: float) -> None:
        """``--watch``: a changed directory is reloaded once it has looked the same for
        one interval (an editor or a deploy writes a file in several steps)."""
        self.next_look = now + self.watch
        current = directory_signature(self.directory)
        if current == self.seen:
            self.pending = None
        elif current == self.pending:
            self.say("the directory changed: reloading it")
            self.seen, self.pending = current, None
            self.reload_dir(signal_masters=True)
        else:
            self.pending = current

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
        if self.control is not None:
            self.control.close_all()
            try:
                os.unlink(control_path(self.pidfile))
            except OSError:
                pass
            self.control.sock.close()
        daemon.remove_pidfile(self.pidfile, os.getpid())
        signal.set_wakeup_fd(-1)
        self._notify_systemd("STOPPING=1")

    # -- masters ----------------------------------------------------------------------

    def _child_env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in CHILD_ENV_DROP and not k.startswith("FCGI_MANAGER_RESUME")}
        env["NOTIFY_SOCKET"] = "@" + self.notify_name
        return env

    def _start_due(self, now: float) -> None:
        if self.stopping:
            return
        for app in self.apps.values():
            if app.due(now):
                self._spawn(app, now)

    def _spawn(self, app: App, now: float) -> None:
        """fork + exec ``python -m fcgi_manager -c FILE start --foreground``."""
        argv = [sys.executable, "-m", "fcgi_manager", "-c", app.file.path, "start",
                "--foreground"]
        argv += ["--allow-env-override"] if config_mod.env_override_allowed() else []
        env = self._child_env()
        r, w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child, until exec
            try:
                os.setpgid(0, 0)  # a Ctrl-C at the parent's terminal is the parent's
                procctl.set_pdeathsig(signal.SIGTERM)  # the parent gone: stop gracefully
                if os.getppid() != parent:
                    os._exit(1)
                signal.set_wakeup_fd(-1)
                for sig in HANDLED_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(w, 1)
                os.dup2(w, 2)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        os.close(w)
        os.set_blocking(r, False)
        tail: Deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.tails[app.file.name] = tail
        out = Output(r, app.file.name, tail)
        self.outputs[r] = out
        self.selector.register(r, selectors.EVENT_READ, ("out", out))
        self.by_pid[pid] = app.file.name
        app.spawned(pid, now)
        self.say(f"{app.file.name}: master started (pid {pid}, {app.file.path})")

    def _read_output(self, out: Output, final: bool = False) -> None:
        while True:
            data = fdutil.read_pipe(out.fd, final=False)
            if data is None:
                return
            if not data:
                if out.buf:
                    self._line(out, out.buf)
                    out.buf = b""
                self.selector.unregister(out.fd)
                os.close(out.fd)
                del self.outputs[out.fd]
                return
            out.buf += data
            *lines, out.buf = out.buf.split(b"\n")
            for line in lines:
                self._line(out, line)
            if len(out.buf) > 65536:
                self._line(out, out.buf)
                out.buf = b""

    def _line(self, out: Output, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        out.tail.append(text)
        self.say(text, out.name)

    def _reap(self) -> None:
        for pid, status in procctl.exited_children():
            name = self.by_pid.pop(pid, None)
            app = self.apps.get(name or "")
            if app is None or app.pid != pid:
                continue
            for out in list(self.outputs.values()):
                if out.name == name:
                    self._read_output(out)  # what it said last, before judging
            tail = list(self.tails.get(app.file.name, ()))
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            how = describe_exit(status)
            before = app.state
            app.exited(time.monotonic(), code, how, last_error(tail))
            self._log_exit(app, pid, how, before)

    def _log_exit(self, app: App, pid: int, how: str, before: AppState) -> None:
        name = app.file.name
        if app.state is AppState.FATAL:
            self.say(f"{name}: master (pid {pid}) {how}; it keeps failing, so it is fatal "
                     f"(fix it, then `reload` or `start {name}`): {app.error}")
        elif app.state is AppState.STARTING:
            delay = max(0.0, app.next_start_at - time.monotonic()) if app.next_start_at else 0
            self.say(f"{name}: master (pid {pid}) {how}"
                     + (f" (was {before.shown})" if before is not AppState.STARTING else "")
                     + (f"; restarting in {delay:.1f} s" if delay else "; restarting"))
        else:
            self.say(f"{name}: master (pid {pid}) {how}; {app.state.shown}")

    def _read_notify(self) -> None:
        assert self.notify_sock is not None
        while True:
            try:
                data, ancillary, _, _ = self.notify_sock.recvmsg(
                    4096, socket.CMSG_SPACE(struct.calcsize("3i")))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            pid = 0
            for level, kind, cdata in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", cdata[:struct.calcsize("3i")])[0]
            app = self.apps.get(self.by_pid.get(pid, ""))
            if app is None or app.pid != pid:
                continue  # not a master of ours: a worker, an app, anyone else
            before = app.state
            app.notified(data.decode("utf-8", "replace"))
            if app.state is not before:
                self.say(f"{app.file.name}: {before.shown} -> {app.state.shown}")

    def _signal_app(self, app: App, sig: int) -> None:
        if app.pid:
            try:
                os.kill(app.pid, sig)  # our own child, not yet reaped: it is that master
            except ProcessLookupError:
                pass

    def _kill_remaining(self) -> None:
        for app in self.apps.values():
            if app.pid:
                self.say(f"{app.file.name}: master (pid {app.pid}) did not stop in time: "
                         "killing it")
                self._signal_app(app, signal.SIGKILL)
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
                self._reap()
            elif sig in (signal.SIGTERM, signal.SIGQUIT):
                self.stop_all(now=False)
            elif sig == signal.SIGINT:
                self.stop_all(now=True)
            elif sig == signal.SIGHUP:
                self.say("SIGHUP: reloading the directory")
                self.reload_dir(signal_masters=True)
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
            self._signal_app(app, signal.SIGINT if now else signal.SIGTERM)

    def stop_app(self, app: App, now: bool = False) -> None:
        if app.pid:
            self.say(f"{app.file.name}: stopping" + (" now" if now else " gracefully"))
        app.stop()
        self._signal_app(app, signal.SIGINT if now else signal.SIGTERM)

    def _refused(self, error: FileError) -> None:
        """A file that cannot run now: a running app of it keeps its generation."""
        self.say(f"refused: {error.error}")
        owner = next((a for a in self.apps.values() if a.file.path == error.path), None)
        if owner is None:
            owner = self.apps.get(error.name)
            if owner is not None and owner.file.path != error.path:
                return  # another file's app by that name: untouched
        if owner is not None and owner.pid:
            owner.error = f"{error.error} (the running master keeps its configuration)"
            return
        if owner is None:
            owner = App(AppFile(name=error.name, path=error.path, digest=""))
            self.apps[error.name] = owner
        owner.wanted = False
        owner.error = error.error
        owner.change_state(AppState.FATAL)  # -> fatal: its file is refused

    def reload_dir(self, names: Sequence[str] = (), signal_masters: bool = False
                   ) -> Dict[str, Any]:
        """Apply the directory as it is now (only to ``names``, if given). Masters to
        reload are signalled (``signal_masters``) or returned for the caller to reload
        through their control sockets (to learn each outcome)."""
        self.seen, self.pending = directory_signature(self.directory), None
        files, errors = scan(self.directory)
        by_name = {f.name: f for f in files}
        error_paths = {e.path for e in errors}
        for name, app in list(self.apps.items()):
            if not app.file.digest and not app.pid and app.file.path not in error_paths \
                    and (not names or name in names):
                del self.apps[name]  # a refused file, gone or fixed: forget its refusal
        known = {n: a.file for n, a in self.apps.items() if a.file.digest}
        broken = [e.name for e in errors] + [n for n, f in known.items()
                                             if f.path in {e.path for e in errors}]
        plan = plan_reload(known, files, broken)
        if names:
            start, stop, reload, restart, keep = (tuple(n for n in group if n in names)
                                                  for group in (plan.start, plan.stop,
                                                                plan.reload, plan.restart,
                                                                plan.keep))
            plan = ReloadPlan(start=start, stop=stop, reload=reload, restart=restart,
                              keep=keep)
        result: Dict[str, Any] = {"started": [], "stopped": [], "reload": [],
                                  "restarted": [], "unchanged": [], "errors": {}}
        named_paths = {self.apps[n].file.path for n in names if n in self.apps}
        for e in errors:
            if not names or e.name in names or e.path in named_paths:
                self._refused(e)
                result["errors"][e.name] = e.error
        for name in plan.start:
            self.apps[name] = App(by_name[name])
            self.apps[name].start()
            result["started"].append(name)
        for name in plan.stop:
            self.stop_app(self.apps[name])
            result["stopped"].append(name)
        for name in plan.restart:
            app = self.apps[name]
            app.file = by_name[name]
            if app.pid:
                self.stop_app(app)
                app.restart_after_stop = True  # stop, then start from the renamed file
            else:
                app.start()
            result["restarted"].append(name)
        for name in plan.reload + plan.keep:
            if name not in by_name:
                continue  # its file is broken now: it keeps what it runs
            app = self.apps[name]
            app.file = by_name[name]
            if name in plan.keep and name not in names:
                result["unchanged"].append(name)  # not touched
            elif app.pid and app.state is not AppState.STOPPING:
                app.error = ""
                if signal_masters:
                    self.say(f"{name}: reloading (SIGHUP to pid {app.pid})")
                    self._signal_app(app, signal.SIGHUP)
                result["reload"].append({"name": name, "control": app.file.control,
                                         "pid": app.pid})
            elif app.wanted or app.state is AppState.FATAL or name in names:
                app.start()  # fixed (or asked for by name): start it again
                result["started"].append(name)
        for name in names:
            if name not in by_name and name not in result["errors"] \
                    and name not in plan.stop:
                result["errors"][name] = f"no file for {name} in {self.directory}"
        return result

    # -- the control socket --------------------------------------------------------------

    def snapshot(self) -> Dict[str, Any]:
        return {
            "pid": os.getpid(), "directory": self.directory, "pidfile": self.pidfile,
            "stopping": self.stopping,
            "apps": [{"name": n, "state": a.state.shown, "pid": a.pid or None,
                      "error": a.error or None, "file": a.file.path,
                      "control": a.file.control or None, "restarts": a.restarts}
                     for n, a in sorted(self.apps.items())],
        }

    def _settled_names(self, names: Sequence[str]) -> bool:
        return all(self.apps[n].state in (AppState.RUNNING, AppState.FATAL, AppState.STOPPED)
                   for n in names if n in self.apps)

    def _on_command(self, conn: ControlConnection, req_id: Any, name: str,
                    args: Dict[str, Any]) -> None:
        assert self.control is not None
        server = self.control
        names: List[str] = list(dict.fromkeys(args.get("names") or []))
        if name in ("ping", "status"):
            server.reply(conn, True, self.snapshot())
            return
        if self.stopping:
            server.reply(conn, False, error="the pool is stopping")
            return
        if name in ("start", "reload") and names:
            self._learn_new_files(names)
        unknown = [n for n in names if n not in self.apps]
        if unknown:
            server.reply(conn, False, error=f"no app named {', '.join(unknown)} in "
                                            f"{self.directory} (apps: "
                                            f"{', '.join(sorted(self.apps)) or 'none'})")
            return
        try:
            if name == "stop":
                self._command_stop(conn, names, bool(args.get("now")))
            elif name == "start":
                self._command_start(conn, names)
            elif name == "reload":
                result = self.reload_dir(names)
                started = result["started"] + result["restarted"]
                self.waiters.append(Waiter(conn, lambda: self._settled_names(started),
                                           lambda: (True, self._with_states(result), "")))
        except FcgiManagerError as exc:
            server.reply(conn, False, error=exc.message)

    def _with_states(self, result: Dict[str, Any]) -> Dict[str, Any]:
        result["apps"] = self.snapshot()["apps"]
        return result

    def _learn_new_files(self, names: Sequence[str]) -> None:
        """``start NAME`` and ``reload NAME`` of a file added since: the parent learns it
        (without touching the other new files)."""
        if all(n in self.apps for n in names):
            return
        files, errors = scan(self.directory)
        for f in files:
            if f.name in names and f.name not in self.apps:
                self.apps[f.name] = App(f)
        for e in errors:
            if e.name in names and e.name not in self.apps:
                self._refused(e)

    def _command_stop(self, conn: ControlConnection, names: List[str], now: bool) -> None:
        assert self.control is not None
        if not names:
            self.stop_all(now)
            self.control.reply(conn, True, {"pid": os.getpid(),
                                            "deadline_s": self.kill_at - time.monotonic()})
            return
        for n in names:
            self.stop_app(self.apps[n], now)
        self.waiters.append(Waiter(conn, lambda: all(self.apps[n].pid == 0 for n in names),
                                   lambda: (True, self.snapshot(), "")))

    def _command_start(self, conn: ControlConnection, names: List[str]) -> None:
        names = names or sorted(self.apps)
        for n in names:
            app = self.apps[n]
            if app.pid == 0:
                fresh = read_app(app.file.path) if app.file.digest else None
                if isinstance(fresh, FileError) or fresh is None:
                    if fresh is not None:
                        self._refused(fresh)
                    continue
                clash = [o.file.path for o in self.apps.values()
                         if o is not app and o.pid and set(o.file.claims) & set(fresh.claims)]
                if clash:
                    app.error = (f"{fresh.path}: claims what {', '.join(clash)} "
                                 "holds; not started")
                    app.change_state(AppState.FATAL)
                    continue
                app.file = fresh
                app.start()

        def result() -> Tuple[bool, Any, str]:
            bad = [f"{n}: {self.apps[n].state.shown}: {self.apps[n].error}" for n in names
                   if self.apps[n].state is not AppState.RUNNING]
            return (not bad, self.snapshot(), "; ".join(bad))
        self.waiters.append(Waiter(conn, lambda: self._settled_names(names), result))

    def _answer_waiters(self) -> None:
        if not self.waiters or self.control is None:
            return
        still = []
        for w in self.waiters:
            if w.conn.state == "closed":
                continue
            if w.done():
                ok, result, error = w.result()
                self.control.reply(w.conn, ok, result, error)
            else:
                still.append(w)
        self.waiters = still
