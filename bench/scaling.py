"""How cost grows: request body size, response size, and worker count.

    python bench/scaling.py            # about 1-2 minutes
    python bench/scaling.py --quick    # smaller sizes, for a smoke run

Drives fcgi-manager directly with its own FastCGI client over a unix socket (no web server
in between, so what grows is ours alone) and prints a Markdown report:

* **upload size** 1 KiB .. 100 MiB: time per request and the worker's RSS before and after
  (bodies past ``max_body_in_memory`` are spooled to disk: RSS must stay flat);
* **response size** 1 KiB .. 10 MiB: time per request and throughput in MiB/s;
* **worker count** 1, 8, 64: time to answer ``status --json`` on the control socket and
  the master's CPU while idle (the scoreboard makes status independent of traffic).

Every process it starts it stops (``fcgi-manager stop``, then SIGKILL by PID if needed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fcgi_manager.cli import client  # noqa: E402
from fcgi_manager.sockets import Address  # noqa: E402
from fcgi_manager.wire import control  # noqa: E402

APP = textwrap.dedent('''
    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/upload":
            stream = environ["wsgi.input"]
            total = 0
            while True:
                chunk = stream.read(1 << 16)
                if not chunk:
                    break
                total += len(chunk)
            body = str(total).encode()
        elif path.startswith("/bytes/"):
            body = b"x" * int(path[7:])
        else:
            body = b"hello"
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(body)))])
        return [body]
''')


class Pool:
    """One fcgi-manager instance in a temp dir, started and stopped through the CLI."""

    def __init__(self, tmp: Path, workers: int) -> None:
        self.tmp = tmp
        (tmp / "scaleapp.py").write_text(APP)
        self.sock = tmp / "fcgi.sock"
        self.cfg = tmp / "scale.toml"
        self.cfg.write_text(textwrap.dedent(f'''
            [app]
            module = "scaleapp:app"
            path = ["."]
            [listen]
            bind = "unix:{self.sock}"
            backlog = 1024
            [workers]
            count = {workers}
            timeout = 300
            [manager]
            log = "{tmp / 'fcgi.log'}"
        '''))
        self.master_pid = 0

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fcgi_manager", "-c", str(self.cfg), *args],
                              capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        out = self.cli("start")
        if out.returncode != 0:
            raise SystemExit(f"fcgi-manager did not start: {out.stderr}")
        self.master_pid = self.status()["pid"]

    def status(self) -> Dict[str, Any]:
        return json.loads(self.cli("status", "--json").stdout)

    def worker_pids(self) -> List[int]:
        return [w["pid"] for w in self.status()["workers"]]

    def stop(self) -> None:
        self.cli("stop", timeout=60)
        if self.master_pid and psutil.pid_exists(self.master_pid):
            os.kill(self.master_pid, signal.SIGKILL)


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def one(params: Dict[str, str], body: bytes, sock: Path) -> client.Reply:
    return client.request(Address("unix", path=str(sock)), params, body, timeout=300)


def upload_sizes(pool: Pool, sizes: List[int]) -> List[Dict[str, Any]]:
    rows = []
    pid = pool.worker_pids()[0]
    for size in sizes:
        body = os.urandom(1024) * (size // 1024)
        params = client.build_params("/upload", "POST", {}, len(body))
        before = max(rss(p) for p in pool.worker_pids())
        reps = max(1, min(200, (64 << 20) // max(size, 1)))
        started = time.perf_counter()
        for _ in range(reps):
            reply = one(params, body, pool.sock)
            assert reply.body == str(len(body)).encode(), reply.body[:100]
        per = (time.perf_counter() - started) / reps
        after = max(rss(p) for p in pool.worker_pids())
        rows.append({"size": size, "ms_per_request": per * 1000, "MiB_per_s": size / per / 2**20,
                     "worker_rss_before_MiB": before / 2**20, "worker_rss_after_MiB": after / 2**20,
                     "rss_growth_MiB": (after - before) / 2**20})
        del body
    del pid
    return rows


def response_sizes(pool: Pool, sizes: List[int]) -> List[Dict[str, Any]]:
    rows = []
    for size in sizes:
        params = client.build_params(f"/bytes/{size}")
        reps = max(1, min(2000, (256 << 20) // max(size, 1)))
        started = time.perf_counter()
        for _ in range(reps):
            reply = one(params, b"", pool.sock)
            assert len(reply.body) == size
        per = (time.perf_counter() - started) / reps
        rows.append({"size": size, "ms_per_request": per * 1000,
                     "MiB_per_s": size / per / 2**20})
    return rows


def worker_counts(tmp: Path, counts: List[int]) -> List[Dict[str, Any]]:
    rows = []
    for n in counts:
        d = tmp / f"w{n}"
        d.mkdir()
        pool = Pool(d, n)
        pool.start()
        try:
            ctl = str(d / "scale.fcgi-manager.ctl")
            timings = []
            for _ in range(50):
                t = time.perf_counter()
                control.call(ctl, "status")
                timings.append(time.perf_counter() - t)
            master = psutil.Process(pool.master_pid)
            cpu0 = master.cpu_times()
            time.sleep(3.0)  # measuring window: the master's idle CPU
            cpu1 = master.cpu_times()
            idle_cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / 3.0 * 100
            params = client.build_params("/")
            t = time.perf_counter()
            for _ in range(500):
                one(params, b"", pool.sock)
            per_req = (time.perf_counter() - t) / 500
            timings.sort()
            rows.append({"workers": n, "status_ms_median": timings[len(timings) // 2] * 1000,
                         "status_ms_max": timings[-1] * 1000, "master_idle_cpu_percent": idle_cpu,
                         "hello_ms_per_request": per_req * 1000})
        finally:
            pool.stop()
    return rows


def table(rows: List[Dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:,.2f}" if isinstance(r[k], float) else f"{r[k]:,}"
                                       for k in keys) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    kib, mib = 1024, 1024 * 1024
    uploads = [kib, 64 * kib, mib, 10 * mib] + ([] if args.quick else [100 * mib])
    responses = [kib, 16 * kib, 256 * kib, mib] + ([] if args.quick else [10 * mib])
    counts = [1, 8] if args.quick else [1, 8, 64]
    with tempfile.TemporaryDirectory(prefix="fcgi-scaling-") as tmpname:
        tmp = Path(tmpname)
        (tmp / "one").mkdir()
        pool = Pool(tmp / "one", 1)
        pool.start()
        try:
            up = upload_sizes(pool, uploads)
            down = response_sizes(pool, responses)
        finally:
            pool.stop()
        wc = worker_counts(tmp, counts)
    report = "\n\n".join([
        "# How cost grows (fcgi-manager, one worker, own FastCGI client on a unix socket)",
        "## Request body size\n\n" + table(up),
        "## Response size\n\n" + table(down),
        "## Worker count (status on the control socket; master idle CPU)\n\n" + table(wc),
    ]) + "\n"
    print(report)
    if not args.quick:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (out / f"scaling-{stamp}.md").write_text(report)
        (out / f"scaling-{stamp}.json").write_text(json.dumps(
            {"uploads": up, "responses": down, "workers": wc}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
