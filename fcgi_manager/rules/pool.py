"""How many workers to run: the sizing rules of the three pool modes (php-fpm's ``pm``).

Pure decisions on a snapshot of the pool, so every rule is a unit test:

``static``    ``count`` workers, always (``scale`` changes the count).
``dynamic``   keep ``min_spare``..``max_spare`` idle workers, never more than
              ``max_workers``; connections waiting in the listen queue count as demand
              too, so a burst is met as fast as it arrives. Under a burst the number
              forked per tick doubles (1, 2, 4, ...) while demand lasts, and at most
              ``max_spawn_rate`` (32) are forked in any second (php-fpm's
              ``pm.max_spawn_rate``); above
              ``max_spare`` one idle worker is retired per second, so a pool shrinks
              gently after a burst instead of thrashing.
``ondemand``  no worker at rest; the master watches the listening socket and forks when
              a connection waits and no worker is idle; a worker idle for
              ``idle_timeout`` seconds is retired.

With ``workers.threads`` > 1, demand is busy *threads*, not busy processes: a worker
running 3 requests on 16 threads still has room for 13, so :func:`threaded_view` turns
free threads into whole workers' worth of spare capacity before the rules above apply.

``max_children_reached`` counts the times the pool wanted more workers than
``max_workers`` allows (once per episode, not once per tick).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Tuple

if TYPE_CHECKING:  # the settings' type only: the rules load no module of the shell
    from ..config import WorkersConfig

MAX_SPAWN_RATE = 32
RETIRE_EVERY = 1.0


@dataclass
class PoolView:
    """The current generation as the master sees it at one tick."""

    total: int
    idle: int
    busy: int
    starting: int
    now: float
    idle_since: Dict[int, float] = field(default_factory=dict)  # pid -> when it became idle
    waiting: int = 0  # connections in the listen queue (0 if unknown)


@dataclass
class Decision:
    spawn: int = 0
    retire: List[int] = field(default_factory=list)
    reached_max: bool = False


class PoolSizer:
    """Remembers what the rules need between ticks (spawn rate, last retirement)."""

    def __init__(self, workers_cfg: WorkersConfig) -> None:
        self.cfg = workers_cfg
        self.spawn_rate = 1
        self.window_start = -1.0  # workers.max_spawn_rate: forks counted per second
        self.window_spawned = 0
        self.last_retire = 0.0
        self.at_max = False

    def decide(self, view: PoolView) -> Decision:
        if self.cfg.mode == "dynamic":
            return self._dynamic(view)
        if self.cfg.mode == "ondemand":
            return self._ondemand(view)
        return Decision()

    def _grow(self, want: int, view: PoolView, decision: Decision) -> None:
        room = self.cfg.max_workers - view.total
        if want <= 0:
            self.spawn_rate = 1
            self.at_max = False
            return
        if room <= 0:
            if not self.at_max:
                decision.reached_max = True
                self.at_max = True
            return
        limit = self.cfg.max_spawn_rate
        if self.window_start < 0 or view.now - self.window_start >= 1.0:
            self.window_start, self.window_spawned = view.now, 0
        decision.spawn = max(0, min(want, room, self.spawn_rate, limit - self.window_spawned))
        self.window_spawned += decision.spawn
        self.spawn_rate = min(self.spawn_rate * 2, limit)
        if decision.spawn < want and decision.spawn == room and not self.at_max:
            decision.reached_max = True
            self.at_max = True

    def _dynamic(self, view: PoolView) -> Decision:
        d = Decision()
        # Short of spare workers, or connections already waiting in the listen queue.
        want = max(self.cfg.min_spare - view.idle, view.waiting - view.idle) - view.starting
        self._grow(want, view, d)
        # Never retire while more connections wait than workers are idle (growing).
        if (view.idle > self.cfg.max_spare and view.waiting <= view.idle
                and view.now - self.last_retire >= RETIRE_EVERY):
            oldest_idle = sorted(view.idle_since.items(), key=lambda kv: kv[1])
            if oldest_idle:
                d.retire.append(oldest_idle[0][0])
                self.last_retire = view.now
        return d

    def _ondemand(self, view: PoolView) -> Decision:
        d = Decision()
        want = 0
        if view.waiting > 0 and view.idle == 0:
            want = max(1, view.waiting) - view.starting
        self._grow(want, view, d)
        for pid, since in view.idle_since.items():
            if view.now - since >= self.cfg.idle_timeout:
                d.retire.append(pid)
        return d


def threaded_view(mode: str, threads: int, free_threads: int, workers_with_room: int,
                  ready: int, waiting: int) -> Tuple[int, int, int]:
    """(idle, busy, waiting) in workers, for pools whose workers run ``threads`` each.

    ``dynamic`` keeps spare *capacity*: idle is the free threads in whole workers, so 16
    free threads spread over 4 workers of 16 count as one spare worker. ``ondemand`` forks
    only when no worker can take a connection: idle is the workers with a free thread.
    Waiting connections are counted in the workers needed to run them.
    """
    idle = workers_with_room if mode == "ondemand" else free_threads // threads
    idle = min(idle, ready)
    return idle, ready - idle, -(-waiting // threads)
