"""The master's commands (from the control socket and from signals) and the status the
scoreboard's header shows."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, Optional

from .. import accesslog
from .. import status as status_mod
from ..config import Config
from ..errors import FcgiManagerError
from ..privileges import RunAs
from ..rules import supervisor as sv
from ..wire.codes import WAKE_SIGNAL
from .context import MasterContext
from .control_server import ControlConnection
from .pipes import WorkerPipes

log = logging.getLogger("fcgi_manager.master")


def open_access_log(cfg: Config, user: RunAs) -> None:
    try:
        accesslog.prepare_master(cfg, user.uid, user.gid)
    except OSError as exc:
        raise FcgiManagerError(f"cannot open the access log {cfg.manager.access_log}: "
                               f"{exc.strerror}", "check manager.access_log and its "
                               "directory's permissions") from None


class Commands:
    """What a command does: ``status`` and ``ping`` are answered here from the scoreboard,
    ``reopen-logs`` reopens the master's files and has the workers follow, and ``stop``,
    ``scale`` and ``reload`` go to the supervisor, which replies when it is done.

    The scoreboard's header (what status shows of the master) is written here too: after
    every command, on every tick, and before a reload's exec.
    """

    def __init__(self, ctx: MasterContext, pipes: WorkerPipes) -> None:
        self.ctx = ctx
        self.pipes = pipes

    def run(self, name: str, args: Dict[str, Any],
            client: Optional[ControlConnection]) -> Optional[Dict[str, Any]]:
        """Run one command; returns the reply, or None when the supervisor replies."""
        if name in ("status", "ping"):
            self.pipes.sample(time.monotonic())
            self.write_header()
            return status_mod.snapshot(self.ctx.cfg, self.ctx.board)
        if name == "reopen-logs":
            return self._reopen_logs()
        if name in ("stop", "scale", "reload"):
            self.ctx.feed(sv.Command(name, args, client, time.monotonic()))
            self.write_header()
            return None
        raise FcgiManagerError(f"unknown command {name!r}")

    def _reopen_logs(self) -> Dict[str, Any]:
        cfg = self.ctx.cfg
        error = self.ctx.log_handler.reopen()
        if error:
            log.error("reopen-logs: %s; logging goes on to the old file", error)
            raise FcgiManagerError(f"{error} (logging goes on to the old file, if any)")
        log.info("reopened the log file %s", cfg.manager.log)
        if cfg.manager.access_log:
            open_access_log(cfg, self.ctx.user)
        if cfg.manager.access_log or cfg.manager.log not in ("", "-"):
            # Workers write both files themselves (a log file: outpipe.FileLineWriter).
            self.ctx.board.bump_log_epoch()
            # Busy workers reopen at their next write; idle ones now (the signal only
            # wakes their loop), so a rotated file is not held open by a quiet worker.
            # Only ready ones: a worker still starting has no handler for it yet.
            for w in self.ctx.sup.workers.values():
                if w.ready:
                    try:
                        os.kill(w.pid, WAKE_SIGNAL)
                    except ProcessLookupError:
                        pass
        return {"reopened": cfg.manager.log}

    def write_header(self) -> None:
        board, sup = self.ctx.board, self.ctx.sup
        if board.slots == 0:
            return
        wait = sup.next_start_at - time.monotonic() if sup.next_start_at else 0.0
        log_handler = self.ctx.log_handler
        board.write_header({
            "master_pid": os.getpid(), "generation": sup.generation,
            "started_at": self.ctx.started_at, "queue": sup.queue,
            "max_queue": sup.max_queue, "target": sup.target,
            "backoff_ms": int(max(0.0, wait) * 1000), **sup.totals,
            "master_log_lost": getattr(log_handler, "lost_total", 0),
            "master_log_errno": getattr(log_handler, "errno", 0),
        })
