"""Capacity, ondemand mode: no worker at rest, one forked for the first request, none again
after ``idle_timeout``; and what that first request costs next to a static pool.

Real CLI, real nginx: ``workers.mode = "ondemand"``, ``idle_timeout = 2``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, List

import psutil
from support import fcgi_request

from .support import (
    assert_mode,
    burst,
    cap_manager,
    figure,
    get,
    nginx_error_lines,
    poll,
    rss_per_worker,
)

IDLE_TIMEOUT = 2


def _empty(manager: Any) -> tuple:
    data = manager.status()
    return data["workers"] == [], data["workers"]


def test_ondemand_starts_empty_serves_then_empties_after_idle_timeout(
        make_manager: Callable[..., Any], make_nginx: Callable[..., Any]) -> None:
    manager = cap_manager(make_manager, "combo:app", mode="ondemand", max_workers=4,
                          idle_timeout=IDLE_TIMEOUT)
    result = manager.start()
    figure("ondemand: start took", result.seconds, "s")
    rest = assert_mode(manager, "ondemand")
    assert rest["workers"] == [], rest
    nginx = make_nginx(manager.bind)
    master = psutil.Process(rest["pid"])

    cold: List[float] = []
    for round_no in range(2):
        cpu_before = sum(master.cpu_times()[:2])
        first = get(nginx.port, "/hello")
        assert first.status == 200, first
        cold.append(first.seconds)
        warm = get(nginx.port, "/hello")
        assert warm.status == 200, warm
        served = manager.status()
        assert len(served["workers"]) == 1, served["workers"]
        assert served["totals"]["accepted"] >= 2 * (round_no + 1)
        if round_no == 0:
            figure("ondemand: warm request (worker alive)", warm.seconds * 1000, "ms")
            rss = rss_per_worker(served)
            if rss:
                figure("ondemand: RSS of the worker", rss[0] / 2**20, "MiB")
        idle_from = time.monotonic()
        poll(lambda: _empty(manager), IDLE_TIMEOUT + 10, "the ondemand pool to empty")
        emptied = time.monotonic() - idle_from
        figure(f"ondemand: round {round_no + 1}: cold first request", first.seconds * 1000,
               "ms")
        figure(f"ondemand: round {round_no + 1}: pool empty after", emptied, "s")
        # Retired for being idle, not earlier than idle_timeout (minus the status call).
        assert IDLE_TIMEOUT - 0.5 <= emptied <= IDLE_TIMEOUT + 5, emptied
        # The master sat quiet while the pool started, served and emptied.
        cpu = sum(master.cpu_times()[:2]) - cpu_before
        figure(f"ondemand: round {round_no + 1}: master CPU", cpu, "s")
        assert cpu < 1.0, cpu

    final = manager.status()
    assert final["totals"]["crashes"] == 0
    assert final["totals"]["accepted"] == 4
    assert all(s < 2.0 for s in cold), cold
    assert not nginx_error_lines(nginx.error_log())
    manager.stop()

    # The same first request against a static pool of one (already forked).
    static = cap_manager(make_manager, "combo:app", name="static", count=1)
    static.start()
    nginx2 = make_nginx(static.bind)
    first = get(nginx2.port, "/hello")
    assert first.status == 200, first
    warm = get(nginx2.port, "/hello")
    figure("static: first request", first.seconds * 1000, "ms")
    figure("static: second request", warm.seconds * 1000, "ms")
    figure("ondemand/static first-request latency",
           min(cold) / max(first.seconds, 1e-6), "x")


def test_ondemand_master_stays_quiet_while_a_worker_starts(
        make_manager: Callable[..., Any]) -> None:
    """Without preload each ondemand worker imports the app (here for 1 s) before it
    accepts: the master must wait for it, not wake up on the waiting connection again
    and again."""
    manager = cap_manager(make_manager, "slow_import:app", mode="ondemand", max_workers=2,
                          idle_timeout=30)
    manager.update("app", preload=False)
    manager.start()
    master = psutil.Process(manager.status()["pid"])
    cpu_before = sum(master.cpu_times()[:2])
    started = time.monotonic()
    reply = fcgi_request(manager.bind, "/")
    took = time.monotonic() - started
    cpu = sum(master.cpu_times()[:2]) - cpu_before
    assert reply.status_code == 200 and reply.body == b"imported\n", reply
    figure("ondemand without preload: first request (1 s import)", took, "s")
    figure("ondemand without preload: master CPU meanwhile", cpu, "s")
    assert 1.0 <= took < 5.0
    assert cpu < 0.3 * took, cpu


def test_ondemand_burst_grows_to_max_workers_then_empties(
        make_manager: Callable[..., Any], make_nginx: Callable[..., Any]) -> None:
    """8 concurrent 1 s requests, max_workers 4: four workers serve two rounds each (about
    2 s in all), the ceiling is counted once, and all four retire after idle_timeout."""
    manager = cap_manager(make_manager, "combo:app", mode="ondemand", max_workers=4,
                          idle_timeout=IDLE_TIMEOUT)
    manager.start()
    nginx = make_nginx(manager.bind)
    started = time.monotonic()
    replies = burst(nginx.port, ["/sleep?s=1"] * 8)
    took = time.monotonic() - started
    assert all(r.status == 200 for r in replies), replies
    pids = {int(r.body.split(b"pid ")[1]) for r in replies}
    data = manager.status()
    figure("ondemand: 8 x 1 s requests on max_workers 4 took", took, "s")
    assert len(pids) == 4, pids
    assert took < 4.0, took
    assert data["totals"]["max_children_reached"] == 1, data["totals"]
    assert len(data["workers"]) == 4
    poll(lambda: _empty(manager), IDLE_TIMEOUT + 10, "the ondemand pool to empty")
