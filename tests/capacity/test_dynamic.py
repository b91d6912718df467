"""Capacity, dynamic mode: a burst grows the pool to max_workers, then it shrinks back.

Real CLI, real nginx: ``workers.mode = "dynamic"``, count 2, min_spare 1, max_spare 2,
max_workers 8. 32 concurrent requests that each sleep 1-2 s arrive at once; the master
sees them waiting in the listen queue and forks (1, 2, 4, ... per tick) up to 8 workers,
counts ``max_children_reached``, and after the burst retires one idle worker per second
until ``max_spare`` idle workers are left.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from .support import (
    StatusSampler,
    assert_mode,
    burst,
    cap_manager,
    figure,
    nginx_error_lines,
    poll,
    rss_per_worker,
)

BURST = 32
MAX_WORKERS = 8


def test_dynamic_pool_grows_to_max_workers_and_shrinks_back(
        make_manager: Callable[..., Any], make_nginx: Callable[..., Any]) -> None:
    manager = cap_manager(make_manager, "combo:app", count=2, mode="dynamic", min_spare=1,
                          max_spare=2, max_workers=MAX_WORKERS, timeout=30)
    manager.start()
    manager.wait_workers(2)
    assert_mode(manager, "dynamic")
    nginx = make_nginx(manager.bind)

    # Sleep 1.0 .. 1.9 s each.
    paths = [f"/sleep?s={1 + (i % 10) / 10:.1f}" for i in range(BURST)]
    with StatusSampler(manager) as sampler:
        started = time.monotonic()
        replies = burst(nginx.port, paths)
        burst_s = time.monotonic() - started

        # Shrinking: back to max_spare (2) idle workers and nothing else.
        def shrunk() -> tuple:
            data = sampler.last
            if data is None:
                return False, None
            states = [w["state"] for w in data["workers"]]
            return states == ["idle", "idle"], states
        poll(shrunk, 30, "the pool to shrink back to 2 idle workers")
        shrunk_at = time.monotonic()

    failed = [r for r in replies if r.status != 200]
    assert not failed, failed
    counts = sampler.counts()
    peak = sampler.max_workers
    reached = sampler.last["totals"]["max_children_reached"]  # type: ignore[index]
    figure("dynamic: burst of 32 x 1-2 s requests took", burst_s, "s")
    figure("dynamic: workers seen (status --json polls)", counts)
    figure("dynamic: max_children_reached", reached)
    figure("dynamic: back to 2 idle workers after the burst in", shrunk_at - started - burst_s,
           "s")
    assert peak == MAX_WORKERS, counts
    assert reached >= 1, sampler.last
    assert max(counts) <= MAX_WORKERS
    # 32 requests of 1.45 s on average need 5.8 s with 8 workers, 23 s with 2: the pool
    # must have grown early in the burst.
    assert burst_s < 12, counts
    # Gentle shrinking: 8 -> 2 is 6 retirements, one per second at most.
    peak_at = next(i for i, (_, n, _) in enumerate(sampler.samples) if n == MAX_WORKERS)
    first_below = next(t for t, n, _ in sampler.samples[peak_at:] if n < MAX_WORKERS)
    figure("dynamic: from the first retirement to 2 workers", shrunk_at - first_below, "s")
    assert shrunk_at - first_below >= 4.0, counts
    served = {int(r.body.split(b"pid ")[1]) for r in replies}
    figure("dynamic: distinct worker pids that served the burst", len(served))
    assert len(served) == MAX_WORKERS, served
    final = manager.status()
    assert final["totals"]["accepted"] >= BURST
    assert final["totals"]["crashes"] == 0 and final["totals"]["timeouts"] == 0
    rss = rss_per_worker(final)
    if rss:
        figure("dynamic: RSS per idle worker", max(rss) / 2**20, "MiB")
    assert not nginx_error_lines(nginx.error_log())
