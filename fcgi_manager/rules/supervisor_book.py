"""The supervisor's shared state, and the moves every part of it makes on that state.

``Supervisor`` (``supervisor.py``) hands each event to the part whose rules it concerns:
the reload (``supervisor_reload``), the workers' health (``supervisor_health``), the pool's
size (``supervisor_pool``), the stop (``supervisor_stop``). Each part holds the one
:class:`Book` -- the worker table, the phase, the generation and its target, the totals,
the reload in progress, the actions emitted so far -- rather than the supervisor or one
another, so that none reads another's state, and the moves several of them make (a
checked state or phase change, a worker asked to stop, the missing workers spawned) are
written once, here. Pure, as the rest of the supervisor: it only records and emits.
"""

from __future__ import annotations

import enum
import logging
import signal
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

from ..wire.states import WorkerState, can_change
from .restarts import RestartTracker
from .supervisor_actions import Action, Log, MarkStopping, Signal, Spawn

STACK_GRACE = 1.0  # seconds between the stack-dump signal and SIGKILL for a hung request
KILL_RETRY = 5.0  # a worker SIGKILLed but not reaped yet is killed again after this
READY_TIMEOUT = 120.0  # for the reload's check and for a new generation to be ready
TOTAL_KEYS = ("accepted_dead", "respawns", "crashes", "timeouts", "slow", "recycled",
              "shed_dead", "max_children_reached", "max_active", "spawn_failures",
              "accept_backoffs_dead", "log_lines_lost_dead", "stuck")


class Phase(str, enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RELOADING = "reloading"
    DRAINING = "draining"
    STOPPING = "stopping"

    def __str__(self) -> str:
        return self.value


PHASES_ALLOWED = {
    # every worker ready; stop or a failed start; the image a reload re-executed resumes it
    Phase.STARTING: {Phase.RUNNING, Phase.STOPPING, Phase.RELOADING},
    Phase.RUNNING: {Phase.RELOADING, Phase.DRAINING, Phase.STOPPING},
    Phase.RELOADING: {Phase.RUNNING, Phase.DRAINING, Phase.STOPPING},  # done/refused/failed
    Phase.DRAINING: {Phase.STOPPING},  # the delay is over, or stop now
    Phase.STOPPING: set(),  # only the exit ends it
}


class IllegalTransition(AssertionError):
    """A state or phase change the tables forbid: a bug in the supervisor."""


class SlotView(NamedTuple):
    """What a worker's scoreboard slot shows at a tick."""

    busy: bool
    busy_since: float = 0.0
    requests: int = 0
    what: str = ""  # "METHOD URI" of the request running (the oldest, with threads)
    slow_dumped: int = 0
    threads: int = 1
    in_flight: int = 0  # requests running now (0 or 1 without threads)
    heartbeat: float = 0.0  # written by the worker's loop when it wakes up idle


class WorkerRecord:
    """The supervisor's view of one worker process (the process itself runs
    ``worker.Worker``)."""

    __slots__ = ("slot", "pid", "generation", "started", "state", "stop_reason", "kill_at",
                 "boot_error", "requests", "idle_since", "rss", "wid", "beat", "alive_at")

    def __init__(self, slot: int, pid: int, generation: int, started: float,
                 state: WorkerState = WorkerState.STARTING, wid: int = 0) -> None:
        self.slot = slot
        self.wid = wid or slot + 1
        self.beat = 0.0  # the heartbeat last seen in its slot
        self.alive_at = started  # when the master last saw it change
        self.pid = pid
        self.generation = generation
        self.started = started
        self.state = state
        self.stop_reason: Optional[str] = None
        self.kill_at = 0.0
        self.boot_error = ""
        self.requests = 0
        self.idle_since = started
        self.rss = 0

    @property
    def id(self) -> int:
        """Stable across replacement: a replacement takes its predecessor's id (its slot
        differs while the predecessor finishes), so per-worker series continue."""
        return self.wid

    @property
    def ready(self) -> bool:
        return self.state in (WorkerState.IDLE, WorkerState.BUSY)

    def name(self) -> str:
        return f"worker {self.id} (pid {self.pid})"


@dataclass
class Reload:
    """A reload in progress (the phase is RELOADING exactly while there is one)."""

    deadline: float
    waiters: List[Any]
    validating: bool = False
    old_generation: int = 0


class Book:
    """What every part of the supervisor reads and changes; see the module docstring.

    Only :meth:`set_state` changes a worker's state and only :meth:`set_phase` the phase:
    both check the tables (``states.ALLOWED``, :data:`PHASES_ALLOWED`) and log the move.
    """

    def __init__(self, workers_cfg: Any, *, max_slots: int, generation: int,
                 strict: bool) -> None:
        self.cfg = workers_cfg
        self.max_slots = max_slots
        self.strict = strict
        self.phase = Phase.STARTING
        self.generation = generation
        self.workers: Dict[int, WorkerRecord] = {}
        self.pending: Dict[int, Tuple[int, bool]] = {}  # slot -> (generation, is respawn)
        self.pending_ids: Dict[int, int] = {}  # slot -> the worker id it will show
        self.target: int = workers_cfg.effective_count if workers_cfg.mode != "ondemand" else 0
        self.totals = {k: 0 for k in TOTAL_KEYS}
        self.queue = -1
        self.restarts = RestartTracker()
        self.pending_respawns = 0
        self.reload: Optional[Reload] = None
        self.slots: Mapping[int, SlotView] = {}
        self._out: List[Action] = []

    # -- the actions out -------------------------------------------------------------------

    def emit(self, action: Action) -> None:
        self._out.append(action)

    def log(self, level: int, message: str) -> None:
        self._out.append(Log(level, message))

    def take(self) -> List[Action]:
        """The actions emitted since the last call, in order."""
        out, self._out = self._out, []
        return out

    # -- the tables ------------------------------------------------------------------------

    def set_phase(self, new: Phase, reason: str) -> None:
        old = self.phase
        if old is new:
            return
        if new not in PHASES_ALLOWED[old]:
            self.illegal(f"master phase {old} -> {new} ({reason})")
            return
        self.phase = new
        self.log(logging.DEBUG, f"master: {old} -> {new} ({reason})")

    def set_state(self, w: WorkerRecord, new: WorkerState, reason: str,
                  quiet: bool = False) -> None:
        old = w.state
        if old is new:
            return
        if not can_change(old, new):
            self.illegal(f"{w.name()}: {old} -> {new} ({reason})")
            return
        w.state = new
        if not quiet:
            self.log(logging.DEBUG, f"{w.name()}: {old} -> {new} ({reason})")

    def illegal(self, what: str) -> None:
        if self.strict:
            raise IllegalTransition(what)
        self.log(logging.ERROR, f"bug: illegal transition {what}, ignored")

    # -- the current generation ------------------------------------------------------------

    def current(self) -> List[WorkerRecord]:
        """Workers of the current generation that are not on their way out."""
        return [w for w in self.workers.values()
                if w.generation == self.generation and w.stop_reason is None]

    def current_count(self) -> int:
        pending = sum(1 for gen, _ in self.pending.values() if gen == self.generation)
        return len(self.current()) + pending

    def all_ready(self) -> bool:
        """The current generation has as many ready workers as its target."""
        return sum(1 for w in self.current() if w.ready) >= self.target

    # -- stopping workers ------------------------------------------------------------------

    def stop_worker(self, w: WorkerRecord, reason: str, sig: int, grace: float,
                    now: float) -> None:
        if w.stop_reason is not None and sig not in (signal.SIGKILL, signal.SIGINT):
            return
        if w.stop_reason is None:
            w.stop_reason = reason
        if w.state is not WorkerState.STOPPING:
            self.set_state(w, WorkerState.STOPPING, reason)
            self.emit(MarkStopping(w.slot))
        self.emit(Signal(w.pid, sig))
        deadline = now + grace
        if not w.kill_at or deadline < w.kill_at:
            w.kill_at = deadline

    # -- spawning --------------------------------------------------------------------------

    def spawn_missing(self, now: float) -> None:
        """Spawn the workers the current generation lacks, as far as the restart backoff,
        the free slots and the processes still finishing allow."""
        if self.phase is Phase.STOPPING or not self.restarts.may_start(now):
            return
        self.restarts.next_start_at = 0.0
        missing = self.target - self.current_count()
        if self.restarts.backing_off:
            missing = min(missing, 1)  # one at a time while backing off
        # Workers of this generation still finishing after they left (recycled, timed
        # out, stuck) keep their process: at most ``target`` of them beside the ``target``
        # serving ones, so that workers that all recycle at once (and whose replacements
        # recycle too) never make a spawn loop. Past that, a replacement waits for an exit.
        missing = min(missing, self._room_for_processes())
        for _ in range(max(0, missing)):
            slot = self._free_slot()
            if slot is None:
                self.log(logging.ERROR, f"no free worker slot ({self.max_slots} workers at "
                                        "most): lower workers.count or max_workers")
                break
            respawn = self.pending_respawns > 0
            if respawn:
                self.pending_respawns -= 1
            self.pending[slot] = (self.generation, respawn)
            self.pending_ids[slot] = wid = self._free_id()
            self.emit(Spawn(slot, self.generation, wid))
        if self.restarts.backing_off and self.target > self.current_count():
            self.backoff(now)

    def backoff(self, now: float) -> None:
        delay = self.restarts.delay_from(now)
        if delay:
            self.log(logging.WARNING, f"workers are failing quickly "
                                      f"({self.restarts.failures} in a row): waiting "
                                      f"{delay:.1f} s before the next start")

    def _free_slot(self) -> Optional[int]:
        used = {w.slot for w in self.workers.values()} | set(self.pending)
        for slot in range(self.max_slots):
            if slot not in used:
                return slot
        return None

    def _free_id(self) -> int:
        """The lowest id no serving worker of this generation has: the id of the worker
        being replaced, whatever the reason it left."""
        used = {w.wid for w in self.current()}
        used.update(wid for slot, wid in self.pending_ids.items()
                    if self.pending.get(slot, (0,))[0] == self.generation)
        wid = 1
        while wid in used:
            wid += 1
        return wid

    def _room_for_processes(self) -> int:
        alive = sum(1 for w in self.workers.values() if w.generation == self.generation)
        pending = sum(1 for gen, _ in self.pending.values() if gen == self.generation)
        return 2 * max(self.target, 1) - alive - pending
