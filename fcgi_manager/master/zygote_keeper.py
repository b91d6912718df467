"""The master's zygote: the child that imports the app and forks the workers, when no
app code may run in the master (preload as root with manager.user, or preload in a master
re-executed by a reload)."""

from __future__ import annotations

import logging
import selectors
import time
from typing import Callable, Dict, List, Optional, Set

from ..rules import supervisor as sv
from ..rules.restarts import describe_exit
from . import kinship
from .children import MasterFds, WorkerSetup, close_quietly, start_zygote
from .context import MasterContext, max_requests, worker_uid
from .pipes import WorkerPipes
from .reload import ReloadCheck
from .zygote import FAILED, IMPORT_ERROR, READY, SPAWNED, Zygote, new_zygote_wanted

log = logging.getLogger("fcgi_manager.master")

UNCLAIMED_MAX = 64  # exits of unknown children remembered for a zygote report still due


class ZygoteKeeper:
    """The current generation's zygote, and the ones retired before it.

    A zygote answers turns later, may die, hang or lie about the worker it forked: this
    part asks it for workers, believes a reported pid only if the kernel agrees
    (``kinship.py``), replaces it when it fails (the slots it still owed a worker fail,
    and the supervisor retries), and reaps retired zygotes quietly.
    """

    def __init__(self, ctx: MasterContext, pipes: WorkerPipes, check: ReloadCheck,
                 app_given: bool, setup: Callable[[int], WorkerSetup],
                 child_fds: Callable[[], MasterFds],
                 worker_exited: Callable[[int, int], None]) -> None:
        self.ctx = ctx
        self.pipes = pipes
        self.check = check
        self.app_given = app_given
        self.setup = setup
        self.child_fds = child_fds
        self.worker_exited = worker_exited
        self.resumed = False  # this master was re-executed by a reload (set when prepared)
        self.zygote: Optional[Zygote] = None
        self.retired: Set[int] = set()  # killed or the previous image's: reaped quietly
        self.unclaimed: Dict[int, int] = {}  # pid -> status: children reaped before reported

    @property
    def pid(self) -> int:
        """The current zygote's pid, 0 if there is none."""
        return self.zygote.pid if self.zygote is not None else 0

    def fds(self) -> List[int]:
        return [self.zygote.sock.fileno()] if self.zygote is not None else []

    def wanted(self) -> bool:
        """Preload as root with manager.user (no app code as root), or preload in a master
        re-executed by a reload (its loop must not wait for an import: the next
        generation's zygote imports while the loop goes on)."""
        cfg = self.ctx.cfg
        if new_zygote_wanted(cfg.app.preload, self.app_given, self.ctx.user):
            return True
        return cfg.app.preload and not self.app_given and self.resumed

    def start(self, generation: int) -> Zygote:
        """Fork the zygote of ``generation``; it imports while the loop goes on."""
        zygote = start_zygote(self.setup(generation), self.child_fds(), sv.READY_TIMEOUT)
        self.zygote = zygote
        self.ctx.selector.register(zygote.sock, selectors.EVENT_READ, ("zygote", zygote))
        log.info("importing the app in pid %d as %s (workers are forked from it)",
                 zygote.pid, self.ctx.cfg.manager.user or "the master's user")
        return zygote

    def fork(self, slot: int, generation: int) -> None:
        """Ask the generation's zygote for a worker, starting one if there is none (it
        died, was replaced, or is of an older generation)."""
        zygote = self.zygote
        if zygote is not None and (not zygote.alive or zygote.generation != generation):
            self.gone(zygote, "replaced" if zygote.alive else "gone")
            zygote = None
        if zygote is None:
            zygote = self.start(generation)
        zygote.request(slot, max_requests(self.ctx.cfg.workers))
        if not zygote.alive:
            self.gone(zygote, "it stopped answering")

    def on_readable(self, zygote: Zygote) -> None:
        """What the zygote said: ready, its import failed, a worker forked, or not."""
        for event in zygote.on_readable():
            if event[0] == READY:
                log.info("the app is imported in pid %d", zygote.pid)
            elif event[0] == IMPORT_ERROR:
                log.error("importing the app in pid %d failed: %s", zygote.pid,
                          event[1].message)
            elif event[0] == SPAWNED:
                self._spawned(zygote, *event[1:])
            elif event[0] == FAILED:
                self.ctx.board.clear(event[1])
                self.ctx.feed(sv.SpawnFailed(event[1], str(event[2]), time.monotonic()))
        if not zygote.alive:
            self.gone(zygote, "it exited")

    def _spawned(self, zygote: Zygote, slot: int, pid: int, out_fd: int,
                 notify_fd: int) -> None:
        """The zygote says ``pid`` is the worker for ``slot``: believed only if the kernel
        agrees (kinship.py). Otherwise the zygote runs code that lies: it is replaced."""
        expected = worker_uid(self.ctx.user)
        known = set(self.pipes.io) | self.retired | {zygote.pid}
        check_pid = self.check.pid
        if check_pid is not None:
            known.add(check_pid)
        status = self.unclaimed.pop(pid, None)
        why = (f"pid {pid} is already one of the master's processes" if pid in known
               else None if status is not None else kinship.why_not_our_child(pid, expected))
        if why is not None:
            close_quietly(out_fd)
            close_quietly(notify_fd)
            log.error("the zygote (pid %d) reported pid %d as a new worker, but %s: "
                      "ignored, and the zygote is replaced", zygote.pid, pid, why)
            self.ctx.board.clear(slot)
            self.ctx.feed(sv.SpawnFailed(slot, f"the zygote reported a process that is not "
                                               f"its worker ({why})", time.monotonic()))
            self.gone(zygote, "it reported a process that is not its worker")
            return
        self.ctx.feed(self.pipes.spawned(slot, pid, out_fd, notify_fd))
        if status is not None:  # it died before we heard of it: reaped already
            self.worker_exited(pid, status)

    def gone(self, zygote: Zygote, why: str, reaped: bool = False) -> None:
        """Kill a zygote that died, hung, lied or is of an older generation, without
        waiting; the slots it still owed a worker fail (the supervisor retries)."""
        try:
            self.ctx.selector.unregister(zygote.sock)
        except (KeyError, ValueError, OSError):
            pass
        pending = zygote.pending_slots() if zygote.alive or zygote.asked or zygote.queued \
            else []
        zygote.kill()
        zygote.asked, zygote.queued = [], []
        if not reaped:
            self.retired.add(zygote.pid)
        if self.zygote is zygote:
            self.zygote = None
        if pending:
            log.warning("the app's zygote (pid %d) is replaced: %s", zygote.pid, why)
        for slot in pending:
            self.ctx.board.clear(slot)
            self.ctx.feed(sv.SpawnFailed(slot, f"the app's zygote {why}", time.monotonic()))

    def retire_current(self, why: str) -> None:
        if self.zygote is not None:
            self.gone(self.zygote, why)

    def check_expiry(self, now: float) -> None:
        if self.zygote is not None and self.zygote.expired(now):
            self.gone(self.zygote, "did not answer in time (stopped or hung)")

    def reaped(self, pid: int, status: int) -> bool:
        """Whether ``pid``, just reaped, was a zygote (a retired one, or the current)."""
        if pid in self.retired:
            self.retired.discard(pid)
            log.debug("a former zygote (pid %d) %s", pid, describe_exit(status))
            return True
        if self.zygote is not None and pid == self.zygote.pid:
            log.warning("the app's zygote (pid %d) %s; a new one imports the app when a "
                        "worker must start", pid, describe_exit(status))
            self.gone(self.zygote, describe_exit(status), reaped=True)
            return True
        return False

    def unknown_exit(self, pid: int, status: int) -> None:
        """A child that is no watched worker exited: maybe a worker the zygote has not
        reported yet; remember how it ended."""
        if self.zygote is not None and self.zygote.asked:
            self.unclaimed[pid] = status
            while len(self.unclaimed) > UNCLAIMED_MAX:
                del self.unclaimed[next(iter(self.unclaimed))]

    def stop(self) -> None:
        if self.zygote is not None:
            self.zygote.stop()
            self.zygote = None
