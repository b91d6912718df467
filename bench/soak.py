#!/usr/bin/env python3
"""Soak test: does the master (or a worker) grow while a pool serves, reloads and recycles?

    python bench/soak.py                 # 2 minutes
    python bench/soak.py --minutes 10
    python bench/soak.py --seconds 15    # the short run CI does

It starts a pool of this checkout's fcgi-manager (``python -m fcgi_manager``) in a
temporary directory, with ``workers.max_requests`` set so workers recycle all the time,
drives it with simple FastCGI clients (one process each, one request per connection, a
small POST body and a 4 KiB answer), runs ``reload`` every ``--reload-every`` seconds, and
samples the RSS of the master and of each worker once a second (psutil). The first reload
comes one second in, inside the warm-up (the first re-executed master image settles a little
above the original one: a step, not growth).

At the end it prints, for the master and for the workers' mean, the RSS at the start and
the end and the slope in KiB per minute: a Theil-Sen estimate (the median of the slopes
between every pair of samples, so a reload or a recycle that happens to fall on a sample
does not swing it) over the samples after a warm-up. The master's slope must stay under
``--max-master-slope`` (200 KiB/min) -- or, for runs too short to resolve that, its whole
rise (median of the last third of the samples minus that of the first third) must stay
within ``--resolution-kib`` -- and no request may fail (reloads and recycles never fail a
request); the exit status is 0 when both hold, 1 when not, 2 when the pool could
not be started. ``--json FILE`` writes every figure and the samples.

Every process it starts is stopped by PID at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fcgi_manager.errors import ControlError  # noqa: E402
from fcgi_manager.wire import control, protocol  # noqa: E402

APP = '''"""The soak app: reads the body, makes some garbage, answers 4 KiB."""
import hashlib


def app(environ, start_response):
    body = environ["wsgi.input"].read()
    rows = [{"n": i, "s": str(i) * 3} for i in range(200)]  # short-lived garbage
    digest = hashlib.sha256(body + repr(rows[-1]).encode()).hexdigest().encode()
    page = (digest + b"\\n") * 64
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(page)))])
    return [page]
'''

BODY = b"soak-" * 200  # 1000 bytes


def fcgi_get(path: str, timeout: float = 10.0) -> Tuple[str, bytes]:
    """One POST over a new connection to the unix socket ``path``: (status, body)."""
    params = {
        "REQUEST_METHOD": "POST", "REQUEST_URI": "/soak", "SCRIPT_NAME": "",
        "PATH_INFO": "/soak", "QUERY_STRING": "", "SERVER_NAME": "localhost",
        "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": str(len(BODY)), "CONTENT_TYPE": "application/octet-stream",
    }
    client = protocol.ClientConnection(1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(protocol.encode_request(params, BODY))
        while not client.response.complete:
            data = sock.recv(65536)
            if not data:
                break
            client.feed(data)
    resp = client.response
    head, _, body = bytes(resp.stdout).partition(b"\r\n\r\n")
    status = ""
    for line in head.decode("latin-1").split("\r\n"):
        if line.lower().startswith("status:"):
            status = line.split(":", 1)[1].strip()
    if not resp.complete:
        status = "incomplete"
    return status, body


def client_loop(path: str, stop: Any, ok: Any, failed: Any, reasons: Any) -> None:
    """One load client (a process): requests in a loop until ``stop`` is set."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while not stop.is_set():
        try:
            status, body = fcgi_get(path)
            good = status.startswith("200") and len(body) == 65 * 64
        except OSError as exc:
            good, status = False, repr(exc)
        if good:
            with ok.get_lock():
                ok.value += 1
        else:
            with failed.get_lock():
                failed.value += 1
            try:
                reasons.put_nowait(status[:200])
            except Exception:
                pass


def theil_sen(points: List[Tuple[float, float]]) -> float:
    """The median slope over every pair of points (robust to a few outliers)."""
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points)
              for x2, y2 in points[i + 1:] if x2 > x1]
    return statistics.median(slopes) if slopes else 0.0


class Pool:
    """The pool under test: its files, its CLI, and every PID it ever showed."""

    def __init__(self, tmp: Path, workers: int, max_requests: int) -> None:
        self.tmp = tmp
        (tmp / "soak_app.py").write_text(APP)
        self.sock = tmp / "soak.sock"
        self.ctl = tmp / "soak.ctl"
        self.pidfile = tmp / "soak.pid"
        self.log = tmp / "soak.log"
        self.config = tmp / "soak.toml"
        self.config.write_text(
            f'[app]\nmodule = "soak_app:app"\npath = ["{tmp}"]\n\n'
            f'[listen]\nbind = "unix:{self.sock}"\n\n'
            f"[workers]\ncount = {workers}\nmax_requests = {max_requests}\n"
            f"max_requests_jitter = {max(1, max_requests // 10)}\ngraceful_timeout = 10\n\n"
            f'[manager]\npidfile = "{self.pidfile}"\ncontrol = "{self.ctl}"\n'
            f'log = "{self.log}"\n')
        self.seen: Dict[int, float] = {}
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT)] + ([self.env["PYTHONPATH"]] if self.env.get("PYTHONPATH") else []))
        self.env.pop("FCGI_MANAGER_CONFIG", None)

    def cli(self, *args: str, wait: bool = True) -> Any:
        cmd = [sys.executable, "-m", "fcgi_manager", "-c", str(self.config), *args]
        if not wait:
            return subprocess.Popen(cmd, cwd=str(self.tmp), env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
        return subprocess.run(cmd, cwd=str(self.tmp), env=self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120)

    def remember(self, pid: int) -> None:
        if pid not in self.seen:
            try:
                self.seen[pid] = psutil.Process(pid).create_time()
            except psutil.Error:
                pass

    def master_pid(self) -> Optional[int]:
        try:
            return int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def status(self) -> Optional[Dict[str, Any]]:
        try:
            data = control.call(str(self.ctl), "status", timeout=5)
        except (ControlError, OSError):
            return None  # mid re-exec: try again next second
        self.remember(data["pid"])
        for w in data["workers"]:
            self.remember(w["pid"])
        return data

    def stop(self) -> None:
        if self.pidfile.exists():
            try:
                self.cli("stop", "--now")
            except subprocess.TimeoutExpired:
                pass
        for pid, created in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    proc.kill()
            except psutil.Error:
                pass


def children(pid: int) -> List[int]:
    """The master's children (its workers, and for a moment a reload's import check),
    read from /proc without asking the master anything."""
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def rss(pid: int) -> Optional[int]:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def run(args: argparse.Namespace, tmp: Path) -> Tuple[int, Dict[str, Any]]:
    duration = args.seconds if args.seconds is not None else args.minutes * 60.0
    reload_every = args.reload_every or max(4.0, duration / 6.0)
    # The first reload comes during the warm-up: the re-executed master settles once a
    # little above the first image (a step, not growth), and is measured from then on.
    warmup = min(max(4.0, duration * 0.1), 30.0)
    pool = Pool(tmp, args.workers, args.max_requests)
    figures: Dict[str, Any] = {"duration_s": duration, "workers": args.workers,
                               "max_requests": args.max_requests, "clients": args.clients,
                               "reload_every_s": reload_every, "warmup_s": warmup}
    started = pool.cli("start")
    if started.returncode != 0:
        print(f"soak: the pool did not start:\n{started.stdout}{started.stderr}",
              file=sys.stderr)
        return 2, figures
    ctx = multiprocessing.get_context("fork")
    stop, ok, failed = ctx.Event(), ctx.Value("q", 0), ctx.Value("q", 0)
    reasons = ctx.Queue(100)
    clients = [ctx.Process(target=client_loop, args=(str(pool.sock), stop, ok, failed,
                                                     reasons), daemon=True)
               for _ in range(args.clients)]
    samples: List[Dict[str, Any]] = []
    reloads: List[float] = []
    reload_failures: List[str] = []
    pending: Optional[subprocess.Popen] = None
    try:
        first = pool.status()
        master = first["pid"] if first else pool.master_pid()
        for c in clients:
            c.start()
        t0 = time.monotonic()
        next_sample = t0
        next_reload = t0 + 1.0
        while True:
            now = time.monotonic()
            if now - t0 >= duration:
                break
            if pending is not None and pending.poll() is not None:
                out = pending.stdout.read().decode(errors="replace") if pending.stdout else ""
                if pending.returncode != 0:
                    reload_failures.append(out.strip()[-500:])
                pending = None
            if pending is None and now >= next_reload and duration - (now - t0) > 3:
                next_reload = now + reload_every
                reloads.append(round(now - t0, 1))
                pending = pool.cli("reload", wait=False)
            workers = children(master) if master else []
            for pid in workers:
                pool.remember(pid)
            m = rss(master) if master else None
            ws = [r for r in (rss(p) for p in workers) if r]
            if m:  # (between recycles there may be no worker for a moment)
                samples.append({"t": round(now - t0, 2), "master_kib": m // 1024,
                                "workers_mean_kib": sum(ws) // len(ws) // 1024 if ws else None,
                                "workers": len(ws), "requests": ok.value})
            next_sample += 1.0
            time.sleep(max(0.0, next_sample - time.monotonic()))  # the sampling period
        if pending is not None:
            pending.wait(60)
            if pending.returncode != 0:
                out = pending.stdout.read().decode(errors="replace") if pending.stdout else ""
                reload_failures.append(out.strip()[-500:])
        final = pool.status()
    finally:
        stop.set()
        for c in clients:
            c.join(15)
            if c.is_alive():
                c.kill()
        pool.stop()
    why = []
    while not reasons.empty():
        why.append(reasons.get_nowait())
    steady = [s for s in samples if s["t"] >= warmup]
    master_slope = theil_sen([(s["t"] / 60.0, s["master_kib"]) for s in steady])
    third = max(1, len(steady) // 3)
    master_rise = (statistics.median(s["master_kib"] for s in steady[-third:])
                   - statistics.median(s["master_kib"] for s in steady[:third])) if steady else 0
    with_workers = [s for s in steady if s["workers_mean_kib"] is not None]
    workers_slope = theil_sen([(s["t"] / 60.0, s["workers_mean_kib"]) for s in with_workers])
    totals = (final or {}).get("totals", {})
    figures.update({
        "requests": ok.value, "failed": failed.value, "failure_reasons": why[:10],
        "reloads": len(reloads), "reload_failures": reload_failures,
        "recycled": totals.get("recycled"), "crashes": totals.get("crashes"),
        "generation": (final or {}).get("generation"), "samples_used": len(steady),
        "master_kib_first": steady[0]["master_kib"] if steady else None,
        "master_kib_last": steady[-1]["master_kib"] if steady else None,
        "workers_mean_kib_first": with_workers[0]["workers_mean_kib"] if with_workers else None,
        "workers_mean_kib_last": with_workers[-1]["workers_mean_kib"] if with_workers else None,
        "master_slope_kib_per_min": round(master_slope, 1),
        "master_rise_kib": master_rise, "resolution_kib": args.resolution_kib,
        "workers_mean_slope_kib_per_min": round(workers_slope, 1),
        "max_master_slope_kib_per_min": args.max_master_slope,
        "samples": samples,
    })
    print(f"soak: {duration:.0f} s, {args.workers} workers (max_requests "
          f"{args.max_requests}), {args.clients} clients: {ok.value} requests, "
          f"{failed.value} failed, {len(reloads)} reloads ({len(reload_failures)} failed), "
          f"{totals.get('recycled')} recycled, {totals.get('crashes')} crashes")
    if with_workers:
        print(f"soak: workers' mean RSS {with_workers[0]['workers_mean_kib']} -> "
              f"{with_workers[-1]['workers_mean_kib']} KiB, slope {workers_slope:+.1f} KiB/min")
    if steady:
        print(f"soak: master RSS {steady[0]['master_kib']} -> {steady[-1]['master_kib']} KiB, "
              f"slope {master_slope:+.1f} KiB/min (limit {args.max_master_slope:g}), rise "
              f"{master_rise:+.0f} KiB first to last third (resolution "
              f"{args.resolution_kib:g})")
    problems = []
    if len(steady) < 5:
        problems.append(f"only {len(steady)} samples after the warm-up")
    if master_slope >= args.max_master_slope and master_rise > args.resolution_kib:
        problems.append(f"the master grows {master_slope:.0f} KiB/min "
                        f"({master_rise:+.0f} KiB first to last third)")
    if failed.value:
        problems.append(f"{failed.value} requests failed: {why[:3]}")
    if reload_failures:
        problems.append(f"{len(reload_failures)} reloads failed: {reload_failures[:1]}")
    if not ok.value:
        problems.append("no request was served")
    for problem in problems:
        print(f"soak: FAIL: {problem}", file=sys.stderr)
    return (1 if problems else 0), figures


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=2.0, help="how long (default 2)")
    length.add_argument("--seconds", type=float, default=None, help="how long, in seconds")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--max-requests", type=int, default=1000,
                        help="workers.max_requests, so workers recycle (default 1000)")
    parser.add_argument("--reload-every", type=float, default=None,
                        help="seconds between reloads (default: a sixth of the run, >= 4)")
    parser.add_argument("--max-master-slope", type=float, default=200.0,
                        help="KiB/min the master's RSS may grow (default 200)")
    parser.add_argument("--resolution-kib", type=float, default=256.0,
                        help="a rise this small over the whole run counts as flat: each "
                        "reload's fresh master lands within about 100 KiB of the last, "
                        "which a short run cannot tell from a slope (default 256)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the pool's directory")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fcgi-soak-"))
    try:
        code, figures = run(args, tmp)
    finally:
        if args.keep_tmp:
            print(f"soak: files kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
