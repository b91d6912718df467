"""The master's side of a reload: the check process that loads the new config and code
before anything changes, and the re-exec into a fresh image that resumes the pool
(``resume.py``)."""

from __future__ import annotations

import logging
import os
import selectors
import signal
import sys
import time
from typing import Callable, Dict, List, Optional, Set

from .. import fdutil, logs
from ..config import Config
from ..rules import supervisor as sv
from ..rules.restarts import describe_exit
from . import daemon, execsig
from .children import HANDLED_SIGNALS, MasterFds, close_quietly, fork_validation
from .context import MasterContext
from .pipes import unwatch_fd
from .resume import ResumeState
from .signals import SignalQueue

log = logging.getLogger("fcgi_manager.master")


class Validation:
    """The reload's check process while it runs: its pipe's text and, once reaped, status."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd
        self.chunks: List[bytes] = []
        self.status: Optional[int] = None


class ReloadCheck:
    """The reload's check, run in a child so that the loop never waits for it.

    Its verdict (``ValidationDone``) needs both the pipe's EOF, read through the selector,
    and the process's exit status, reaped by the loop: either may come first. A check the
    supervisor cancels is killed and reaped later without a word.
    """

    def __init__(self, ctx: MasterContext, child_fds: Callable[[], MasterFds],
                 settings_env: Dict[str, str]) -> None:
        self.ctx = ctx
        self.child_fds = child_fds
        # The settings' variables as the master found them: app.clear_env empties its
        # environment, and every re-read of the config must see the same settings.
        self.settings_env = settings_env
        self.base_modules: frozenset = frozenset(sys.modules)  # set again once prepared
        self.validation: Optional[Validation] = None
        self.cancelled: Set[int] = set()

    @property
    def pid(self) -> Optional[int]:
        return self.validation.pid if self.validation is not None else None

    def fds(self) -> List[int]:
        return [self.validation.fd] if self.validation is not None else []

    def start(self) -> None:
        self.validation = None
        pid, fd = fork_validation(self.load_config, self.base_modules, self.child_fds())
        self.validation = Validation(pid, fd)
        self.ctx.selector.register(fd, selectors.EVENT_READ, ("validation", None))

    def load_config(self) -> Config:
        from .. import config as config_mod

        cfg = self.ctx.cfg
        if cfg.source:
            return config_mod.load(cfg.source, environ=self.settings_env)
        return cfg

    def read(self) -> None:
        v = self.validation
        if v is None or v.fd < 0:
            return
        data = fdutil.read_pipe(v.fd, final=False)
        if data is None:
            return
        if data:
            v.chunks.append(data)
            return
        unwatch_fd(self.ctx.selector, v.fd)
        v.fd = -1
        self._done()

    def reaped(self, pid: int, status: int) -> bool:
        """Whether ``pid``, just reaped, was a check process (this one's or a cancelled)."""
        if self.validation is not None and pid == self.validation.pid:
            self.validation.status = status
            self._done()
            return True
        if pid in self.cancelled:
            self.cancelled.discard(pid)
            return True
        return False

    def _done(self) -> None:
        """Once the check's pipe is at EOF and its process reaped: the verdict."""
        v = self.validation
        if v is None or v.fd >= 0 or v.status is None:
            return
        self.validation = None
        text = b"".join(v.chunks).decode("utf-8", "replace")
        ok = os.WIFEXITED(v.status) and os.WEXITSTATUS(v.status) == 0
        self.ctx.feed(sv.ValidationDone(ok, "" if ok else text or
                                        f"the check process {describe_exit(v.status)}",
                                        time.monotonic()))

    def cancel(self) -> None:
        v, self.validation = self.validation, None
        if v is None:
            return
        try:
            os.kill(v.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.cancelled.add(v.pid)  # reaped later, without a word
        unwatch_fd(self.ctx.selector, v.fd)


def reexec(state: ResumeState, exec_env: Dict[str, str], source: str, pidfile_fd: int,
           signals: SignalQueue, log_handler: logs.ReopenableHandler
           ) -> Optional[sv.ReExecFailed]:
    """Replace this process's image (same pid) with a fresh one that resumes the pool
    from ``state``; returns only if that fails (with the event saying so)."""
    # The environment the master was started with, not the app's (app.clear_env
    # would drop PYTHONPATH or FCGI_WEB_SERVER_ADDRS): the new image applies app.env
    # and clear_env of the new config itself.
    env = dict(exec_env)
    daemon.carry_pidfile_fd(pidfile_fd, env)
    # The command line may name the config relative to a directory we left.
    state_fd = state.to_environment(env, source)
    for fd in state.descriptors() + [state_fd]:
        os.set_inheritable(fd, True)
    argv = list(getattr(sys, "orig_argv", []) or []) or \
        [sys.executable, "-m", "fcgi_manager", *sys.argv[1:]]
    log.info("reload: re-executing the master with fresh code (pid %d stays)", os.getpid())
    log_handler.flush()
    signal.set_wakeup_fd(-1)
    execsig.hold(HANDLED_SIGNALS, signals.pending)
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError as exc:
        execsig.release(HANDLED_SIGNALS)
        signal.set_wakeup_fd(signals.wakeup_w, warn_on_full_buffer=False)
        close_quietly(state_fd)
        return sv.ReExecFailed(f"{sys.executable}: {exc}", time.monotonic())
    return None  # pragma: no cover - execve does not return
