"""The pool sizing rules (``fcgi_manager.rules.pool.PoolSizer.decide``), tick by tick.

Each test feeds the sizer the snapshots the master would see (``PoolView``) and checks
its decisions, applying them to a small simulated pool where the rule is about how the
pool evolves over several ticks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import pytest

from fcgi_manager.config import WorkersConfig
from fcgi_manager.rules.pool import MAX_SPAWN_RATE, RETIRE_EVERY, Decision, PoolSizer, PoolView


def dynamic(**kwargs: object) -> PoolSizer:
    values = {"mode": "dynamic", "count": 2, "min_spare": 1, "max_spare": 3,
              "max_workers": 8}
    values.update(kwargs)
    return PoolSizer(WorkersConfig(**values))  # type: ignore[arg-type]


def ondemand(**kwargs: object) -> PoolSizer:
    values = {"mode": "ondemand", "max_workers": 8, "idle_timeout": 10.0}
    values.update(kwargs)
    return PoolSizer(WorkersConfig(**values))  # type: ignore[arg-type]


@dataclass
class SimPool:
    """A pool the decisions are applied to: spawned workers are ready (idle) by the next
    tick; ``busy`` of them run requests; ``waiting`` connections sit in the queue."""

    idle_since: Dict[int, float] = field(default_factory=dict)
    busy: int = 0
    waiting: int = 0
    now: float = 1000.0
    next_pid: int = 100

    @property
    def total(self) -> int:
        return len(self.idle_since) + self.busy

    def add_idle(self, n: int, since: float) -> None:
        for _ in range(n):
            self.idle_since[self.next_pid] = since
            self.next_pid += 1

    def view(self) -> PoolView:
        return PoolView(total=self.total, idle=len(self.idle_since), busy=self.busy,
                        starting=0, now=self.now, idle_since=dict(self.idle_since),
                        waiting=self.waiting)

    def apply(self, d: Decision) -> None:
        for pid in d.retire:
            del self.idle_since[pid]
        self.add_idle(d.spawn, self.now)

    def tick(self, sizer: PoolSizer, seconds: float = 0.25) -> Decision:
        d = sizer.decide(self.view())
        self.apply(d)
        self.now += seconds
        return d


def busy_pool(busy: int, waiting: int, idle: int = 0, now: float = 1000.0) -> PoolView:
    return PoolView(total=busy + idle, idle=idle, busy=busy, starting=0, now=now,
                    idle_since={900 + i: now - 1 for i in range(idle)}, waiting=waiting)


# -- static ------------------------------------------------------------------------------

def test_static_never_resizes() -> None:
    sizer = PoolSizer(WorkersConfig(mode="static", count=2))
    for view in (busy_pool(2, 500), busy_pool(0, 0, idle=50)):
        d = sizer.decide(view)
        assert (d.spawn, d.retire, d.reached_max) == (0, [], False)


# -- dynamic: growing --------------------------------------------------------------------

def test_dynamic_spawn_rate_doubles_up_to_32_while_demand_lasts() -> None:
    sizer = dynamic(max_workers=1000, max_spare=1000)
    spawned = []
    total = 0
    for second in range(9):  # a second apart: max_spawn_rate (32) bounds each second
        d = sizer.decide(busy_pool(total, waiting=10_000, now=1000.0 + second))
        spawned.append(d.spawn)
        total += d.spawn
        assert not d.retire
    assert spawned == [1, 2, 4, 8, 16, 32, 32, 32, 32]
    assert MAX_SPAWN_RATE == 32


def test_dynamic_spawn_rate_resets_when_demand_ends() -> None:
    sizer = dynamic(max_workers=1000, max_spare=1000)
    assert [sizer.decide(busy_pool(n, 10_000)).spawn for n in (0, 1, 3)] == [1, 2, 4]
    # Demand met: enough idle workers, nothing waiting.
    assert sizer.decide(busy_pool(7, waiting=0, idle=1)).spawn == 0
    # A new burst starts again at one worker per tick.
    assert [sizer.decide(busy_pool(8, 10_000)).spawn for _ in range(3)] == [1, 2, 4]


def test_dynamic_spawn_is_capped_by_demand() -> None:
    sizer = dynamic(max_workers=100)
    for n in (0, 1, 3):  # rate grows to 8 ...
        sizer.decide(busy_pool(n, 10_000))
    assert sizer.spawn_rate == 8
    # ... but 3 waiting connections and no idle worker ask for 3.
    assert sizer.decide(busy_pool(7, waiting=3)).spawn == 3


def test_dynamic_keeps_min_spare_idle_workers() -> None:
    sizer = dynamic(min_spare=2, max_spare=4)
    # Two busy, none idle, nothing queued: two spares are wanted (rate 1, then 2).
    assert sizer.decide(busy_pool(2, 0)).spawn == 1
    assert sizer.decide(busy_pool(2, 0, idle=1)).spawn == 1
    assert sizer.decide(busy_pool(2, 0, idle=2)).spawn == 0


def test_dynamic_queue_demand_counts_beyond_min_spare() -> None:
    sizer = dynamic(min_spare=1, max_workers=50)
    # One idle worker satisfies min_spare, but 5 connections wait: 4 more are needed.
    view = busy_pool(busy=3, waiting=5, idle=1)
    assert sizer.decide(view).spawn == 1  # rate 1 on the first tick of the burst
    assert sizer.decide(view).spawn == 2
    assert sizer.decide(view).spawn == 4
    assert sizer.decide(view).spawn == 4  # demand caps it, not the rate (8)


def test_dynamic_workers_still_starting_count_against_demand() -> None:
    sizer = dynamic(max_workers=50)
    view = PoolView(total=6, idle=0, busy=2, starting=4, now=1000.0, waiting=4)
    assert sizer.decide(view).spawn == 0
    view = PoolView(total=6, idle=0, busy=2, starting=4, now=1000.0, waiting=6)
    assert sizer.decide(view).spawn == 1


def test_dynamic_never_above_max_workers() -> None:
    sizer = dynamic(max_workers=8)
    pool = SimPool(busy=2)
    for _ in range(40):
        pool.waiting = 1000
        d = pool.tick(sizer)
        pool.busy += len(pool.idle_since)  # every new worker takes a waiting request
        pool.idle_since.clear()
        assert pool.total <= 8, d
    assert pool.total == 8


def test_dynamic_reached_max_counted_once_per_episode() -> None:
    sizer = dynamic(max_workers=8)
    pool = SimPool(busy=2, waiting=1000)
    hits = []
    for _ in range(30):  # grows 2 -> 8, then sits at the ceiling under demand
        d = pool.tick(sizer)
        hits.append(d.reached_max)
        pool.busy += len(pool.idle_since)
        pool.idle_since.clear()
    assert pool.total == 8
    assert hits.count(True) == 1, hits
    # The burst ends: a worker goes idle, nothing waits.
    pool.busy -= 1
    pool.waiting = 0
    pool.add_idle(1, pool.now)
    assert not pool.tick(sizer).reached_max
    # A second burst at the ceiling is a new episode: counted once more.
    pool.busy += 1
    pool.idle_since.clear()
    pool.waiting = 1000
    second = [pool.tick(sizer).reached_max for _ in range(10)]
    assert second.count(True) == 1, second


def test_dynamic_reached_max_when_spawn_is_cut_by_the_ceiling() -> None:
    sizer = dynamic(max_workers=8)
    for n in (0, 1, 3):  # rate -> 8
        sizer.decide(busy_pool(n, 10_000))
    d = sizer.decide(busy_pool(7, 10_000))  # 1 room left, far more wanted
    assert d.spawn == 1 and d.reached_max
    d = sizer.decide(busy_pool(8, 10_000))
    assert d.spawn == 0 and not d.reached_max


def test_dynamic_filling_the_last_room_exactly_is_not_reached_max() -> None:
    sizer = dynamic(max_workers=8)
    d = sizer.decide(busy_pool(7, waiting=1))
    assert d.spawn == 1 and not d.reached_max


# -- dynamic: shrinking ------------------------------------------------------------------

def test_dynamic_retires_one_idle_worker_per_second_longest_idle_first() -> None:
    sizer = dynamic(max_spare=2)
    pool = SimPool()
    t0 = pool.now
    # 8 idle workers that went idle at different times (pid 100 last, pid 107 first).
    for i in range(8):
        pool.idle_since[100 + i] = t0 - 1 - i
    expected_order = [107, 106, 105, 104, 103, 102]
    retired: List[int] = []
    retire_times: List[float] = []
    while pool.now < t0 + 20:
        d = pool.tick(sizer, 0.25)
        assert d.spawn == 0
        assert len(d.retire) <= 1
        if d.retire:
            retired += d.retire
            retire_times.append(pool.now - 0.25)
    assert retired == expected_order
    assert len(pool.idle_since) == 2  # back to max_spare, and it stays there
    gaps = [b - a for a, b in zip(retire_times, retire_times[1:])]
    assert all(g >= RETIRE_EVERY for g in gaps), gaps
    assert retire_times[-1] - retire_times[0] <= RETIRE_EVERY * 5 + 0.25


def test_dynamic_does_not_retire_at_or_below_max_spare() -> None:
    sizer = dynamic(min_spare=1, max_spare=3)
    view = PoolView(total=3, idle=3, busy=0, starting=0, now=5000.0,
                    idle_since={1: 0.0, 2: 0.0, 3: 0.0})
    assert sizer.decide(view).retire == []


def test_dynamic_does_not_retire_while_more_connections_wait_than_workers_idle() -> None:
    # 4 idle (above max_spare 3) but 10 connections queued: the idle ones are about to be
    # busy. Retiring one now and forking another in the same tick is pure churn.
    sizer = dynamic(min_spare=1, max_spare=3, max_workers=20)
    view = PoolView(total=8, idle=4, busy=4, starting=0, now=5000.0, waiting=10,
                    idle_since={1: 10.0, 2: 11.0, 3: 12.0, 4: 13.0})
    d = sizer.decide(view)
    assert d.spawn == 1
    assert d.retire == []
    # Once the queue is drained, the surplus is retired as usual.
    view = PoolView(total=8, idle=4, busy=4, starting=0, now=5001.0, waiting=0,
                    idle_since={1: 10.0, 2: 11.0, 3: 12.0, 4: 13.0})
    assert sizer.decide(view).retire == [1]


def test_dynamic_never_retires_busy_workers() -> None:
    sizer = dynamic(max_spare=0, min_spare=0)
    view = PoolView(total=4, idle=1, busy=3, starting=0, now=5000.0, idle_since={7: 1.0})
    assert sizer.decide(view).retire == [7]


# -- ondemand ----------------------------------------------------------------------------

def test_ondemand_no_worker_at_rest() -> None:
    sizer = ondemand()
    view = PoolView(total=0, idle=0, busy=0, starting=0, now=1000.0)
    assert sizer.decide(view) == Decision()


def test_ondemand_spawns_when_a_connection_waits_and_no_worker_is_idle() -> None:
    sizer = ondemand()
    d = sizer.decide(PoolView(total=0, idle=0, busy=0, starting=0, now=1.0, waiting=1))
    assert d.spawn == 1
    # The new worker is still starting: no second one for the same connection.
    d = sizer.decide(PoolView(total=1, idle=0, busy=0, starting=1, now=1.1, waiting=1))
    assert d.spawn == 0


def test_ondemand_no_spawn_while_a_worker_is_idle() -> None:
    sizer = ondemand()
    view = PoolView(total=1, idle=1, busy=0, starting=0, now=1.0, waiting=3,
                    idle_since={5: 0.5})
    assert sizer.decide(view).spawn == 0


def test_ondemand_grows_with_the_queue_up_to_max_workers() -> None:
    sizer = ondemand(max_workers=4)
    pool = SimPool(waiting=100)
    reached = []
    for _ in range(10):
        reached.append(pool.tick(sizer).reached_max)
        pool.busy += len(pool.idle_since)
        pool.idle_since.clear()
    assert pool.total == 4
    assert reached.count(True) == 1


def test_ondemand_retires_after_idle_timeout() -> None:
    sizer = ondemand(idle_timeout=2.0)
    pool = SimPool()
    pool.idle_since = {10: pool.now, 11: pool.now + 0.5}
    assert pool.tick(sizer, 1.0).retire == []  # idle 0 s
    assert pool.tick(sizer, 0.75).retire == []  # idle 1 s
    assert pool.tick(sizer, 0.5).retire == []  # idle 1.75 s
    assert pool.tick(sizer, 0.5).retire == [10]  # idle 2.25 s (11: 1.75 s)
    assert pool.tick(sizer, 0.5).retire == [11]
    assert pool.total == 0


@pytest.mark.parametrize("mode", ["dynamic", "ondemand"])
def test_decisions_never_retire_and_spawn_past_the_ceiling(mode: str) -> None:
    sizer = dynamic(max_workers=3) if mode == "dynamic" else ondemand(max_workers=3)
    d = sizer.decide(busy_pool(busy=3, waiting=50))
    assert d.spawn == 0 and d.reached_max
