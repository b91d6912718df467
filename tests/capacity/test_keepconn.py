"""Capacity, keep-conn without pinned workers.

Two workers behind nginx with ``fastcgi_keep_conn on`` and an upstream ``keepalive 16``:
nginx caches more connections than there are workers. A worker that holds idle kept
connections must still accept and serve whatever else is ready, so under 32 concurrent
clients for 10 s no request waits for a cached connection to time out (the php-fpm stall,
seconds): none slower than 2 s, none failed, no error in nginx's log. The same 10 s
without keep-conn give the reference throughput.

Then the SPEC's p99 comparison: with keep-conn within 2x of *the same load* without it.
Flat-out clients do not give the same load (keep-conn serves more requests per second,
so more of them queue on each worker), so the comparison uses the same 32 clients with
a pause between requests that offers about a third of the throughput measured without
keep-conn. It alternates 1 s runs against two nginx instances in front of the same pool
and compares the medians of their p99s: one run after the other would compare the
machine's load at two moments as much as the two set-ups.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable, List

import pytest

from .support import (
    WrkResult,
    cap_manager,
    figure,
    nginx_error_lines,
    rss_per_worker,
    run_wrk,
    uss_per_worker,
)

pytestmark = pytest.mark.needs("nginx", "wrk")

CLIENTS = 32
SECONDS = 10
PAIRS = 6
PAIR_SECONDS = 1
OFFERED = 0.35  # of the throughput without keep-conn, flat out


def _check(result: WrkResult, label: str) -> None:
    assert result.failed == 0, f"{label}: {result.describe()}\n{result.output}"
    assert result.requests > CLIENTS * 10, f"{label}: {result.describe()}"
    assert result.max < 2.0, f"{label}: {result.describe()}"


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _report(label: str, result: WrkResult) -> None:
    figure(f"{label}: wrk -c{CLIENTS} -d{SECONDS}s", result.describe())
    figure(f"{label}: rps", round(result.rps))
    figure(f"{label}: p50 / p99 / max",
           f"{_ms(result.p50)} / {_ms(result.p99)} / {_ms(result.max)}", "ms")


def test_keep_conn_with_more_cached_connections_than_workers(
        tmp_path: Path, make_manager: Callable[..., Any],
        make_nginx: Callable[..., Any]) -> None:
    manager = cap_manager(make_manager, "tiny:app", count=2)
    manager.start()
    before = manager.wait_workers(2)
    keep_nginx = make_nginx(manager.bind, keep_conn=True, keepalive=16)
    conf = keep_nginx.conf.read_text()
    assert "fastcgi_keep_conn on" in conf and "keepalive 16" in conf
    plain_nginx = make_nginx(manager.bind, keep_conn=False)
    for nginx in (keep_nginx, plain_nginx):
        warm = nginx.get("/")
        assert warm.status == 200 and warm.body == b"ok\n", warm

    # 1. 32 clients flat out for 10 s, with keep-conn, then without.
    main = run_wrk(tmp_path, keep_nginx.port, "/", CLIENTS, SECONDS)
    _report("keep-conn", main)
    _check(main, "keep-conn")
    reference = run_wrk(tmp_path, plain_nginx.port, "/", CLIENTS, SECONDS)
    _report("no keep-conn", reference)
    _check(reference, "no keep-conn")

    # 2. The same load with and without keep-conn, alternating.
    think_ms = max(1, round(CLIENTS / (OFFERED * reference.rps) * 1000))
    keep: List[WrkResult] = []
    plain: List[WrkResult] = []
    for _ in range(PAIRS):
        keep.append(run_wrk(tmp_path, keep_nginx.port, "/", CLIENTS, PAIR_SECONDS,
                            think_ms=think_ms))
        plain.append(run_wrk(tmp_path, plain_nginx.port, "/", CLIENTS, PAIR_SECONDS,
                             think_ms=think_ms))
    keep_rps = sum(r.requests for r in keep) / sum(r.seconds for r in keep)
    plain_rps = sum(r.requests for r in plain) / sum(r.seconds for r in plain)
    figure("same load: clients pause between requests", think_ms, "ms")
    figure("same load: rps keep-conn / no keep-conn", f"{keep_rps:.0f} / {plain_rps:.0f}")
    for label, runs in (("keep-conn", keep), ("no keep-conn", plain)):
        for run in runs:
            _check(run, label)
        figure(f"same load, {label}: p99 of {PAIRS} alternating {PAIR_SECONDS} s runs",
               [_ms(r.p99) for r in runs], "ms")
    keep_p99 = statistics.median(r.p99 for r in keep)
    plain_p99 = statistics.median(r.p99 for r in plain)
    figure("same load: median p99 keep-conn / no keep-conn",
           f"{_ms(keep_p99)} / {_ms(plain_p99)} ms = {keep_p99 / plain_p99:.2f}x")

    for label, nginx in (("keep-conn", keep_nginx), ("no keep-conn", plain_nginx)):
        text = nginx.error_log()
        errors = nginx_error_lines(text)
        figure(f"{label}: nginx error / warn lines", f"{len(errors)} / {text.count('[warn]')}")
        assert not errors, "\n".join(errors[:20])

    after = manager.status()
    rss = rss_per_worker(after)
    if rss:
        figure("static: RSS per worker after load", max(rss) / 2**20, "MiB")
    uss = uss_per_worker(after)
    if uss:
        figure("static: USS (unshared memory) per worker after load", max(uss) / 2**20, "MiB")
    # The same two workers served everything: none crashed or was replaced.
    assert sorted(w["pid"] for w in after["workers"]) == sorted(
        w["pid"] for w in before["workers"])
    assert after["totals"]["crashes"] == 0 and after["totals"]["timeouts"] == 0
    # (the one start-up warning that www-data could not reach this test's socket under
    # pytest's private temp directory is about the machine, not about the load)
    logged = [line for line in manager.log_text().splitlines()
              if (" ERROR:" in line or " WARNING:" in line or "Traceback" in line)
              and "the web-server user" not in line]
    assert not logged, "\n".join(logged[:20])
    served = after["totals"]["accepted"] - before["totals"]["accepted"]
    assert served >= main.requests + reference.requests + sum(
        r.requests for r in keep + plain)
    # It was the same load: neither set-up fell behind the offered rate.
    assert 0.8 <= keep_rps / plain_rps <= 1.25, (keep_rps, plain_rps)
    # SPEC: p99 with keep-conn within 2x of the same load without it (1 ms of slack so
    # that sub-millisecond figures do not turn scheduling noise into a failure).
    assert keep_p99 <= 2 * plain_p99 + 0.001, (
        [r.describe() for r in keep], [r.describe() for r in plain])
