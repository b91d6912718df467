"""Keep-conn through a real nginx, with idle kept connections handed between workers.

nginx (``fastcgi_keep_conn on``, ``keepalive 16``) reuses its cached connections most
recently used first. Without the hand-off, the ones parked in a worker that runs a slow
request wait for it, and the ones held by a worker that exits are closed under nginx. Each
test runs wrk against nginx and checks nginx's own error log: not one request may fail,
not one ``[error]`` line may appear.
"""

from __future__ import annotations

import http.client
import threading
from pathlib import Path
from typing import Any, Callable, List, Optional

import pytest
from support import wait_for

from .support import WrkResult, cap_manager, figure, nginx_error_lines, run_wrk

pytestmark = pytest.mark.needs("nginx", "wrk")

FAST_CLIENTS = 8


class SlowClient:
    """Keeps one 1-second request running through nginx until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.done = 0
        self.failed: List[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                conn.request("GET", "/slow")
                resp = conn.getresponse()
                if resp.read() == b"ok\n" and resp.status == 200:
                    self.done += 1
                else:
                    self.failed.append(f"{resp.status}")
            except (OSError, http.client.HTTPException) as exc:
                self.failed.append(repr(exc))
            finally:
                conn.close()

    def __enter__(self) -> SlowClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(35)


class Load:
    """wrk on a thread, so that the test can reload, scale or wait meanwhile."""

    def __init__(self, tmp: Path, port: int, seconds: int) -> None:
        self.result: Optional[WrkResult] = None
        self.error: Optional[BaseException] = None

        def run() -> None:
            try:
                self.result = run_wrk(tmp, port, "/", FAST_CLIENTS, seconds, threads=1)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test
                self.error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def wait(self) -> WrkResult:
        self._thread.join(120)
        if self.error is not None:
            raise self.error
        assert self.result is not None, "wrk did not finish"
        return self.result


def _keep_conn_pool(make_manager: Callable[..., Any], make_nginx: Callable[..., Any],
                    **workers: Any) -> Any:
    manager = cap_manager(make_manager, "headofline:app", **workers)
    manager.start()
    manager.wait_workers(workers["count"])
    nginx = make_nginx(manager.bind, keep_conn=True, keepalive=16)
    assert nginx.get("/").body == b"ok\n"
    return manager, nginx


def _assert_clean(label: str, result: WrkResult, nginx: Any, manager: Any) -> None:
    figure(f"{label}: wrk", result.describe())
    errors = nginx_error_lines(nginx.error_log())
    figure(f"{label}: nginx error lines", len(errors))
    assert result.failed == 0, f"{label}: {result.describe()}\n{result.output}"
    assert result.requests > 1000, result.describe()
    assert not errors, "\n".join(errors[:10])
    logged = [line for line in manager.log_text().splitlines()
              if " ERROR:" in line or "Traceback" in line]
    assert not logged, "\n".join(logged[:10])


def test_a_slow_request_does_not_hold_up_the_fast_ones(
        tmp_path: Path, make_manager: Callable[..., Any],
        make_nginx: Callable[..., Any]) -> None:
    """4 workers; one client keeps a 1-second request running; 8 send instant ones."""
    manager, nginx = _keep_conn_pool(make_manager, make_nginx, count=4)
    with SlowClient(nginx.port) as slow:
        wait_for(lambda: any(w["state"] == "busy" for w in manager.status()["workers"]), 10,
                 "the slow request to run")
        result = run_wrk(tmp_path, nginx.port, "/", FAST_CLIENTS, 5, threads=1)
    figure("head-of-line: slow requests completed", slow.done)
    figure("head-of-line: fast p50 / p99 / max",
           f"{result.p50 * 1000:.2f} / {result.p99 * 1000:.2f} / {result.max * 1000:.1f}", "ms")
    _assert_clean("head-of-line", result, nginx, manager)
    assert slow.done >= 3 and not slow.failed, (slow.done, slow.failed)
    assert result.p99 < 0.050, result.describe()


# (threads = 2 with both threads held by 1-s requests is not asserted here: its fast p99
# measured 35 ms to 850 ms from run to run on a 2-core machine, see bench/README.md)
@pytest.mark.parametrize("threads, slow_clients", [(4, 1), (4, 4)])
def test_threaded_workers_let_kept_connections_go_behind_slow_requests(
        tmp_path: Path, make_manager: Callable[..., Any],
        make_nginx: Callable[..., Any], threads: int, slow_clients: int) -> None:
    """2 workers of 4 (or 2) threads; as many clients keep a 1-second request running;
    8 send instant ones. When a worker has every thread held by a slow request, the fast
    requests nginx sends on the kept connections it holds must move to the other."""
    manager, nginx = _keep_conn_pool(make_manager, make_nginx, count=2, threads=threads)
    slows = [SlowClient(nginx.port) for _ in range(slow_clients)]
    for slow in slows:
        slow.__enter__()
    try:
        wait_for(lambda: manager.status()["totals"]["busy_threads"] >= slow_clients, 10,
                 "the slow requests to run")
        result = run_wrk(tmp_path, nginx.port, "/", FAST_CLIENTS, 5, threads=1)
    finally:
        for slow in slows:
            slow.__exit__()
    label = f"threads = {threads}, {slow_clients} slow"
    figure(f"{label}: slow requests completed", sum(s.done for s in slows))
    figure(f"{label}: fast p50 / p99 / max",
           f"{result.p50 * 1000:.2f} / {result.p99 * 1000:.2f} / {result.max * 1000:.1f}", "ms")
    _assert_clean(label, result, nginx, manager)
    for slow in slows:
        assert slow.done >= 3 and not slow.failed, (slow.done, slow.failed)
    assert result.p99 < 0.200, result.describe()


def test_three_reloads_under_keep_conn_load(
        tmp_path: Path, make_manager: Callable[..., Any],
        make_nginx: Callable[..., Any]) -> None:
    manager, nginx = _keep_conn_pool(make_manager, make_nginx, count=2)
    load = Load(tmp_path, nginx.port, 12)
    wait_for(lambda: manager.status()["totals"]["accepted"] > 500, 20, "requests flowing")
    for generation in (2, 3, 4):
        out = manager.cli("reload", timeout=60)
        assert out.returncode == 0, out
        manager.wait_workers(2, timeout=30, generation=generation)
    result = load.wait()
    _assert_clean("3 reloads", result, nginx, manager)


def test_recycling_every_50_requests_under_keep_conn_load(
        tmp_path: Path, make_manager: Callable[..., Any],
        make_nginx: Callable[..., Any]) -> None:
    manager, nginx = _keep_conn_pool(make_manager, make_nginx, count=2, max_requests=50,
                                     max_requests_jitter=0)
    result = run_wrk(tmp_path, nginx.port, "/", FAST_CLIENTS, 6, threads=1)
    recycled = manager.status()["totals"]["recycled"]
    figure("max_requests = 50: workers recycled", recycled)
    _assert_clean("max_requests = 50", result, nginx, manager)
    assert recycled >= 10, recycled


def test_scaling_down_under_keep_conn_load(
        tmp_path: Path, make_manager: Callable[..., Any],
        make_nginx: Callable[..., Any]) -> None:
    manager, nginx = _keep_conn_pool(make_manager, make_nginx, count=4)
    load = Load(tmp_path, nginx.port, 8)
    wait_for(lambda: manager.status()["totals"]["accepted"] > 500, 20, "requests flowing")
    for remaining in (3, 2, 1):
        out = manager.cli("scale", "-1")
        assert out.returncode == 0, out
        wait_for(lambda n=remaining: len(manager.status()["workers"]) == n, 30,
                 f"{remaining} worker(s) left")
    result = load.wait()
    _assert_clean("scale -1 three times", result, nginx, manager)
