#!/usr/bin/env python3
"""What one request costs a worker, counted rather than timed: user-space instructions
(callgrind), system calls (strace -c) and CPU time, for fcgi-manager's compiled request
core, its pure-Python core, and uWSGI's worker.

    python bench/worker_cost.py                          # both fcgi-manager cores
    python bench/worker_cost.py --uwsgi /path/to/uwsgi   # and uWSGI
    python bench/worker_cost.py --apps hello,page --requests 2000

Each server runs one worker on a unix socket in a temp dir and serves ``bench/apps.py``.
A client in this process sends the request nginx sends for ``GET /hello`` (25 params,
``bench/core.py``; the 64 KiB POST for ``post``), one connection per request as nginx does
without keep-conn, 16 connections queued at a time so that the worker serves them back to
back as under load; each count is the worker's own.

* **instructions**: the server runs under ``valgrind --tool=callgrind`` (forked workers are
  followed); two runs serve ``low`` and ``high`` requests, and the worker's difference
  divided by ``high - low`` is the cost of one request, start-up excluded. The count is
  the same from run to run whatever else the machine does.
* **system calls**: ``strace -c -f`` attached to the worker while it serves ``--requests``.
* **CPU µs**: the time the worker ran on a CPU (user and kernel, ``/proc/PID/schedstat``)
  over ``--requests``, the least of 5 runs, without valgrind or strace: steadier than
  requests/s on a shared machine, but still moved by what else runs (caches, frequency).

Every process is started by this script and stopped by PID; only a unix socket is used.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for path in (str(ROOT), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

from benchlib.syscalls import parse_summary  # noqa: E402
from core import request_bytes  # noqa: E402

from fcgi_manager.wire import protocol  # noqa: E402

START_TIMEOUT = 120.0  # a Python server under valgrind takes a while to start
BATCH = 16  # connections in flight at once, like wrk -c16 behind nginx


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def ask(sock_path: str, data: bytes) -> bytes:
    """One request on its own connection; the response's STDOUT."""
    return ask_many(sock_path, data, 1)


def ask_many(sock_path: str, data: bytes, count: int) -> bytes:
    """``count`` requests at once, each on its own connection, all sent before any answer
    is read: the worker finds them queued and serves them back to back, as under load
    (one at a time, it would pay an idle wake-up and a read that finds nothing yet for
    each). The last response's STDOUT."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(s)
            s.connect(sock_path)
            s.sendall(data)
        out = b""
        for s in socks:
            client = protocol.ClientConnection(1)
            while True:
                chunk = s.recv(262144)
                if not chunk:
                    raise SystemExit("the server closed a connection before END_REQUEST")
                resp = client.feed(chunk)
                if resp.complete:
                    out = bytes(resp.stdout)
                    break
        return out
    finally:
        for s in socks:
            s.close()


def serve(sock_path: str, data: bytes, n: int) -> None:
    """``n`` requests in batches of ``BATCH``."""
    while n > 0:
        ask_many(sock_path, data, min(BATCH, n))
        n -= BATCH


class Server:
    """One server with one worker, started and stopped by PID."""

    def __init__(self, kind: str, app: str, tmp: str, uwsgi: Optional[str],
                 wrapper: List[str]) -> None:
        self.sock = os.path.join(tmp, f"{kind}.sock")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(BENCH)])
        env.pop("FCGI_MANAGER_PURE", None)
        if kind == "uwsgi":
            assert uwsgi is not None
            argv = [uwsgi, "--fastcgi-socket", self.sock, "--processes", "1", "--master",
                    "--die-on-term", "--need-app", "--pythonpath", str(BENCH),
                    "--module", f"apps:{app}", "--disable-logging"]
        else:
            if kind == "pure":
                env["FCGI_MANAGER_PURE"] = "1"
            argv = [sys.executable, "-m", "fcgi_manager", "run", f"apps:{app}",
                    "--bind", f"unix:{self.sock}", "--workers", "1"]
        self.log = open(os.path.join(tmp, f"{kind}.log"), "wb")
        self.proc = subprocess.Popen(wrapper + argv, env=env, cwd=str(BENCH),
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.kind = kind

    def ready(self, data: bytes) -> None:
        def answers() -> bool:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.kind} exited: see {self.log.name}")
            try:
                ask(self.sock, data)
                return True
            except OSError:
                return False
        wait_until(answers, START_TIMEOUT, f"{self.kind} to answer")

    def worker(self) -> int:
        """The pid of the one worker (a child of the master)."""
        kids: List[psutil.Process] = []

        def one() -> bool:
            kids[:] = psutil.Process(self.proc.pid).children(recursive=True)
            return len(kids) == 1
        wait_until(one, 30.0, f"{self.kind}'s single worker")
        return kids[0].pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def cpu_ns(pid: int) -> int:
    """Nanoseconds ``pid`` has run on a CPU (user and kernel), from /proc/PID/schedstat:
    psutil's user/system times tick at 10 ms, too coarse for a few thousand requests."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):  # every thread of the worker
        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def instructions(kind: str, app: str, n: int, uwsgi: Optional[str]) -> int:
    """Instructions callgrind counts in the worker of a server that serves ``n`` requests."""
    data = request_bytes(app)
    with tempfile.TemporaryDirectory(prefix="wcost-") as tmp:
        wrapper = ["valgrind", "--tool=callgrind", "--trace-children=no",
                   f"--callgrind-out-file={tmp}/cg.%p"]
        server = Server(kind, app, tmp, uwsgi, wrapper)
        try:
            server.ready(data)
            pid = server.worker()
            serve(server.sock, data, n)
        finally:
            server.stop()
        out = Path(tmp, f"cg.{pid}")
        wait_until(out.exists, 30.0, "the worker's callgrind output")
        match = re.search(r"^(?:summary|totals):\s*(\d+)", out.read_text(errors="replace"),
                          re.MULTILINE)
        if match is None:
            raise SystemExit(f"no total in {out}")
        return int(match.group(1))


def syscalls_and_cpu(kind: str, app: str, n: int, uwsgi: Optional[str]) -> Dict[str, Any]:
    """System calls per request (strace -c on the worker) and the worker's CPU µs per
    request in a separate run without strace."""
    data = request_bytes(app)
    result: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="wcost-") as tmp:
        server = Server(kind, app, tmp, uwsgi, [])
        try:
            server.ready(data)
            worker = psutil.Process(server.worker())
            serve(server.sock, data, 200)
            best = float("inf")
            for _ in range(5):
                before = cpu_ns(worker.pid)
                serve(server.sock, data, n)
                best = min(best, cpu_ns(worker.pid) - before)
            result["cpu_us"] = best / n / 1e3
            strace = shutil.which("strace")
            if strace is not None:
                out = os.path.join(tmp, "strace.txt")
                tracer = subprocess.Popen([strace, "-c", "-f", "-o", out, "-p",
                                           str(worker.pid)], stderr=subprocess.DEVNULL)
                time.sleep(1.0)  # strace attaches asynchronously
                serve(server.sock, data, n)
                tracer.send_signal(signal.SIGINT)
                tracer.wait(timeout=30)
                calls = parse_summary(Path(out).read_text())
                result["syscalls"] = sum(calls.values()) / n
                result["calls"] = calls
        finally:
            server.stop()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--apps", default="hello,page,post")
    ap.add_argument("--servers", default="compiled,pure",
                    help="compiled, pure (fcgi-manager's cores), uwsgi")
    ap.add_argument("--uwsgi", default=None, help="the uwsgi binary (adds uwsgi)")
    ap.add_argument("--requests", type=int, default=2000, help="requests per CPU/strace run")
    ap.add_argument("--low", type=int, default=100)
    ap.add_argument("--high", type=int, default=600)
    args = ap.parse_args()
    servers = [s for s in args.servers.split(",") if s]
    if args.uwsgi and "uwsgi" not in servers:
        servers.append("uwsgi")
    if "uwsgi" in servers and not args.uwsgi:
        raise SystemExit("--uwsgi PATH is needed for uwsgi")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed (apt-get install valgrind)")
    print("| server | app | instructions / request | system calls / request | "
          "worker CPU µs / request |")
    print("|---|---|---:|---:|---:|")
    for app in [a for a in args.apps.split(",") if a]:
        for kind in servers:
            low = instructions(kind, app, args.low, args.uwsgi)
            high = instructions(kind, app, args.high, args.uwsgi)
            per = (high - low) / (args.high - args.low)
            other = syscalls_and_cpu(kind, app, args.requests, args.uwsgi)
            calls = f"{other['syscalls']:.2f}" if "syscalls" in other else "—"
            print(f"| {kind} | {app} | {per:,.0f} | {calls} | {other['cpu_us']:.1f} |",
                  flush=True)
            if "calls" in other:
                detail = ", ".join(f"{name} {count / args.requests:.2f}" for name, count in
                                   sorted(other["calls"].items(), key=lambda kv: -kv[1]))
                print(f"<!-- {kind} {app} system calls per request: {detail} -->", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
