"""The supervisor's actions, carried out: fork, signal, mark the scoreboard, reply, check
and re-exec for a reload, tell systemd, close the listener, end the loop."""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional, Protocol

from ..errors import FcgiManagerError
from ..rules import supervisor as sv
from .channels import HandoffChannels
from .children import MasterFds, WorkerSetup, fork_worker
from .context import MasterContext, max_requests
from .pipes import WorkerPipes
from .reload import ReloadCheck
from .zygote_keeper import ZygoteKeeper

log = logging.getLogger("fcgi_manager.master")


class Shell(Protocol):
    """What the executor asks of the master itself: its sockets, its loop, its image."""

    def setup(self, generation: int) -> WorkerSetup: ...

    def child_fds(self) -> MasterFds: ...

    def reexec(self) -> Optional[sv.ReExecFailed]: ...

    def close_listener(self) -> None: ...

    def watch_listener(self, on: bool) -> None: ...

    def end_loop(self) -> None: ...


class ActionExecutor:
    """Carries out each of the supervisor's actions with the master's parts.

    The supervisor only says what must happen; how (a fork here or by the zygote, a
    signal after shutting a channel, a reply on the control socket) is this part's: the
    loop only feeds events, and each of the other parts keeps to its own resources.
    """

    def __init__(self, ctx: MasterContext, shell: Shell, pipes: WorkerPipes,
                 channels: HandoffChannels, zygotes: ZygoteKeeper,
                 check: ReloadCheck) -> None:
        self.ctx = ctx
        self.shell = shell
        self.pipes = pipes
        self.channels = channels
        self.zygotes = zygotes
        self.check = check
        # `start` hears whether the pool came up (it writes the pidfile): called once.
        self.ready_callback: Optional[Callable[[bool, str], None]] = None

    def perform(self, action: sv.Action) -> Optional[sv.Event]:
        """Carry out one action; an event to feed back, if it has one."""
        board = self.ctx.board
        if isinstance(action, sv.Log):
            log.log(action.level, "%s", action.message)
        elif isinstance(action, sv.Spawn):
            return self._spawn(action.slot, action.generation, action.worker_id)
        elif isinstance(action, sv.Signal):
            self._signal(action.pid, action.sig)
        elif isinstance(action, sv.MarkStopping):
            board.mark_stopping(action.slot)
        elif isinstance(action, sv.MarkStuck):
            board.mark_stuck(action.slot)
        elif isinstance(action, sv.MarkSlowDumped):
            board.mark_slow_dumped(action.slot, action.request_no)
        elif isinstance(action, sv.Reply):
            self._reply(action)
        elif isinstance(action, sv.Validate):
            self.check.start()
        elif isinstance(action, sv.CancelValidation):
            self.check.cancel()
        elif isinstance(action, sv.ReExec):
            return self.shell.reexec()
        elif isinstance(action, sv.NotifySystemd):
            self._notify_systemd(action.message)
        elif isinstance(action, sv.ReportReady):
            self._report_ready(action.ok, action.text)
        elif isinstance(action, sv.CloseListener):
            self.shell.close_listener()
            self.channels.shut_all()
            # A full stop: no worker is wanted any more.
            self.zygotes.retire_current("is not needed: the master stops")
        elif isinstance(action, sv.SetDraining):
            board.set_draining(True)
        elif isinstance(action, sv.WatchListener):
            self.shell.watch_listener(action.on)
        elif isinstance(action, sv.Exit):
            self.shell.end_loop()
        else:
            raise TypeError(f"unknown supervisor action {action!r}")
        return None

    def _reply(self, reply: sv.Reply) -> None:
        if reply.client is None:  # the command came from a signal: the log is the answer
            if not reply.ok:
                log.error("%s", reply.error)
        elif self.ctx.control is not None:
            self.ctx.control.reply(reply.client, reply.ok, reply.result, reply.error)

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

    def _signal(self, pid: int, sig: int) -> None:
        """Signal a worker (accepted as our own child: kinship.py), its generation's
        channel shut first if that generation is being stopped."""
        self.channels.before_signal(pid, sig)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _spawn(self, slot: int, generation: int, worker_id: int = 0) -> Optional[sv.Event]:
        board, cfg = self.ctx.board, self.ctx.cfg
        # Pid -1 until the worker is known: the slot is taken (its thread entries too) but
        # status shows no worker in it; a zygote's answer may come turns later.
        board.assign(slot, -1, generation, worker_id)
        if cfg.workers.threads > 1:
            board.reserve_threads(slot, cfg.workers.threads)
        try:
            if self.zygotes.wanted():
                self.zygotes.fork(slot, generation)
                return None  # its answer comes through the selector (ZygoteKeeper)
            pid, out_fd, notify_fd = fork_worker(self.shell.setup(generation), slot,
                                                 max_requests(cfg.workers),
                                                 self.shell.child_fds())
        except (OSError, FcgiManagerError) as exc:
            board.clear(slot)
            text = exc.message if isinstance(exc, FcgiManagerError) else str(exc)
            return sv.SpawnFailed(slot, text, time.monotonic())
        return self.pipes.spawned(slot, pid, out_fd, notify_fd)
