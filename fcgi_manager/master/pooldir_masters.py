"""The pool parent's masters as processes: each one forked and executed, its output copied
to the parent's log, its ``sd_notify`` datagrams read, its exit reaped and judged.

:mod:`pooldir` decides which apps should run (its loop, a reload, a command); this module
is what that means for processes. How an exit is judged (restart, backoff, ``fatal``) is
:class:`~fcgi_manager.rules.pooldir.App`'s.
"""

from __future__ import annotations

import collections
import os
import re
import secrets
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any, Deque, Dict, List, Optional, Protocol, Sequence

from .. import config as config_mod
from .. import fdutil
from ..rules.pooldir import App, AppState
from ..rules.restarts import describe_exit
from . import daemon, procctl

# The parent's signals: a master starts with them back at their defaults.
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD,
                   signal.SIGUSR2)
TAIL_LINES = 40
# The environment a master must not inherit from the parent: what belongs to the
# parent's own start (systemd's sockets, a reload's hand-over) or names another config.
CHILD_ENV_DROP = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC",
                  "WATCHDOG_PID", "FCGI_MANAGER_CONFIG", daemon.PIDFILE_FD_ENV)


class Say(Protocol):
    """The parent's log (``PoolParent.say``): one stamped line, ``[who] text``. The
    parts are given it, so that the pool's log is written in one place."""

    def __call__(self, text: str, who: str = "pool") -> None: ...


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


class Output:
    """One master's stdout and stderr: partial line, and the last lines said."""

    __slots__ = ("fd", "name", "buf", "tail")

    def __init__(self, fd: int, name: str, tail: Deque[str]) -> None:
        self.fd = fd
        self.name = name
        self.buf = b""
        self.tail = tail  # the app's, kept after the pipe is closed


class Masters:
    """Every master of the pool as a child process, and what the parent hears from them.

    It exists so that the parent's loop, its reloads and its commands deal in apps
    (:class:`~fcgi_manager.rules.pooldir.App`: wanted, stopped, due) while one place knows the
    processes behind them: the fork and exec, the output pipes and each app's last lines,
    the notify socket and whose datagram is whose, the pids to reap and to signal.

    ``apps`` is the pool's own table, shared: this class looks apps up in it and changes
    them only through their methods; it never adds or removes one.
    """

    def __init__(self, apps: Dict[str, App], selector: selectors.BaseSelector,
                 say: Say) -> None:
        self.apps = apps
        self.selector = selector
        self.say = say
        self.notify_name = f"fcgi-manager-pool/{os.getpid()}/{secrets.token_hex(8)}"
        self.notify_sock: Optional[socket.socket] = None
        self.outputs: Dict[int, Output] = {}  # read fd -> output
        self.by_pid: Dict[int, str] = {}
        self.tails: Dict[str, Deque[str]] = {}  # app -> its master's last lines

    # -- the notify socket, and what crosses a re-exec --------------------------------

    def bind_notify(self) -> None:
        """The datagram socket every master gets as its ``NOTIFY_SOCKET``."""
        self.notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.notify_sock.bind("\0" + self.notify_name)
        self.notify_sock.setblocking(False)
        self.selector.register(self.notify_sock, selectors.EVENT_READ, ("notify", None))

    def adopt_notify(self, fd: int, name: str) -> None:
        """The notify socket the parent's previous image bound (see ``PoolParent.reexec``)."""
        self.notify_name = name
        self.notify_sock = socket.socket(fileno=fd)
        self.notify_sock.setblocking(False)
        self.selector.register(self.notify_sock, selectors.EVENT_READ, ("notify", None))

    def adopt_running(self) -> None:
        """Know the pids of the apps the previous image handed over."""
        for app in self.apps.values():
            if app.pid:
                self.by_pid[app.pid] = app.file.name

    def adopt_outputs(self, items: Sequence[Dict[str, Any]]) -> List[int]:
        """The output pipes the previous image handed over; returns their descriptors."""
        fds = []
        for item in items:
            fd, name = int(item["fd"]), item["name"]
            tail = self.tails.setdefault(name, collections.deque(maxlen=TAIL_LINES))
            out = Output(fd, name, tail)
            self.outputs[fd] = out
            self.selector.register(fd, selectors.EVENT_READ, ("out", out))
            fds.append(fd)
        return fds

    def handover(self) -> List[Dict[str, Any]]:
        """The output pipes, as the next image adopts them (:meth:`adopt_outputs`)."""
        return [{"fd": fd, "name": out.name} for fd, out in self.outputs.items()]

    def flush(self) -> None:
        """Log every partial line now (before an exec)."""
        for out in list(self.outputs.values()):
            if out.buf:
                self._line(out, out.buf)
                out.buf = b""

    # -- starting -----------------------------------------------------------------------

    def _child_env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in CHILD_ENV_DROP and not k.startswith("FCGI_MANAGER_RESUME")}
        env["NOTIFY_SOCKET"] = "@" + self.notify_name
        return env

    def start_due(self, now: float) -> None:
        """Start every app whose master should run now and does not."""
        for app in self.apps.values():
            if app.due(now):
                self.spawn(app, now)

    def spawn(self, app: App, now: float) -> None:
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

    # -- what they say --------------------------------------------------------------------

    def read_output(self, out: Output) -> None:
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

    def read_notify(self) -> None:
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

    # -- ending ---------------------------------------------------------------------------

    def reap(self) -> None:
        for pid, status in procctl.exited_children():
            name = self.by_pid.pop(pid, None)
            app = self.apps.get(name or "")
            if app is None or app.pid != pid:
                continue
            for out in list(self.outputs.values()):
                if out.name == name:
                    self.read_output(out)  # what it said last, before judging
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

    def signal_app(self, app: App, sig: int) -> None:
        if app.pid:
            try:
                os.kill(app.pid, sig)  # our own child, not yet reaped: it is that master
            except ProcessLookupError:
                pass

    def stop(self, app: App, now: bool = False) -> None:
        """One app stopped on purpose: gracefully (``TERM``), or at once (``INT``)."""
        if app.pid:
            self.say(f"{app.file.name}: stopping" + (" now" if now else " gracefully"))
        app.stop()
        self.signal_app(app, signal.SIGINT if now else signal.SIGTERM)

    def kill_remaining(self) -> None:
        for app in self.apps.values():
            if app.pid:
                self.say(f"{app.file.name}: master (pid {app.pid}) did not stop in time: "
                         "killing it")
                self.signal_app(app, signal.SIGKILL)
