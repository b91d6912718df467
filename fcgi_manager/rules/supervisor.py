"""The supervisor: every rule of supervision, as a pure state machine.

Events in, actions out, the shape of ``protocol`` applied to the master (h11's
events-in/actions-out): :meth:`Supervisor.handle` takes one :data:`Event` -- a worker
spawned, ready, exited; a tick with what the scoreboard shows; memory samples; a command;
the reload check's verdict; the state a re-executed image resumes; a pidfile that could not
be written -- and returns the :data:`Action` s the shell (``master.py``) performs: spawn,
signal, mark a slot stopping, reply to a client, validate, re-exec, log, exit. Both are
unions of frozen dataclasses, and :data:`HANDLERS` maps each event type to its handler,
so the type checker sees every pairing. It never forks, reads, writes, sleeps or looks at
a clock; every time it knows came in an event, and the shell changes its state only
through events. So each rule is a unit test on a sequence of events
(tests/test_supervisor.py).

The master's phase (systemd's unit states, which operators already know)::

    STARTING --all workers ready--> RUNNING <--reload done / refused / failed--.
        |                              |                                         |
        |                              `--reload--> RELOADING -------------------'
        |                              |                |
        |                              `---> DRAINING <-'  graceful stop with
        |                                       |          manager.shutdown_delay
        `---------------+--------------+--------+-------+
                        v stop (or a start that failed, or the delay is over)
                     STOPPING --no worker left--> Exit(code)

DRAINING serves as RUNNING does while the ping path answers 503 ``draining`` (load
balancers take the instance out); then the graceful stop begins. A master still
STARTING is in no balancer yet: its stop skips the delay.

RELOADING has two steps: the new code and config are checked in a throwaway process
(the shell watches it like any other fd, so nothing waits), then the new generation
starts (in place, or in a re-executed master that resumes in RELOADING: the one
STARTING -> RELOADING move, made by :class:`Resumed` before anything else) and the old one
is asked to finish when all of it is ready.

Each worker's state (``states.WorkerState``) is the truth the decisions use; it changes
only in :meth:`Supervisor._set_state`, which checks ``states.ALLOWED`` and logs
``old -> new (reason)``. An illegal move is a bug: it raises when ``strict`` (the tests,
and a master run with ``FCGI_MANAGER_STRICT=1``), and is logged as one otherwise.
Workers write idle/busy into the scoreboard themselves; ticks carry what it shows.

Pids the supervisor never spawned (a reaped orphan when the master is PID 1, the
reload's check process) exit without effect: reaping is the shell's, meaning is ours.
"""

from __future__ import annotations

import enum
import logging
import signal
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Tuple,
    Type,
    TypeVar,
    Union,
)

from ..wire.codes import STACK_SIGNAL
from ..wire.states import WorkerState, can_change
from .pool import PoolSizer, PoolView, threaded_view
from .restarts import ExitKind, RestartTracker, classify, describe_exit, recycle_reason

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


# -- events -------------------------------------------------------------------------------

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


@dataclass(frozen=True)
class Started:
    now: float


@dataclass(frozen=True)
class Spawned:
    slot: int
    pid: int
    now: float


@dataclass(frozen=True)
class SpawnFailed:
    slot: int
    error: str
    now: float


@dataclass(frozen=True)
class WorkerReady:
    pid: int
    now: float


@dataclass(frozen=True)
class WorkerLeaving:
    """The worker stopped accepting on its own (``reason``: max_requests, max_memory) and
    finishes the requests it has: it is replaced now, not when it exits."""

    pid: int
    reason: str
    now: float


@dataclass(frozen=True)
class WorkerBootError:
    pid: int
    text: str


@dataclass(frozen=True)
class WorkerExited:
    pid: int
    status: int
    now: float
    requests: int = 0  # what its slot counted, read before the slot was cleared
    shed: int = 0
    backoffs: int = 0  # accept back-offs at the open-files limit
    lost: int = 0  # log lines it could not write (the master was not reading)


@dataclass(frozen=True)
class Tick:
    now: float
    slots: Mapping[int, SlotView] = field(default_factory=dict)  # by pid
    queue: int = -1  # listen queue now (-1 unknown)
    listener_waiting: bool = False  # ondemand: a connection waits on the listener


@dataclass(frozen=True)
class ListenerReadable:
    """ondemand: a connection waits and the master was watching the listener."""

    now: float
    slots: Mapping[int, SlotView] = field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    now: float
    rss: Mapping[int, int]  # bytes, by pid


@dataclass(frozen=True)
class Command:
    name: str  # stop, scale, reload
    args: Mapping[str, Any]
    client: Any  # whom to reply to (opaque), None for a signal
    now: float


@dataclass(frozen=True)
class ValidationDone:
    ok: bool
    text: str
    now: float


@dataclass(frozen=True)
class ReExecFailed:
    error: str
    now: float


@dataclass(frozen=True)
class AdoptedWorker:
    """A worker of the image that re-executed into this one, as its resume state says."""

    slot: int
    pid: int
    generation: int
    started: float
    ready: bool
    wid: int  # the id it shows
    stop_reason: Optional[str] = None  # asked to stop (or leaving) before the re-exec
    kill_at: float = 0.0


@dataclass(frozen=True)
class Resumed:
    """This master is the image a reload re-executed: before :class:`Started`, it adopts
    the old generation's workers, the totals so far and the clients waiting for the
    reload; its own generation is the next one, and the phase is RELOADING until it is
    ready (see ``resume.py`` for what the image hands on)."""

    workers: Tuple[AdoptedWorker, ...]
    old_generation: int
    waiters: Tuple[Any, ...]
    now: float
    totals: Mapping[str, int] = field(default_factory=dict)
    max_queue: int = -1
    scale: Mapping[str, Any] = field(default_factory=dict)  # Supervisor.scale_state()


@dataclass(frozen=True)
class PidfileFailed:
    """The master is ready but could not write its pidfile: it stops at once, exit 1 (a
    master nobody can find by its pidfile would be left running)."""

    error: str
    now: float


Event = Union[Started, Spawned, SpawnFailed, WorkerReady, WorkerLeaving, WorkerBootError,
              WorkerExited, Tick, ListenerReadable, Sample, Command, ValidationDone,
              ReExecFailed, Resumed, PidfileFailed]


# -- actions ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spawn:
    slot: int
    generation: int
    worker_id: int = 0  # the id it shows: its predecessor's (0: the slot's number + 1)


@dataclass(frozen=True)
class Signal:
    pid: int
    sig: int


@dataclass(frozen=True)
class MarkStopping:
    slot: int


@dataclass(frozen=True)
class MarkStuck:
    slot: int


@dataclass(frozen=True)
class MarkSlowDumped:
    slot: int
    request_no: int


@dataclass(frozen=True)
class Reply:
    client: Any
    ok: bool
    result: Any = None
    error: str = ""


@dataclass(frozen=True)
class Validate:
    """Check the new config and code in a throwaway process; answer with ValidationDone."""


@dataclass(frozen=True)
class CancelValidation:
    pass


@dataclass(frozen=True)
class ReExec:
    """Replace the master's image with fresh code (it resumes from ``resume_workers``)."""


@dataclass(frozen=True)
class NotifySystemd:
    message: str


@dataclass(frozen=True)
class ReportReady:
    """The end of the start: tell whoever waits for it (the start handshake, systemd)."""

    ok: bool
    text: str = ""


@dataclass(frozen=True)
class CloseListener:
    pass


@dataclass(frozen=True)
class SetDraining:
    """Flag the scoreboard: the workers' ping path answers 503 ``draining``."""


@dataclass(frozen=True)
class WatchListener:
    on: bool


@dataclass(frozen=True)
class Log:
    level: int
    message: str


@dataclass(frozen=True)
class Exit:
    code: int


Action = Union[Spawn, Signal, MarkStopping, MarkStuck, MarkSlowDumped, Reply, Validate,
               CancelValidation, ReExec, NotifySystemd, ReportReady, CloseListener,
               SetDraining, WatchListener, Log, Exit]


# -- the worker table ---------------------------------------------------------------------

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


# -- the supervisor -----------------------------------------------------------------------

class Supervisor:
    """The worker table, the phase, and the rules; see the module docstring."""

    def __init__(self, workers_cfg: Any, *, master_pid: int, max_slots: int,
                 log_path: str = "", in_place_reload: bool = False, generation: int = 1,
                 shutdown_delay: float = 0.0, strict: bool = False) -> None:
        self.cfg = workers_cfg
        self.master_pid = master_pid
        self.max_slots = max_slots
        self.log_path = log_path
        self.in_place_reload = in_place_reload  # an app object: reload forks, no re-exec
        self.shutdown_delay = shutdown_delay
        self.draining_until = 0.0
        self.strict = strict
        self.phase = Phase.STARTING
        self.generation = generation
        self.workers: Dict[int, WorkerRecord] = {}
        self.pending: Dict[int, Tuple[int, bool]] = {}  # slot -> (generation, is respawn)
        self.pending_ids: Dict[int, int] = {}  # slot -> the worker id it will show
        self.target = workers_cfg.effective_count if workers_cfg.mode != "ondemand" else 0
        self.totals = {k: 0 for k in TOTAL_KEYS}
        self.queue = -1
        self.max_queue = -1
        self.restarts = RestartTracker()
        self.pending_respawns = 0
        self.reload: Optional[Reload] = None
        self.stop_now = False
        self.exit_code = 0
        self.exited = False
        self.sizer = PoolSizer(workers_cfg)
        self.slots: Mapping[int, SlotView] = {}
        self.warned_fresh_over_limit = False
        self._out: List[Action] = []

    # -- resuming after a re-exec ----------------------------------------------------------

    def _on_resumed(self, ev: Resumed) -> None:
        """Adopt the workers of the master image that re-executed into this one: its
        generation keeps serving until this one's is ready."""
        if self.phase is not Phase.STARTING or self.workers or self.pending:
            self._illegal(f"master phase {self.phase} -> {Phase.RELOADING} (resumed after "
                          "the start)")
            return
        for a in ev.workers:
            state = WorkerState.STOPPING if a.stop_reason else \
                WorkerState.IDLE if a.ready else WorkerState.STARTING
            w = WorkerRecord(a.slot, a.pid, a.generation, a.started, state, wid=a.wid)
            w.stop_reason, w.kill_at = a.stop_reason, a.kill_at
            self.workers[w.pid] = w
        self.totals.update((k, v) for k, v in ev.totals.items() if k in self.totals)
        self.max_queue = max(self.max_queue, ev.max_queue)
        self.generation = ev.old_generation + 1
        self.reload = Reload(deadline=ev.now + READY_TIMEOUT, waiters=list(ev.waiters),
                             old_generation=ev.old_generation)
        self._set_phase(Phase.RELOADING, "resuming the reload after the re-exec")
        self._carry_scale(ev.scale)

    def _carry_scale(self, before: Mapping[str, Any]) -> None:
        """A static pool's ``scale`` survives a reload (a deploy in the middle of a traffic
        peak keeps its extra workers), unless ``workers.count`` changed in the file: the
        edited file then wins. Either way the log says which."""
        if self.cfg.mode != "static" or before.get("mode") != "static":
            return
        scaled, configured = int(before.get("target", 0)), int(before.get("configured", 0))
        if scaled == configured or not scaled:
            return
        if self.cfg.effective_count != configured:
            self._log(logging.INFO, f"reload: workers.count is now {self.cfg.effective_count} "
                                    f"in the config: it replaces the earlier scale to {scaled} "
                                    "workers")
            return
        self.target = scaled
        self._log(logging.INFO, f"reload: keeping the scale to {scaled} workers (workers.count "
                                f"is {configured}; change it in the config, or scale again, "
                                "to change the count)")

    def scale_state(self) -> Dict[str, Any]:
        """What :meth:`_carry_scale` needs from the image before a reload."""
        return {"mode": self.cfg.mode, "target": self.target,
                "configured": self.cfg.effective_count}

    # -- the one entry point ---------------------------------------------------------------

    def handle(self, event: Event) -> List[Action]:
        """Apply one event; the actions the shell must perform, in order."""
        handler = HANDLERS.get(type(event))
        if handler is None:
            raise TypeError(f"not a supervisor event: {event!r}")
        handler(self, event)
        out, self._out = self._out, []
        if self.phase is Phase.STOPPING and not self.workers and not self.pending \
                and not self.exited:
            self.exited = True
            out.append(Exit(self.exit_code))
        return out

    # -- queries for the shell ---------------------------------------------------------------

    def current(self) -> List[WorkerRecord]:
        """Workers of the current generation that are not on their way out."""
        return [w for w in self.workers.values()
                if w.generation == self.generation and w.stop_reason is None]

    def current_count(self) -> int:
        pending = sum(1 for gen, _ in self.pending.values() if gen == self.generation)
        return len(self.current()) + pending

    @property
    def next_start_at(self) -> float:
        return self.restarts.next_start_at

    # -- helpers ---------------------------------------------------------------------------

    def _emit(self, action: Action) -> None:
        self._out.append(action)

    def _log(self, level: int, message: str) -> None:
        self._out.append(Log(level, message))

    def _set_phase(self, new: Phase, reason: str) -> None:
        old = self.phase
        if old is new:
            return
        if new not in PHASES_ALLOWED[old]:
            self._illegal(f"master phase {old} -> {new} ({reason})")
            return
        self.phase = new
        self._log(logging.DEBUG, f"master: {old} -> {new} ({reason})")

    def _set_state(self, w: WorkerRecord, new: WorkerState, reason: str,
                   quiet: bool = False) -> None:
        old = w.state
        if old is new:
            return
        if not can_change(old, new):
            self._illegal(f"{w.name()}: {old} -> {new} ({reason})")
            return
        w.state = new
        if not quiet:
            self._log(logging.DEBUG, f"{w.name()}: {old} -> {new} ({reason})")

    def _illegal(self, what: str) -> None:
        if self.strict:
            raise IllegalTransition(what)
        self._log(logging.ERROR, f"bug: illegal transition {what}, ignored")

    # -- start, spawn, ready ---------------------------------------------------------------

    def _on_started(self, ev: Started) -> None:
        self._spawn_missing(ev.now)
        self._check_ready(ev.now)

    def _free_slot(self) -> Optional[int]:
        used = {w.slot for w in self.workers.values()} | set(self.pending)
        for slot in range(self.max_slots):
            if slot not in used:
                return slot
        return None

    def _spawn_missing(self, now: float) -> None:
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
                self._log(logging.ERROR, f"no free worker slot ({self.max_slots} workers at "
                                         "most): lower workers.count or max_workers")
                break
            respawn = self.pending_respawns > 0
            if respawn:
                self.pending_respawns -= 1
            self.pending[slot] = (self.generation, respawn)
            self.pending_ids[slot] = wid = self._free_id()
            self._emit(Spawn(slot, self.generation, wid))
        if self.restarts.backing_off and self.target > self.current_count():
            self._backoff(now)

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

    def _on_spawned(self, ev: Spawned) -> None:
        generation, respawn = self.pending.pop(ev.slot)
        if respawn:
            self.totals["respawns"] += 1
        w = WorkerRecord(ev.slot, ev.pid, generation, ev.now,
                         wid=self.pending_ids.pop(ev.slot, 0))
        self.workers[ev.pid] = w
        self._log(logging.DEBUG, f"spawned {w.name()}, generation {generation}")

    def _on_spawn_failed(self, ev: SpawnFailed) -> None:
        _, respawn = self.pending.pop(ev.slot)
        self.pending_ids.pop(ev.slot, None)
        if respawn:
            self.pending_respawns += 1
        self.totals["spawn_failures"] += 1
        self.restarts.next_start_at = ev.now + 1.0
        self._log(logging.ERROR, f"cannot fork a worker: {ev.error} (out of memory or "
                                 "process limit?); trying again in 1 s")

    def _on_worker_ready(self, ev: WorkerReady) -> None:
        w = self.workers.get(ev.pid)
        if w is None or w.state is not WorkerState.STARTING:
            return  # asked to stop while it was starting: its readiness changes nothing
        self._set_state(w, WorkerState.IDLE, "ready")
        w.idle_since = ev.now
        self._log(logging.INFO, f"{w.name()} is ready (generation {w.generation})")
        self._check_ready(ev.now)

    def _on_worker_leaving(self, ev: WorkerLeaving) -> None:
        """Count it as leaving at once, so that its replacement accepts while it finishes
        (no new request waits for its slowest one). It exits on its own; the master kills
        it only if it is still there once its requests had all the time they may take."""
        w = self.workers.get(ev.pid)
        if w is None or w.stop_reason is not None or not w.ready:
            return
        w.stop_reason = ev.reason
        self._set_state(w, WorkerState.STOPPING, f"leaving on its own ({ev.reason})")
        self._emit(MarkStopping(w.slot))
        w.kill_at = ev.now + max(self.cfg.graceful_timeout, self.cfg.timeout) + STACK_GRACE
        self._log(logging.INFO, f"{w.name()} stopped accepting ({ev.reason}) and finishes "
                                "its requests: starting its replacement now")
        if self.phase is not Phase.STOPPING:
            self._spawn_missing(ev.now)

    def _on_worker_boot_error(self, ev: WorkerBootError) -> None:
        w = self.workers.get(ev.pid)
        if w is not None:
            w.boot_error = ev.text

    def _check_ready(self, now: float) -> None:
        ready = sum(1 for w in self.current() if w.ready)
        if ready < self.target:
            return
        if self.phase is Phase.STARTING:
            self._set_phase(Phase.RUNNING, "every worker is ready")
            self._emit(ReportReady(True))
        elif self.reload is not None and not self.reload.validating \
                and self.reload.old_generation:
            self._finish_reload(now)

    # -- exits -----------------------------------------------------------------------------

    def _on_worker_exited(self, ev: WorkerExited) -> None:
        w = self.workers.pop(ev.pid, None)
        if w is None:
            # As pid 1 of a container (or a subreaper) the kernel hands the master every
            # orphan, such as the grandchild of an app that double-forks: reaped, no more.
            self._log(logging.INFO, f"reaped pid {ev.pid}, not a worker (a process the app "
                                    f"left behind) that {describe_exit(ev.status)}")
            return
        self.totals["accepted_dead"] += ev.requests
        self.totals["shed_dead"] += ev.shed
        self.totals["accept_backoffs_dead"] += ev.backoffs
        self.totals["log_lines_lost_dead"] += ev.lost
        how = describe_exit(ev.status)
        kind = classify(ev.status, w.stop_reason, bool(w.boot_error))
        was_starting = w.state is WorkerState.STARTING
        if kind is ExitKind.BOOT_ERROR:
            self._on_boot_error(w, how, ev.now)
        elif kind is ExitKind.RECYCLED:
            self.totals["recycled"] += 1
            self._log(logging.INFO, f"{w.name()} {how}: recycled "
                                    f"({recycle_reason(ev.status, w.stop_reason)})")
            self.restarts.failures = 0
        elif kind is ExitKind.TIMED_OUT:
            self._log(logging.WARNING, f"{w.name()} {how} after its request ran past "
                                       f"workers.timeout ({self.cfg.timeout:.0f} s)")
        elif kind is ExitKind.STOPPED:
            self._log(logging.INFO, f"{w.name()} {how} ({w.stop_reason})")
        else:
            self._on_crash(w, how, ev)
            if self.phase is Phase.STARTING and was_starting \
                    and self.restarts.startup_exhausted():
                log_hint = f"; see the log {self.log_path}" if self.log_path else ""
                self._startup_failed(f"workers keep dying before they are ready ({how})"
                                     f"{log_hint}", ev.now)
        if self.phase is not Phase.STOPPING:
            self._spawn_missing(ev.now)

    def _on_crash(self, w: WorkerRecord, how: str, ev: WorkerExited) -> None:
        self.totals["crashes"] += 1
        self.pending_respawns += 1
        lived = ev.now - w.started
        if self.restarts.is_quick(lived, ev.requests):  # one that served is no crash loop
            self.restarts.failed(ev.now)
        signaled = how.startswith("was killed")
        self._log(logging.ERROR, f"{w.name()} {how} unexpectedly after {lived:.1f} s; "
                                 f"replacing it{' (check the app: it may crash the interpreter)' if signaled else ''}")  # noqa: E501
        self._backoff(ev.now)

    def _on_boot_error(self, w: WorkerRecord, how: str, now: float) -> None:
        text = w.boot_error or f"the worker {how} before it was ready"
        if self.phase is Phase.STARTING:
            self._startup_failed(text, now)
            return
        if self.reload is not None and self.reload.old_generation \
                and w.generation == self.generation:
            self._fail_reload(text, now)
            return
        self.restarts.failed(now)
        self.pending_respawns += 1
        self._log(logging.ERROR, f"{w.name()} could not import the app; retrying with "
                                 f"backoff:\n{text}")
        self._backoff(now)

    def _backoff(self, now: float) -> None:
        delay = self.restarts.delay_from(now)
        if delay:
            self._log(logging.WARNING, f"workers are failing quickly "
                                       f"({self.restarts.failures} in a row): waiting "
                                       f"{delay:.1f} s before the next start")

    def _startup_failed(self, text: str, now: float) -> None:
        self.exit_code = 1
        self._stop(now=True, at=now)
        self._emit(ReportReady(False, text))

    def _on_pidfile_failed(self, ev: PidfileFailed) -> None:
        self.exit_code = 1
        self._log(logging.ERROR, f"{ev.error}: stopping")
        self._stop(now=True, at=ev.now)

    # -- stopping workers ----------------------------------------------------------------

    def _stop_worker(self, w: WorkerRecord, reason: str, sig: int, grace: float,
                     now: float) -> None:
        if w.stop_reason is not None and sig not in (signal.SIGKILL, signal.SIGINT):
            return
        if w.stop_reason is None:
            w.stop_reason = reason
        if w.state is not WorkerState.STOPPING:
            self._set_state(w, WorkerState.STOPPING, reason)
            self._emit(MarkStopping(w.slot))
        self._emit(Signal(w.pid, sig))
        deadline = now + grace
        if not w.kill_at or deadline < w.kill_at:
            w.kill_at = deadline

    # -- ticks: worker states, recovery, timeouts, sizing, escalation ------------------------

    def _on_tick(self, ev: Tick) -> None:
        now = ev.now
        self.slots = ev.slots
        if self.phase is Phase.DRAINING and now >= self.draining_until:
            self._log(logging.INFO, "shutdown_delay is over: stopping gracefully")
            self._stop(False, now)
        self.queue = ev.queue
        self.max_queue = max(self.max_queue, ev.queue)
        self._observe(ev.slots)
        if self.phase is not Phase.STOPPING:
            if self.restarts.failures:
                self._check_recovered(now)
            self._check_timeouts(now)
            self._check_heartbeats(now)
            self._manage_workers(now, ev.listener_waiting)
            self._check_reload_deadline(now)
        self._escalate(now)

    def _observe(self, slots: Mapping[int, SlotView]) -> None:
        """Idle/busy as the workers wrote them (only the ones the supervisor calls ready)."""
        for w in self.workers.values():
            s = slots.get(w.pid)
            if s is not None and w.ready:
                self._set_state(w, WorkerState.BUSY if s.busy else WorkerState.IDLE,
                                "scoreboard", quiet=True)

    def _check_recovered(self, now: float) -> None:
        """End the backoff once a worker started after the last quick failure is healthy:
        it served a request, or stayed up a while. Otherwise "failures in a row" would never
        reset: after a burst of deaths (workers killed under load) the pool would refill one
        worker at a time, up to 30 s apart, and stay that way for good."""
        for w in self.current():
            s = self.slots.get(w.pid)
            if w.ready and self.restarts.is_healthy(w.started, now, s.requests if s else 0):
                self._log(logging.INFO, f"{w.name()} is healthy: no more backoff "
                                        f"({self.restarts.failures} quick failure(s) before it)")
                self.restarts.reset()
                return

    def _check_timeouts(self, now: float) -> None:
        cfg = self.cfg
        active = 0
        for w in list(self.workers.values()):
            s = self.slots.get(w.pid)
            if s is None or not s.busy:
                continue
            active += 1
            elapsed = now - s.busy_since
            if w.stop_reason == "timeout" and s.threads > 1:
                self._kill_when_only_hung_left(w, s, now)
            if w.stop_reason is None and elapsed > cfg.timeout:
                self._log(logging.ERROR, f"{w.name()} has run {s.what} for {elapsed:.0f} s, "
                                         f"past workers.timeout ({cfg.timeout:.0f} s): its stack "
                                         "follows, then it is killed and replaced")
                self.totals["timeouts"] += 1
                self.pending_respawns += 1  # its replacement starts at once
                self._stop_worker(w, "timeout", STACK_SIGNAL, STACK_GRACE, now)
                if s.threads > 1:
                    self._stop_hung_threaded(w, s)
            elif cfg.slow_request and elapsed > cfg.slow_request:
                request_no = (s.requests + 1) & 0xFFFFFFFF
                if s.threads > 1:
                    request_no = int(s.busy_since * 1000) & 0xFFFFFFFF  # the oldest request
                if s.slow_dumped != request_no:
                    self._emit(MarkSlowDumped(w.slot, request_no))
                    self.totals["slow"] += 1
                    self._log(logging.WARNING, f"{w.name()}: {s.what} is slow ({elapsed:.1f} s, "
                                               f"workers.slow_request = {cfg.slow_request:.1f} s);"
                                               " its stack follows")
                    self._emit(Signal(w.pid, STACK_SIGNAL))
        self.totals["max_active"] = max(self.totals["max_active"], active)

    def _check_heartbeats(self, now: float) -> None:
        """An idle worker proves it is alive: its loop writes a heartbeat when it wakes up
        idle (at least once a second), and serving changes its request count. One whose
        slot has not changed for ``workers.timeout`` -- SIGSTOPped, or hung outside a
        request -- is ``stuck``: killed and replaced. Measured on the master's clock from
        the last change it saw, so a master that was itself stopped never blames them:
        their beats moved meanwhile."""
        limit = self.cfg.timeout
        for w in list(self.workers.values()):
            s = self.slots.get(w.pid)
            if s is None or w.stop_reason is not None or not w.ready:
                continue
            beat = s.heartbeat + s.requests + (0.5 if s.busy else 0.0)
            if beat != w.beat or s.busy:  # busy: workers.timeout is the judge
                w.beat, w.alive_at = beat, now
                continue
            silent = now - w.alive_at
            if not limit or silent <= limit:
                continue
            self._log(logging.ERROR, f"{w.name()} is idle and missed its heartbeat for "
                                     f"{silent:.0f} s (workers.timeout = {limit:.0f} s): "
                                     "stopped (SIGSTOP?) or hung outside a request; killing "
                                     "and replacing it")
            self.totals["stuck"] += 1
            self.pending_respawns += 1
            w.stop_reason = "stuck"
            self._set_state(w, WorkerState.STUCK, "missed its heartbeat")
            self._emit(MarkStuck(w.slot))
            self._emit(Signal(w.pid, signal.SIGKILL))
            w.kill_at = now + KILL_RETRY
        if self.totals["stuck"]:
            self._spawn_missing(now)

    def _stop_hung_threaded(self, w: WorkerRecord, s: SlotView) -> None:
        """A threaded worker with a hung request: its other threads get graceful_timeout to
        finish their requests (it stops accepting at once), then it is killed."""
        self._log(logging.WARNING, f"{w.name()}: {s.in_flight - 1} other request(s) in flight "
                                   f"get workers.graceful_timeout "
                                   f"({self.cfg.graceful_timeout:.0f} s) to finish before it is "
                                   "killed")
        self._emit(Signal(w.pid, signal.SIGTERM))
        w.kill_at += self.cfg.graceful_timeout

    def _kill_when_only_hung_left(self, w: WorkerRecord, s: SlotView, now: float) -> None:
        """Once the other requests of a timed-out threaded worker are done (and its stacks
        had STACK_GRACE to be written), waiting longer serves no one."""
        grace_left = w.kill_at - self.cfg.graceful_timeout
        if s.in_flight <= 1 and now >= grace_left and w.kill_at > now:
            self._log(logging.INFO, f"{w.name()}: its other requests are done")
            w.kill_at = now

    def _escalate(self, now: float) -> None:
        for w in list(self.workers.values()):
            if w.kill_at and now >= w.kill_at:
                if w.stop_reason == "timeout":
                    self._log(logging.WARNING, f"{w.name()}: killing it now that its stack is "
                                               "logged")
                else:
                    self._log(logging.WARNING, f"{w.name()} did not exit within "
                                               f"graceful_timeout ({w.stop_reason}): killing it")
                self._emit(Signal(w.pid, signal.SIGKILL))
                w.kill_at = now + KILL_RETRY

    # -- memory samples ------------------------------------------------------------------

    def _on_sample(self, ev: Sample) -> None:
        for pid, rss in ev.rss.items():
            w = self.workers.get(pid)
            if w is not None:
                w.rss = rss
        limit = self.cfg.max_memory
        if not limit or self.phase is Phase.STOPPING:
            return
        for w in self.current():
            if w.state is not WorkerState.IDLE or w.rss <= limit:
                continue
            s = self.slots.get(w.pid)
            if s is None or not s.requests:
                # Over the limit before serving anything: recycling would only loop.
                if not self.warned_fresh_over_limit:
                    self.warned_fresh_over_limit = True
                    self._log(logging.WARNING, f"a fresh worker uses {w.rss >> 20} MiB, over "
                                               f"workers.max_memory ({limit >> 20} MiB): each "
                                               "worker is recycled after its first request; "
                                               "raise max_memory")
                continue
            # The worker checks itself after a request; one that grew and then went quiet
            # would otherwise stay over the limit for as long as no request comes.
            self._log(logging.INFO, f"{w.name()} is idle at {w.rss >> 20} MiB, over "
                                    f"workers.max_memory ({limit >> 20} MiB): recycling it")
            self._stop_worker(w, "max_memory", signal.SIGTERM, self.cfg.graceful_timeout,
                              ev.now)
        self._spawn_missing(ev.now)

    # -- pool sizing ---------------------------------------------------------------------

    def _on_listener_readable(self, ev: ListenerReadable) -> None:
        self.slots = ev.slots
        self._observe(ev.slots)
        self._emit(WatchListener(False))
        self._manage_workers(ev.now, True)

    def _manage_workers(self, now: float, listener_waiting: bool = False) -> None:
        """Bring the current generation to the size its mode wants (see pool.py)."""
        if self.phase is Phase.STOPPING:
            return
        if self.cfg.mode != "static" and (self.reload is None or self.reload.validating):
            self._resize_pool(now, listener_waiting)
        count = self.current_count()
        if count < self.target:
            self._spawn_missing(now)
        elif count > self.target:
            # Retire idle workers first, newest first.
            extra = count - self.target
            ranked = sorted(self.current(), key=lambda w: (w.state is WorkerState.BUSY,
                                                           -w.started))
            for w in ranked[:max(0, extra)]:
                self._stop_worker(w, "scaled down", signal.SIGTERM, self.cfg.graceful_timeout,
                                  now)

    def _resize_pool(self, now: float, listener_waiting: bool) -> None:
        current = self.current()
        idle = busy = starting = free_threads = with_room = 0
        idle_since: Dict[int, float] = {}
        for w in current:
            if not w.ready:
                starting += 1
                continue
            s = self.slots.get(w.pid)
            free = (s.threads - s.in_flight) if s else 1
            free_threads += free
            with_room += free > 0
            requests = s.requests if s else w.requests
            if w.state is WorkerState.BUSY or requests != w.requests:
                w.requests = requests
                w.idle_since = now
            if w.state is WorkerState.BUSY:
                busy += 1
            else:
                idle += 1
                idle_since[w.pid] = w.idle_since
        starting += sum(1 for gen, _ in self.pending.values() if gen == self.generation)
        waiting = max(self.queue, 0)
        threads = self.cfg.threads
        if threads > 1:  # demand is busy threads, not busy processes
            idle, busy, waiting = threaded_view(self.cfg.mode, threads, free_threads, with_room,
                                                idle + busy, waiting)
        if self.cfg.mode == "ondemand" and not waiting and not idle and listener_waiting:
            waiting = 1
        view = PoolView(total=len(current), idle=idle, busy=busy, starting=starting, now=now,
                        idle_since=idle_since, waiting=waiting)
        decision = self.sizer.decide(view)
        if decision.reached_max:
            self.totals["max_children_reached"] += 1
            self._log(logging.WARNING, f"the pool is at workers.max_workers "
                                       f"({self.cfg.max_workers}) and requests are waiting: "
                                       "raise max_workers if memory allows")
        for pid in decision.retire:
            idler = self.workers.get(pid)
            if idler is not None:
                self._stop_worker(idler, "idle (pool shrinking)", signal.SIGTERM,
                                  self.cfg.graceful_timeout, now)
        self.target = len(current) - len(decision.retire) + decision.spawn
        if self.cfg.mode == "ondemand":
            # Only when no worker can take a new connection: none idle (counting the ones
            # retired now), none starting or about to (watching then would wake the loop
            # without pause until the starting worker accepts).
            self._emit(WatchListener(idle <= len(decision.retire) and not starting
                                     and not decision.spawn
                                     and self.target < self.cfg.max_workers))

    # -- commands ------------------------------------------------------------------------

    def _on_command(self, ev: Command) -> None:
        if ev.name == "stop":
            self._request_stop(bool(ev.args.get("now")), ev.now)
            drain = self.draining_until - ev.now if self.phase is Phase.DRAINING else 0.0
            self._emit(Reply(ev.client, True, {"stopping": True, "pid": self.master_pid,
                                               "drain_s": max(0.0, drain)}))
        elif ev.name == "scale":
            self._scale(str(ev.args.get("value", "")), ev.client, ev.now)
        elif ev.name == "reload":
            self._start_reload(ev.client, ev.now)
        else:
            self._emit(Reply(ev.client, False, error=f"unknown command {ev.name!r}"))

    def _scale(self, value: str, client: Any, now: float) -> None:
        value = value.strip()
        try:
            new = self.target + int(value) if value.startswith(("+", "-")) else int(value)
        except ValueError:
            self._emit(Reply(client, False, error=f"scale: {value!r} is not N, +N or -N"))
            return
        limit = self.cfg.max_workers if self.cfg.mode != "static" else self.max_slots
        if new < 0 or new > limit:
            self._emit(Reply(client, False, error=f"scale: {new} workers is outside 0..{limit}"))
            return
        if new == 0 and self.cfg.mode == "static":
            self._emit(Reply(client, False, error="scale: a static pool needs at least 1 worker"))
            return
        old, self.target = self.target, new
        self._log(logging.INFO, f"scaling from {old} to {new} workers")
        self._manage_workers(now)
        self._emit(Reply(client, True, {"workers": new, "was": old}))

    def _request_stop(self, now: bool, at: float) -> None:
        """A stop as asked for: a graceful one drains first with manager.shutdown_delay."""
        if not now and self.shutdown_delay > 0 and self.phase in (
                Phase.RUNNING, Phase.RELOADING, Phase.DRAINING):
            self._drain(at)
        else:
            self._stop(now, at)

    def _drain(self, at: float) -> None:
        """The first part of a graceful stop with ``manager.shutdown_delay``: the ping path
        answers 503 "draining" while every other request is served as before, so that load
        balancers (a Kubernetes readiness probe, an nginx health check) take this instance
        out before it stops accepting. A tick begins the stop when the delay is over."""
        if self.phase is Phase.DRAINING:
            self._log(logging.INFO, f"already draining: the graceful stop begins in "
                                    f"{max(0.0, self.draining_until - at):.1f} s")
            return
        self._end_reload_for_stop()
        self.draining_until = at + self.shutdown_delay
        self._set_phase(Phase.DRAINING, "graceful stop with manager.shutdown_delay")
        self._emit(SetDraining())
        self._emit(NotifySystemd("STOPPING=1"))
        self._log(logging.INFO, f"draining: the ping path answers 503 for "
                                f"{self.shutdown_delay:.1f} s (manager.shutdown_delay) while "
                                "requests are still served; then the graceful stop")

    def _stop(self, now: bool, at: float) -> None:
        if self.phase is Phase.STOPPING and (self.stop_now or not now):
            return
        first = self.phase is not Phase.STOPPING
        self.stop_now = now
        grace = 0.0 if now else self.cfg.graceful_timeout
        if first:
            drained = self.phase is Phase.DRAINING
            self._set_phase(Phase.STOPPING, "stop now" if now else "graceful stop")
            self._emit(SetDraining())  # pings on kept connections say so too
            if not drained:
                self._emit(NotifySystemd("STOPPING=1"))
            # Our copy of the listening socket goes first, so that it closes for good as
            # soon as the workers have taken what is queued and closed theirs.
            self._emit(CloseListener())
            self._end_reload_for_stop()
        for w in list(self.workers.values()):
            self._stop_worker(w, "stop", signal.SIGINT if now else signal.SIGTERM, grace, at)

    def _end_reload_for_stop(self) -> None:
        if self.reload is None:
            return
        if self.reload.validating:
            self._emit(CancelValidation())
        for client in self.reload.waiters:
            self._emit(Reply(client, False, error="the master is stopping"))
        self.reload = None

    # -- reload --------------------------------------------------------------------------

    def _start_reload(self, client: Any, now: float) -> None:
        if self.phase in (Phase.STOPPING, Phase.DRAINING):
            self._emit(Reply(client, False, error="cannot reload: the master is stopping"))
            return
        if self.phase is Phase.STARTING:
            self._emit(Reply(client, False, error="cannot reload: the master is still "
                                                  "starting; try again when it is ready"))
            return
        if self.reload is not None:
            if client is not None:
                self.reload.waiters.append(client)  # one reload answers everyone
            return
        self._log(logging.INFO, "reload: checking the new configuration and code")
        self._emit(NotifySystemd("RELOADING=1"))
        self.reload = Reload(deadline=now + READY_TIMEOUT,
                             waiters=[client] if client is not None else [])
        self._set_phase(Phase.RELOADING, "reload")
        if self.in_place_reload:
            self._reload_in_place(now)
            return
        self.reload.validating = True
        self._emit(Validate())

    def _on_validation_done(self, ev: ValidationDone) -> None:
        if self.reload is None or not self.reload.validating:
            return
        self.reload.validating = False
        if not ev.ok:
            self._refuse_reload(ev.text)
            return
        self._emit(ReExec())

    def _refuse_reload(self, text: str) -> None:
        self._log(logging.ERROR, f"reload refused, the old workers keep serving:\n{text}")
        self._end_reload(False, f"reload refused, old workers keep serving:\n{text}")

    def _on_re_exec_failed(self, ev: ReExecFailed) -> None:
        if self.reload is None:
            return
        self._log(logging.ERROR, f"reload: cannot re-execute the master: {ev.error}; old "
                                 "workers keep serving")
        self._end_reload(False, f"cannot re-execute: {ev.error}")

    def _reload_in_place(self, now: float) -> None:
        """An app object (Python API): new workers from the same code, nothing to import."""
        assert self.reload is not None
        self.reload.old_generation = self.generation
        self.generation += 1
        self._spawn_missing(now)
        self._check_ready(now)

    def _finish_reload(self, now: float) -> None:
        assert self.reload is not None
        old = [w for w in self.workers.values()
               if w.generation != self.generation and w.stop_reason is None]
        self._log(logging.INFO, f"reload: generation {self.generation} is ready "
                                f"({len(self.current())} workers); {len(old)} old worker(s) "
                                "finish their requests and exit")
        for w in old:
            self._stop_worker(w, "reload", signal.SIGTERM, self.cfg.graceful_timeout, now)
        self._end_reload(True, result={"generation": self.generation,
                                       "workers": len(self.current())})

    def _fail_reload(self, why: str, now: float) -> None:
        assert self.reload is not None
        self._log(logging.ERROR, f"reload failed, the old workers keep serving: {why}")
        for w in self.current():
            self._stop_worker(w, "reload failed", signal.SIGKILL, 0, now)
        self.generation = self.reload.old_generation
        self._end_reload(False, f"reload failed, old workers keep serving:\n{why}")

    def _end_reload(self, ok: bool, error: str = "", result: Any = None) -> None:
        assert self.reload is not None
        waiters, self.reload = self.reload.waiters, None
        self._set_phase(Phase.RUNNING, "reload done" if ok else "reload failed")
        self._emit(NotifySystemd("READY=1"))
        for client in waiters:
            self._emit(Reply(client, ok, result, error))

    def _check_reload_deadline(self, now: float) -> None:
        if self.reload is None or now <= self.reload.deadline:
            return
        if self.reload.validating:
            self.reload.validating = False
            self._emit(CancelValidation())
            self._refuse_reload(f"importing the app took longer than {READY_TIMEOUT:.0f} s")
        elif self.reload.old_generation:
            self._fail_reload("the new workers did not become ready in time", now)


# -- the dispatch table -------------------------------------------------------------------

_E = TypeVar("_E")
Handler = Callable[[Supervisor, Any], None]


def _row(kind: Type[_E], handler: Callable[[Supervisor, _E], None]) -> Tuple[type, Handler]:
    """One entry of :data:`HANDLERS`: the checker sees that ``handler`` takes ``kind``."""
    return kind, handler


# Every member of ``Event`` has one (tests/test_supervisor.py checks it).
HANDLERS: Dict[type, Handler] = dict([
    _row(Started, Supervisor._on_started),
    _row(Spawned, Supervisor._on_spawned),
    _row(SpawnFailed, Supervisor._on_spawn_failed),
    _row(WorkerReady, Supervisor._on_worker_ready),
    _row(WorkerLeaving, Supervisor._on_worker_leaving),
    _row(WorkerBootError, Supervisor._on_worker_boot_error),
    _row(WorkerExited, Supervisor._on_worker_exited),
    _row(Tick, Supervisor._on_tick),
    _row(ListenerReadable, Supervisor._on_listener_readable),
    _row(Sample, Supervisor._on_sample),
    _row(Command, Supervisor._on_command),
    _row(ValidationDone, Supervisor._on_validation_done),
    _row(ReExecFailed, Supervisor._on_re_exec_failed),
    _row(Resumed, Supervisor._on_resumed),
    _row(PidfileFailed, Supervisor._on_pidfile_failed),
])
