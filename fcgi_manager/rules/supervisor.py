"""The supervisor: every rule of supervision, as a pure state machine.

Events in, actions out, the shape of ``protocol`` applied to the master (h11's
events-in/actions-out): :meth:`Supervisor.handle` takes one :data:`Event` -- a worker
spawned, ready, exited; a tick with what the scoreboard shows; memory samples; a command;
the reload check's verdict; the state a re-executed image resumes; a pidfile that could not
be written -- and returns the :data:`Action` s the shell (``master/shell.py``) performs: spawn,
signal, mark a slot stopping, reply to a client, validate, re-exec, log, exit. Both are
unions of frozen dataclasses (the actions are defined in ``supervisor_actions`` and
re-exported here), and :data:`HANDLERS` maps each event type to its handler, so the type
checker sees every pairing. It never forks, reads, writes, sleeps or looks at a clock;
every time it knows came in an event, and the shell changes its state only through
events. So each rule is a unit test on a sequence of events (tests/unit/test_supervisor.py).

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
only in ``Book.set_state`` (``supervisor_book``), which checks ``states.ALLOWED`` and logs
``old -> new (reason)``. An illegal move is a bug: it raises when ``strict`` (the tests,
and a master run with ``FCGI_MANAGER_STRICT=1``), and is logged as one otherwise.
Workers write idle/busy into the scoreboard themselves; ticks carry what it shows.

:class:`Supervisor` holds the handlers and the rules of a worker's life (spawn, ready,
exit, crash, backoff); the rest is in parts it composes, each around the one
``supervisor_book.Book`` of shared state: the reload (``supervisor_reload``), the workers'
health (``supervisor_health``: timeouts, heartbeats, memory, kills), the pool's size
(``supervisor_pool``: the modes' rules, ``scale``) and the stop (``supervisor_stop``:
draining, stopping). They follow the same rules as this module: pure, events in (as
calls), actions out (into the book).

Pids the supervisor never spawned (a reaped orphan when the master is PID 1, the
reload's check process) exit without effect: reaping is the shell's, meaning is ours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type, TypeVar, Union

from ..wire.states import WorkerState
from .restarts import ExitKind, RestartTracker, classify, describe_exit, recycle_reason
from .supervisor_actions import (
    Action,
    CancelValidation,
    CloseListener,
    Exit,
    Log,
    MarkSlowDumped,
    MarkStopping,
    MarkStuck,
    NotifySystemd,
    ReExec,
    Reply,
    ReportReady,
    SetDraining,
    Signal,
    Spawn,
    Validate,
    WatchListener,
)
from .supervisor_book import (
    KILL_RETRY,
    PHASES_ALLOWED,
    READY_TIMEOUT,
    STACK_GRACE,
    TOTAL_KEYS,
    Book,
    IllegalTransition,
    Phase,
    Reload,
    SlotView,
    WorkerRecord,
)
from .supervisor_health import HealthChecks
from .supervisor_pool import PoolSizing
from .supervisor_reload import Reloads
from .supervisor_stop import Stopping

# The whole surface, whichever module defines it: the shell and the tests import it from here.
__all__ = [
    # events
    "SlotView", "Started", "Spawned", "SpawnFailed", "WorkerReady", "WorkerLeaving",
    "WorkerBootError", "WorkerExited", "Tick", "ListenerReadable", "Sample", "Command",
    "ValidationDone", "ReExecFailed", "AdoptedWorker", "Resumed", "PidfileFailed", "Event",
    # actions
    "Spawn", "Signal", "MarkStopping", "MarkStuck", "MarkSlowDumped", "Reply", "Validate",
    "CancelValidation", "ReExec", "NotifySystemd", "ReportReady", "CloseListener",
    "SetDraining", "WatchListener", "Log", "Exit", "Action",
    # the supervisor, its state and tables
    "Supervisor", "HANDLERS", "Handler", "Phase", "PHASES_ALLOWED", "IllegalTransition",
    "WorkerRecord", "Reload", "Book", "STACK_GRACE", "KILL_RETRY", "READY_TIMEOUT",
    "TOTAL_KEYS",
]

# -- events -------------------------------------------------------------------------------

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


# -- the supervisor -----------------------------------------------------------------------

class Supervisor:
    """The handlers of every event, and the rules of a worker's life: spawned, ready,
    leaving, exited (recycled, stopped, timed out, crashed, failed to boot), the backoff
    after quick failures and a start that fails. What a reload, the workers' health, the
    pool's size and a stop decide is delegated to its parts (``reloads``, ``health``,
    ``sizing``, ``stopping``), which share one :class:`Book` (see the module docstring)."""

    def __init__(self, workers_cfg: Any, *, master_pid: int, max_slots: int,
                 log_path: str = "", in_place_reload: bool = False, generation: int = 1,
                 shutdown_delay: float = 0.0, strict: bool = False) -> None:
        self.cfg = workers_cfg
        self.master_pid = master_pid
        self.log_path = log_path
        self.max_queue = -1
        self.exit_code = 0
        self.exited = False
        self.book = Book(workers_cfg, max_slots=max_slots, generation=generation,
                         strict=strict)
        self.reloads = Reloads(self.book, in_place=in_place_reload)
        self.stopping = Stopping(self.book, self.reloads, shutdown_delay)
        self.health = HealthChecks(self.book)
        self.sizing = PoolSizing(self.book)

    # -- the one entry point ---------------------------------------------------------------

    def handle(self, event: Event) -> List[Action]:
        """Apply one event; the actions the shell must perform, in order."""
        handler = HANDLERS.get(type(event))
        if handler is None:
            raise TypeError(f"not a supervisor event: {event!r}")
        handler(self, event)
        out = self.book.take()
        if self.phase is Phase.STOPPING and not self.workers and not self.pending \
                and not self.exited:
            self.exited = True
            out.append(Exit(self.exit_code))
        return out

    # -- queries for the shell ---------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self.book.phase

    @property
    def generation(self) -> int:
        return self.book.generation

    @property
    def workers(self) -> Dict[int, WorkerRecord]:
        return self.book.workers

    @property
    def pending(self) -> Dict[int, Tuple[int, bool]]:
        """Slots asked to spawn a worker: slot -> (generation, is respawn)."""
        return self.book.pending

    @property
    def target(self) -> int:
        return self.book.target

    @property
    def totals(self) -> Dict[str, int]:
        return self.book.totals

    @property
    def queue(self) -> int:
        return self.book.queue

    @property
    def reload(self) -> Optional[Reload]:
        return self.book.reload

    @property
    def restarts(self) -> RestartTracker:
        return self.book.restarts

    @property
    def next_start_at(self) -> float:
        return self.book.restarts.next_start_at

    @property
    def shutdown_delay(self) -> float:
        return self.stopping.shutdown_delay

    @shutdown_delay.setter
    def shutdown_delay(self, delay: float) -> None:
        self.stopping.shutdown_delay = delay

    def current(self) -> List[WorkerRecord]:
        """Workers of the current generation that are not on their way out."""
        return self.book.current()

    def current_count(self) -> int:
        return self.book.current_count()

    def scale_state(self) -> Dict[str, Any]:
        """What a static pool's scale needs from the image before a reload."""
        return self.sizing.scale_state()

    # -- helpers ---------------------------------------------------------------------------

    def _emit(self, action: Action) -> None:
        self.book.emit(action)

    def _log(self, level: int, message: str) -> None:
        self.book.log(level, message)

    def _set_phase(self, new: Phase, reason: str) -> None:
        self.book.set_phase(new, reason)

    def _set_state(self, w: WorkerRecord, new: WorkerState, reason: str,
                   quiet: bool = False) -> None:
        self.book.set_state(w, new, reason, quiet)

    # -- resuming after a re-exec ----------------------------------------------------------

    def _on_resumed(self, ev: Resumed) -> None:
        """Adopt the workers of the master image that re-executed into this one: its
        generation keeps serving until this one's is ready."""
        if self.phase is not Phase.STARTING or self.workers or self.pending:
            self.book.illegal(f"master phase {self.phase} -> {Phase.RELOADING} (resumed "
                              "after the start)")
            return
        for a in ev.workers:
            state = WorkerState.STOPPING if a.stop_reason else \
                WorkerState.IDLE if a.ready else WorkerState.STARTING
            w = WorkerRecord(a.slot, a.pid, a.generation, a.started, state, wid=a.wid)
            w.stop_reason, w.kill_at = a.stop_reason, a.kill_at
            self.workers[w.pid] = w
        self.totals.update((k, v) for k, v in ev.totals.items() if k in self.totals)
        self.max_queue = max(self.max_queue, ev.max_queue)
        self.reloads.resume(ev.old_generation, ev.waiters, ev.now)
        self.sizing.carry_scale(ev.scale)

    # -- start, spawn, ready ---------------------------------------------------------------

    def _on_started(self, ev: Started) -> None:
        self.book.spawn_missing(ev.now)
        self._check_ready(ev.now)

    def _on_spawned(self, ev: Spawned) -> None:
        generation, respawn = self.pending.pop(ev.slot)
        if respawn:
            self.totals["respawns"] += 1
        w = WorkerRecord(ev.slot, ev.pid, generation, ev.now,
                         wid=self.book.pending_ids.pop(ev.slot, 0))
        self.workers[ev.pid] = w
        self._log(logging.DEBUG, f"spawned {w.name()}, generation {generation}")

    def _on_spawn_failed(self, ev: SpawnFailed) -> None:
        _, respawn = self.pending.pop(ev.slot)
        self.book.pending_ids.pop(ev.slot, None)
        if respawn:
            self.book.pending_respawns += 1
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
            self.book.spawn_missing(ev.now)

    def _on_worker_boot_error(self, ev: WorkerBootError) -> None:
        w = self.workers.get(ev.pid)
        if w is not None:
            w.boot_error = ev.text

    def _check_ready(self, now: float) -> None:
        if not self.book.all_ready():
            return
        if self.phase is Phase.STARTING:
            self._set_phase(Phase.RUNNING, "every worker is ready")
            self._emit(ReportReady(True))
        else:
            self.reloads.generation_ready(now)

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
            self.book.spawn_missing(ev.now)

    def _on_crash(self, w: WorkerRecord, how: str, ev: WorkerExited) -> None:
        self.totals["crashes"] += 1
        self.book.pending_respawns += 1
        lived = ev.now - w.started
        if self.restarts.is_quick(lived, ev.requests):  # one that served is no crash loop
            self.restarts.failed(ev.now)
        signaled = how.startswith("was killed")
        self._log(logging.ERROR, f"{w.name()} {how} unexpectedly after {lived:.1f} s; "
                                 f"replacing it{' (check the app: it may crash the interpreter)' if signaled else ''}")  # noqa: E501
        self.book.backoff(ev.now)

    def _on_boot_error(self, w: WorkerRecord, how: str, now: float) -> None:
        text = w.boot_error or f"the worker {how} before it was ready"
        if self.phase is Phase.STARTING:
            self._startup_failed(text, now)
            return
        if self.reloads.brings_up(w.generation):
            self.reloads.fail(text, now)
            return
        self.restarts.failed(now)
        self.book.pending_respawns += 1
        self._log(logging.ERROR, f"{w.name()} could not import the app; retrying with "
                                 f"backoff:\n{text}")
        self.book.backoff(now)

    def _startup_failed(self, text: str, now: float) -> None:
        self.exit_code = 1
        self.stopping.stop(now=True, at=now)
        self._emit(ReportReady(False, text))

    def _on_pidfile_failed(self, ev: PidfileFailed) -> None:
        self.exit_code = 1
        self._log(logging.ERROR, f"{ev.error}: stopping")
        self.stopping.stop(now=True, at=ev.now)

    # -- ticks: worker states, recovery, timeouts, sizing, escalation ------------------------

    def _on_tick(self, ev: Tick) -> None:
        now = ev.now
        self.book.slots = ev.slots
        self.stopping.check_drain(now)
        self.book.queue = ev.queue
        self.max_queue = max(self.max_queue, ev.queue)
        self._observe(ev.slots)
        if self.phase is not Phase.STOPPING:
            if self.restarts.failures:
                self.health.check_recovered(now)
            self.health.check_timeouts(now)
            self.health.check_heartbeats(now)
            self.sizing.manage(now, ev.listener_waiting)
            self.reloads.check_deadline(now)
        self.health.escalate(now)

    def _observe(self, slots: Mapping[int, SlotView]) -> None:
        """Idle/busy as the workers wrote them (only the ones the supervisor calls ready)."""
        for w in self.workers.values():
            s = slots.get(w.pid)
            if s is not None and w.ready:
                self._set_state(w, WorkerState.BUSY if s.busy else WorkerState.IDLE,
                                "scoreboard", quiet=True)

    def _on_listener_readable(self, ev: ListenerReadable) -> None:
        self.book.slots = ev.slots
        self._observe(ev.slots)
        self._emit(WatchListener(False))
        self.sizing.manage(ev.now, True)

    def _on_sample(self, ev: Sample) -> None:
        self.health.check_memory(ev.rss, ev.now)

    # -- commands and the reload's events --------------------------------------------------

    def _on_command(self, ev: Command) -> None:
        if ev.name == "stop":
            self.stopping.request(bool(ev.args.get("now")), ev.now)
            self._emit(Reply(ev.client, True, {"stopping": True, "pid": self.master_pid,
                                               "drain_s": self.stopping.drain_left(ev.now)}))
        elif ev.name == "scale":
            self.sizing.scale(str(ev.args.get("value", "")), ev.client, ev.now)
        elif ev.name == "reload":
            self.reloads.start(ev.client, ev.now)
        else:
            self._emit(Reply(ev.client, False, error=f"unknown command {ev.name!r}"))

    def _on_validation_done(self, ev: ValidationDone) -> None:
        self.reloads.validation_done(ev.ok, ev.text)

    def _on_re_exec_failed(self, ev: ReExecFailed) -> None:
        self.reloads.re_exec_failed(ev.error)


# -- the dispatch table -------------------------------------------------------------------

_E = TypeVar("_E")
Handler = Callable[[Supervisor, Any], None]


def _row(kind: Type[_E], handler: Callable[[Supervisor, _E], None]) -> Tuple[type, Handler]:
    """One entry of :data:`HANDLERS`: the checker sees that ``handler`` takes ``kind``."""
    return kind, handler


# Every member of ``Event`` has one (tests/unit/test_supervisor.py checks it).
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
