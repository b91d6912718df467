#!/usr/bin/env python3
"""What the master costs while every request fails: an error flood.

    python bench/error_flood.py                  # the log is a file (manager.log = PATH)
    python bench/error_flood.py --log -          # the log is the master's stderr (a pipe)
    python bench/error_flood.py --seconds 10 --clients 4

A master with 2 workers serves ``bench/apps.py:boom``, which raises on every request (a
traceback of about ten lines each) on a unix socket in a temp dir. ``--clients`` client
processes send raw FastCGI requests (the request nginx sends, ``bench/core.py``), one
connection each, back to back, for ``--seconds``. The figure is the master's CPU time
(user + system, psutil) over the run divided by the wall time: the share of one core the
master needs to keep the log written while the workers fail as fast as they can. The
worker's CPU and the errors per second (responses counted by the clients) come with it;
the log's lines are counted to show that none went missing.

Why: a failing app is exactly when the log matters, and a master busy relaying it is a
master late to notice a hung worker. Every process is started here and stopped by PID.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, List, Tuple

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (str(ROOT), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from core import request_bytes  # noqa: E402

from fcgi_manager.wire import protocol  # noqa: E402


def one_request(sock_path: str, data: bytes) -> int:
    """Send one request on its own connection; the HTTP status the worker answered."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        s.sendall(data)
        client = protocol.ClientConnection(1)
        while True:
            chunk = s.recv(262144)
            if not chunk:
                return 0
            resp = client.feed(chunk)
            if resp.complete:
                head = bytes(resp.stdout).split(b"\r\n", 1)[0]
                return int(head.split()[1]) if head.startswith(b"Status:") else 200


def client(sock_path: str, data: bytes, until: float, out: Any) -> None:
    """One client: requests back to back until ``until``; puts (answers, errors)."""
    answers = errors = 0
    while time.time() < until:
        try:
            status = one_request(sock_path, data)
        except OSError:
            status = 0
        answers += 1
        errors += status >= 500
    out.put((answers, errors))


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def cpu_of(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def run(log: str, seconds: float, clients: int, tmp: str) -> Tuple[float, float, float, int]:
    """(master % of a core, workers % of a core, errors/s, log lines) for one run."""
    sock = os.path.join(tmp, "flood.sock")
    log_path = os.path.join(tmp, "flood.log") if log == "file" else "-"
    conf = os.path.join(tmp, "flood.toml")
    Path(conf).write_text(
        f'[app]\nmodule = "apps:boom"\npath = ["{BENCH}"]\n'
        f'[listen]\nbind = "unix:{sock}"\n'
        f'[workers]\ncount = 2\n'
        f'[manager]\nlog = "{log_path}"\npidfile = "{tmp}/flood.pid"\n'
        f'control = "{tmp}/flood.ctl"\n')
    stderr_path = os.path.join(tmp, "stderr.log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(BENCH)]))
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fcgi_manager", "-c", conf, "run"],
                                env=env, cwd=tmp, stdout=err, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        data = request_bytes("hello")
        wait_until(lambda: os.path.exists(sock), 30, "the socket")

        def answers() -> bool:
            if proc.poll() is not None:
                raise SystemExit(f"the master exited: see {stderr_path}")
            try:
                return one_request(sock, data) == 500
            except OSError:
                return False
        wait_until(answers, 30, "a first answer")
        master = psutil.Process(proc.pid)
        workers = master.children()
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        until = time.time() + seconds
        m0, w0, t0 = cpu_of(master), sum(cpu_of(w) for w in workers), time.monotonic()
        procs = [ctx.Process(target=client, args=(sock, data, until, out))
                 for _ in range(clients)]
        for p in procs:
            p.start()
        results: List[Tuple[int, int]] = [out.get(timeout=seconds + 60) for _ in procs]
        m1, w1, t1 = cpu_of(master), sum(cpu_of(w) for w in workers), time.monotonic()
        for p in procs:
            p.join(timeout=10)
        wall = t1 - t0
        errors = sum(e for _, e in results)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    source = log_path if log == "file" else stderr_path
    with open(source, "rb") as f:
        lines = f.read().count(b"\n")
    return 100 * (m1 - m0) / wall, 100 * (w1 - w0) / wall, errors / wall, lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", choices=("file", "-"), default="file",
                    help="manager.log: a file in the temp dir, or '-' (the master's stderr)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="flood-") as tmp:
        master, workers, rate, lines = run(args.log, args.seconds, args.clients, tmp)
    print(f"log={args.log} clients={args.clients} seconds={args.seconds:g}: "
          f"master {master:.1f} % of a core, workers {workers:.1f} %, "
          f"{rate:.0f} errors/s, {lines} log lines ({lines / max(rate * args.seconds, 1):.1f}"
          " per error)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
