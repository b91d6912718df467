"""Helpers for the capacity tests (the suite-wide ones live in ``tests/support.py``).

* :func:`figure` prints every measured number (``pytest -s`` shows them; a failing
  assertion carries them in its message). With ``$CAPACITY_FIGURES`` set to a file path,
  each figure is also appended there as one JSON line.
* :class:`StatusSampler` polls ``fcgi-manager status --json`` (the real CLI) in a thread
  while a load runs, keeping the high marks.
* :func:`burst` sends N concurrent HTTP requests, each on its own connection.
* :func:`run_wrk` runs ``wrk`` with a Lua ``done()`` hook that prints exact figures (p50,
  p99, max, errors by kind) as JSON, instead of scraping its human output.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import psutil
from support import APPS, ProcessTracker, require_program

HERE = Path(__file__).resolve().parent
CAP_APPS = HERE / "apps"

# A location that passes nginx's request start time (seconds.milliseconds) to the app,
# as a deployment using workers.queue_timeout does.
SHED_LOCATION = """
        location /shed/ {{
            include {params};
            fastcgi_param REQUEST_START $msec;
            fastcgi_split_path_info ^(/shed)(.*)$;
            fastcgi_param PATH_INFO $fastcgi_path_info;
            fastcgi_param SCRIPT_NAME $fastcgi_script_name;
            fastcgi_pass fcgi_backend;
        }}
"""

NGINX_ERROR_LEVELS = ("[error]", "[crit]", "[alert]", "[emerg]")


def figure(name: str, value: Any, unit: str = "") -> str:
    """Print one measured figure (and record it); return the text for assertion messages."""
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    text = f"[figure] {name} = {shown}{' ' + unit if unit else ''}"
    print(text, flush=True)
    out = os.environ.get("CAPACITY_FIGURES")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"name": name, "value": value, "unit": unit}) + "\n")
    return text


def app_path() -> List[str]:
    return [str(CAP_APPS), str(APPS)]


def cap_manager(make_manager: Callable[..., Any], module: str, name: str = "app",
                **workers: Any) -> Any:
    """A :class:`support.Manager` for ``module`` (from ``apps/`` here or ``tests/apps``)
    with ``workers`` as its ``[workers]`` keys. The socket is mode 0666, so nginx's
    workers reach it whatever user they run as."""
    manager = make_manager(module, path=app_path(), name=name)
    manager.update("listen", mode="0666")
    manager.update("workers", **workers)
    return manager


def assert_mode(manager: Any, mode: str) -> Dict[str, Any]:
    """``status --json`` has ``mode``; the text status names it on the workers line."""
    data = manager.status()
    assert data["mode"] == mode, data
    text = manager.cli("status")
    assert text.returncode == 0, text
    assert re.search(rf"^workers\s+\d+ \({mode}\b", text.stdout, re.M), text.stdout
    return data


def nginx_error_lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if any(lv in line for lv in NGINX_ERROR_LEVELS)]


def rss_per_worker(data: Dict[str, Any]) -> List[int]:
    return [w["rss_bytes"] for w in data["workers"] if w.get("rss_bytes")]


def uss_per_worker(data: Dict[str, Any]) -> List[int]:
    """Memory only each worker holds (not shared with the master or the other workers:
    with ``app.preload`` most of the RSS that ``status`` shows is shared)."""
    out = []
    for w in data["workers"]:
        try:
            out.append(psutil.Process(w["pid"]).memory_full_info().uss)
        except (psutil.Error, OSError):
            pass
    return out


class Reply:
    """One HTTP exchange: status, headers, body, and when it started and ended."""

    def __init__(self, index: int, started: float) -> None:
        self.index = index
        self.started = started
        self.ended = 0.0
        self.status = 0
        self.headers: Dict[str, str] = {}
        self.body = b""
        self.error: Optional[str] = None

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def __repr__(self) -> str:
        return (f"<#{self.index} {self.status or self.error} in {self.seconds:.3f} s "
                f"{self.body[:80]!r}>")


def get(port: int, path: str, timeout: float = 30.0, index: int = 0) -> Reply:
    """One GET on a new connection; errors are recorded, never raised."""
    reply = Reply(index, time.monotonic())
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        reply.body = resp.read()
        reply.status = resp.status
        reply.headers = {k.lower(): v for k, v in resp.getheaders()}
    except (OSError, http.client.HTTPException) as exc:
        reply.error = repr(exc)
    finally:
        reply.ended = time.monotonic()
        conn.close()
    return reply


def burst(port: int, paths: List[str], timeout: float = 60.0) -> List[Reply]:
    """Send every request in ``paths`` at once (one thread and connection each)."""
    with ThreadPoolExecutor(max_workers=len(paths)) as pool:
        futures = [pool.submit(get, port, p, timeout, i) for i, p in enumerate(paths)]
        return [f.result() for f in futures]


class StatusSampler:
    """Polls ``status --json`` through the CLI until stopped; keeps every snapshot's
    worker count (with its time) and the most recent snapshot."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.samples: List[tuple] = []  # (monotonic time, number of workers, totals)
        self.last: Optional[Dict[str, Any]] = None
        self.errors: List[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.manager.status()
            except (AssertionError, ValueError) as exc:
                self.errors.append(str(exc))
                continue
            self.last = data
            self.samples.append((time.monotonic(), len(data["workers"]), data["totals"]))

    def __enter__(self) -> StatusSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(30)

    @property
    def max_workers(self) -> int:
        return max((n for _, n, _ in self.samples), default=0)

    def counts(self) -> List[int]:
        return [n for _, n, _ in self.samples]


# -- wrk ----------------------------------------------------------------------------------

WRK_SCRIPT = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
"""


class WrkResult:
    def __init__(self, raw: Dict[str, Any], output: str) -> None:
        self.raw = raw
        self.output = output
        self.requests = int(raw["requests"])
        self.seconds = raw["duration_us"] / 1e6
        self.rps = self.requests / self.seconds if self.seconds else 0.0
        self.p50 = raw["p50_us"] / 1e6
        self.p90 = raw["p90_us"] / 1e6
        self.p99 = raw["p99_us"] / 1e6
        self.max = raw["max_us"] / 1e6
        self.errors = {k: int(raw[k]) for k in ("connect", "read", "write", "status",
                                                 "timeout")}

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def describe(self) -> str:
        return (f"{self.requests} requests in {self.seconds:.1f} s = {self.rps:.0f} rps; "
                f"p50 {self.p50 * 1000:.2f} ms, p90 {self.p90 * 1000:.2f} ms, p99 "
                f"{self.p99 * 1000:.2f} ms, max {self.max * 1000:.1f} ms; errors "
                f"{self.errors}")


def run_wrk(tmp: Path, port: int, path: str, connections: int, seconds: int,
            threads: int = 2, timeout_s: int = 10, think_ms: int = 0) -> WrkResult:
    """``wrk --latency`` against 127.0.0.1:``port``; every request slower than
    ``timeout_s`` counts as a timeout error (the latency figures include the rest).
    ``think_ms``: each connection pauses that long between a response and its next
    request (not counted in the latency), which caps the offered rate."""
    wrk = require_program("wrk")
    script = Path(tmp) / f"report{think_ms}.lua"
    think = f"\ndelay = function() return {think_ms} end\n" if think_ms else ""
    script.write_text(WRK_SCRIPT + think)
    cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
           f"--timeout={timeout_s}s", "-s", str(script), f"http://127.0.0.1:{port}{path}"]
    tracker = ProcessTracker()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    tracker.add(proc.pid)
    try:
        out, _ = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        tracker.kill_all()
        out, _ = proc.communicate()
        raise AssertionError(f"wrk did not finish: {out.decode(errors='replace')}") from None
    text = out.decode(errors="replace")
    match = re.search(r"^WRK_JSON (\{.*\})$", text, re.M)
    assert proc.returncode == 0 and match, f"wrk failed ({proc.returncode}):\n{text}"
    return WrkResult(json.loads(match.group(1)), text)


def poll(predicate: Callable[[], Any], timeout: float, what: str,
         interval: float = 0.05) -> Any:
    """Like ``support.wait_for``, but the predicate's last value goes into the failure
    message (``predicate`` returns ``(done, detail)``)."""
    deadline = time.monotonic() + timeout
    detail: Any = None
    while True:
        done, detail = predicate()
        if done:
            return detail
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; "
                                 f"last seen: {detail}")
        time.sleep(interval)
