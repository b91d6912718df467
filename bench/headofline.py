"""Head-of-line blocking with keep-conn: one slow request must not stall the fast ones.

    python bench/headofline.py                 # 3 alternating rounds of 10 s, ~1.5 min
    python bench/headofline.py --checkout DIR  # the same against another checkout

A real nginx (``fastcgi_keep_conn on`` through ``upstream { keepalive 16; }``, and a
location without keep-conn) in front of fcgi-manager with 4 workers running
``apps:mixed``. During each run one client keeps a 1-second request running at all times
(``.../slow``, sent again as soon as it returns) and wrk sends instant requests on 8
connections. Runs alternate keep-conn off and on, so both see the same machine.

nginx reuses its cached upstream connections most recently used first: without hand-off,
the connections parked in the worker that runs the slow request wait for it (p99 and max
near 1 s). With hand-off the worker lets go of them within a few milliseconds.

Reports, per mode: rps, p50 / p99 / max of the fast requests (median over the rounds, and
the worst max), failed requests, slow requests completed, and nginx ``[error]`` lines.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import nginx as nginx_conf  # noqa: E402
from benchlib import wrk  # noqa: E402
from benchlib.deps import ensure_system_tools  # noqa: E402
from benchlib.procs import (  # noqa: E402
    ProcessRegistry,
    free_loopback_port,
    unix_socket_accepts,
    wait_until,
)

WORKERS = 4
FAST_CLIENTS = 8
NAME = "fcgi-manager"


class SlowClient:
    """Keeps one slow request running through nginx until stopped."""

    def __init__(self, port: int, path: str) -> None:
        self.port = port
        self.path = path
        self.done = 0
        self.failed: List[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self._stop.is_set():
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    self.done += 1
                else:
                    self.failed.append(str(resp.status))
            except (OSError, http.client.HTTPException) as exc:
                self.failed.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.close()

    def __enter__(self) -> SlowClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(35)


def run_round(registry: ProcessRegistry, wrk_bin: str, port: int, mode: str,
              seconds: float, tmp: Path, errors: nginx_conf.ErrorLog) -> Dict[str, Any]:
    base = f"/{NAME}/{mode}/"
    mark = errors.mark()
    with SlowClient(port, base + "slow") as slow:
        time.sleep(0.2)  # the slow request is running before the fast load begins
        result = wrk.run(registry, wrk_bin, f"http://127.0.0.1:{port}{base}", FAST_CLIENTS,
                         seconds, 5, tmp / f"wrk-{mode}.log")
    nginx_errors = [line for line in errors.lines_since(mark) if "[error]" in line]
    return {"mode": mode, "rps": result.rps, "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms, "max_ms": result.max_ms, "failed": result.errors,
            "slow_done": slow.done, "slow_failed": len(slow.failed),
            "nginx_errors": len(nginx_errors), "first_error": nginx_errors[:1]}


def summarize(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    for mode in ("off", "on"):
        runs = [r for r in rows if r["mode"] == mode]
        out.append({
            "keep-conn": mode,
            "rps": statistics.median(r["rps"] for r in runs),
            "p50 ms": statistics.median(r["p50_ms"] for r in runs),
            "p99 ms": statistics.median(r["p99_ms"] for r in runs),
            "max ms (worst)": max(r["max_ms"] for r in runs),
            "failed": sum(r["failed"] + r["slow_failed"] for r in runs),
            "slow done": sum(r["slow_done"] for r in runs),
            "nginx [error]": sum(r["nginx_errors"] for r in runs),
        })
    return out


def table(rows: List[Dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|---|" + "---:|" * (len(keys) - 1)]
    for r in rows:
        cells = [f"{r[k]:,.2f}" if isinstance(r[k], float) else f"{r[k]:,}" if isinstance(
            r[k], int) else str(r[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating off/on rounds")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    ap.add_argument("--checkout", default=str(HERE.parent),
                    help="the fcgi-manager checkout to run (default: this one)")
    ap.add_argument("--keep-tmp", action="store_true",
                    help="keep the temp dir (nginx.conf and both logs) and print its path")
    args = ap.parse_args()
    tools = ensure_system_tools(install=False)
    registry = ProcessRegistry()
    rows: List[Dict[str, Any]] = []
    tmpname = tempfile.mkdtemp(prefix="fcgi-hol-")
    tmp = Path(tmpname)
    try:
        sock = tmp / "fcgi.sock"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), args.checkout])
        try:
            manager = registry.start(NAME, [
                sys.executable, "-m", "fcgi_manager", "run", "apps:mixed", "--bind",
                f"unix:{sock}", "--workers", str(WORKERS)], tmp / "fcgi-manager.log",
                env=env, cwd=tmp)
            wait_until(lambda: unix_socket_accepts(sock), 30, "fcgi-manager", manager)
            port = free_loopback_port()
            conf = tmp / "nginx.conf"
            conf.write_text(nginx_conf.render_config(
                tmp, port, [nginx_conf.Backend(NAME, "fastcgi", sock)]))
            server = registry.start("nginx", nginx_conf.command(tools["nginx"], tmp, conf),
                                    tmp / "nginx.out")
            wait_until(lambda: nginx_conf.http_status(port, f"/{NAME}/on/") == 200, 30,
                       "nginx", server)
            errors = nginx_conf.ErrorLog(tmp / "nginx-error.log")
            for i in range(args.rounds):
                for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
                    row = run_round(registry, tools["wrk"], port, mode, args.duration, tmp,
                                    errors)
                    rows.append(row)
                    print(f"round {i + 1} keep-conn {mode}: {row}", flush=True)
        finally:
            registry.stop_all()
    finally:
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"# Head-of-line: {WORKERS} workers, 1 client keeping a 1 s request running, "
          f"{FAST_CLIENTS} wrk connections of instant requests, {args.rounds} x "
          f"{args.duration:g} s per mode (checkout {args.checkout})\n")
    print(table(summarize(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
