#!/usr/bin/env python3
"""Threads per worker (``workers.threads``): fcgi-manager against gunicorn ``gthread`` and
uWSGI ``--threads``, behind the same real nginx, in one run.

    python bench/threads.py                      # about 6 minutes on 2 cores
    python bench/threads.py --duration 2 --reps 1  # a quick look

Three parts, written to bench/results/threads-<timestamp>.{json,md}:

1. **Waiting apps** (``apps:sleep20``, 20 ms of sleep per request, a database stand-in) at
   64 and 256 wrk connections, every server with 2 processes x 16 threads: requests/s,
   p50/p99, errors, and each worker's USS after the load (the memory it does not share).
   fcgi-manager is measured with keep-conn off and on; uWSGI ignores FastCGI keep-conn
   (keep-conn off only); gunicorn speaks HTTP (``proxy_pass``, as its docs deploy it).
2. **Fast apps** (hello, page, post at 64 connections): fcgi-manager with ``threads = 16``
   next to ``threads = 1``, 2 workers each: what threads cost when nothing waits.
3. **Memory to hold 256 waiting requests** (``apps:wait``, 1 s per request, 256 wrk
   connections): prefork 256 x 1 against threads 16 x 16 and 2 x 128. The sum of PSS over
   the master and its workers is sampled while the load runs; requests/s close to 256 and
   p50 close to 1 s show that all 256 were waiting at once (none queued).

Peers come from a virtualenv (``--peers-venv``, default ``bench/.venv-peers``, the one
``bench/run.py`` uses), created and filled with pip on first use unless ``--no-install``.
Every listen backlog is 1024, so none refuses connections the others would queue.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import psutil
from benchlib import deps, nginx, wrk
from benchlib.procs import (
    Child,
    ProcessRegistry,
    StartError,
    free_loopback_port,
    unix_socket_accepts,
    wait_until,
)
from benchlib.servers import BENCH_DIR, REPO_ROOT

RESULTS_DIR = BENCH_DIR / "results"
BACKLOG = 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class Setup:
    """One server configuration: how to start it on an app, and how nginx reaches it."""

    name: str
    protocol: str  # "fastcgi" or "http"
    keep_conn: List[bool]
    argv: Callable[[str, Path, deps.Peers], List[str]]
    peer: Optional[str] = None


def fcgi_manager(workers: int, threads: int) -> Callable[[str, Path, deps.Peers], List[str]]:
    def argv(app: str, sock: Path, peers: deps.Peers) -> List[str]:
        return [sys.executable, "-m", "fcgi_manager", "run", f"apps:{app}", "--bind",
                f"unix:{sock}", "--workers", str(workers), "--threads", str(threads),
                "--log-level", "warning"]
    return argv


def gunicorn_gthread(app: str, sock: Path, peers: deps.Peers) -> List[str]:
    return [str(peers.bin("gunicorn")), "--workers", "2", "--threads", "16",
            "--worker-class", "gthread", "--backlog", str(BACKLOG), "--bind", f"unix:{sock}",
            "--chdir", str(BENCH_DIR), "--log-level", "warning", f"apps:{app}"]


def uwsgi_threads(app: str, sock: Path, peers: deps.Peers) -> List[str]:
    return [str(peers.bin("uwsgi")), "--fastcgi-socket", str(sock), "--processes", "2",
            "--threads", "16", "--master", "--die-on-term", "--need-app",
            "--listen", str(BACKLOG), "--pythonpath", str(BENCH_DIR), "--module",
            f"apps:{app}", "--disable-logging"]


PEER_SETUPS = [
    Setup("fcgi-manager-2x16", "fastcgi", [False, True], fcgi_manager(2, 16)),
    Setup("gunicorn-gthread-2x16", "http", [False], gunicorn_gthread, "gunicorn"),
    Setup("uwsgi-2x16", "fastcgi", [False], uwsgi_threads, "uwsgi"),
]
FAST_SETUPS = [
    Setup("fcgi-manager-2x1", "fastcgi", [False, True], fcgi_manager(2, 1)),
    Setup("fcgi-manager-2x16", "fastcgi", [False, True], fcgi_manager(2, 16)),
]
MEMORY_SETUPS = [
    Setup("prefork-256x1", "fastcgi", [False], fcgi_manager(256, 1)),
    Setup("threads-16x16", "fastcgi", [False], fcgi_manager(16, 16)),
    Setup("threads-2x128", "fastcgi", [False], fcgi_manager(2, 128)),
]


class Run:
    """One nginx for every setup; servers started one at a time."""

    def __init__(self, args: argparse.Namespace, tools: Dict[str, str], peers: deps.Peers,
                 registry: ProcessRegistry, tmp: Path) -> None:
        self.args = args
        self.tools = tools
        self.peers = peers
        self.registry = registry
        self.tmp = tmp
        self.port = 0
        self.nginx: Optional[Child] = None
        self.error_log = nginx.ErrorLog(tmp / "nginx-error.log")
        self.samples: List[Dict] = []
        self.memory: List[Dict] = []

    def sock(self, setup: Setup) -> Path:
        return self.tmp / f"{setup.name}.sock"

    def start_nginx(self, setups: Sequence[Setup]) -> None:
        self.port = free_loopback_port()
        unique = {s.name: s for s in setups}.values()
        backends = [nginx.Backend(s.name, s.protocol, self.sock(s)) for s in unique]
        conf = self.tmp / "nginx.conf"
        conf.write_text(nginx.render_config(self.tmp, self.port, backends))
        self.nginx = self.registry.start("nginx", nginx.command(self.tools["nginx"], self.tmp,
                                                                conf), self.tmp / "nginx.out")
        wait_until(lambda: nginx.http_status(self.port, "/ceiling") == 200, 15, "nginx",
                   self.nginx)

    def recycle_nginx_workers(self) -> None:
        """Drop nginx's cached upstream connections before the next server starts."""
        assert self.nginx is not None
        master = psutil.Process(self.nginx.pid)
        old = {p.pid for p in master.children()}
        os.kill(self.nginx.pid, signal.SIGHUP)
        wait_until(lambda: bool({p.pid for p in master.children()})
                   and not ({p.pid for p in master.children()} & old), 15, "nginx reload",
                   self.nginx)

    def start(self, setup: Setup, app: str) -> Child:
        sock = self.sock(setup)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_DIR), str(REPO_ROOT),
                                                        env.get("PYTHONPATH", "")) if p)
        child = self.registry.start(setup.name, setup.argv(app, sock, self.peers),
                                    self.tmp / f"{setup.name}-{app}.log", env=env,
                                    cwd=BENCH_DIR)
        try:
            wait_until(lambda: unix_socket_accepts(sock), 120, f"{setup.name} socket", child)
            wait_until(lambda: nginx.http_status(self.port, f"/{setup.name}/off/") == 200,
                       60, f"{setup.name} through nginx", child)
        except BaseException:
            self.registry.stop(child)
            raise
        return child

    def stop(self, setup: Setup, child: Child) -> None:
        self.recycle_nginx_workers()
        self.registry.stop(child, deadline_s=30)
        try:
            self.sock(setup).unlink()
        except FileNotFoundError:
            pass

    def load(self, setup: Setup, app: str, conns: int, keep_conn: bool, part: str,
             rep: int, duration: float, during: Optional[Callable[[], Dict]] = None) -> Dict:
        path = f"/{setup.name}/{'on' if keep_conn else 'off'}/{app}"
        mark = self.error_log.mark()
        sample: Dict = {"part": part, "setup": setup.name, "app": app, "connections": conns,
                        "keep_conn": keep_conn, "rep": rep}
        extra: Dict = {}
        if during is not None:
            # Sample memory in the middle of the load, from a thread of ours.
            import threading

            def probe() -> None:
                time.sleep(duration * 0.6)
                extra.update(during())
            thread = threading.Thread(target=probe)
            thread.start()
        try:
            result = wrk.run(self.registry, self.tools["wrk"],
                             f"http://127.0.0.1:{self.port}{path}", conns, duration,
                             self.args.timeout, self.tmp / "wrk.out",
                             post_bytes=64 * 1024 if app == "post" else None)
            sample["result"] = result.to_dict()
            sample["errors"] = result.errors
        except wrk.WrkError as exc:
            sample["result"] = None
            sample["error"] = str(exc)
        if during is not None:
            thread.join()
            sample["memory"] = extra
        sample["nginx_error_lines"] = len(self.error_log.lines_since(mark))
        self.samples.append(sample)
        _print(sample)
        return sample

    # -- the three parts ------------------------------------------------------------------

    def waiting_apps(self) -> None:
        for rep in range(self.args.reps):
            order = PEER_SETUPS[rep % 3:] + PEER_SETUPS[:rep % 3]
            for setup in order:
                child = self.start(setup, "sleep20")
                try:
                    self.load(setup, "sleep20", 256, False, "warmup", rep, 1.0)
                    for keep in setup.keep_conn:
                        for conns in (64, 256):
                            self.load(setup, "sleep20", conns, keep, "waiting", rep,
                                      self.args.duration)
                    self.memory.append({"part": "waiting", "setup": setup.name, "rep": rep,
                                        **family_memory(child.pid)})
                finally:
                    self.stop(setup, child)

    def fast_apps(self) -> None:
        for rep in range(self.args.reps):
            for app in ("hello", "page", "post"):
                order = FAST_SETUPS if rep % 2 == 0 else FAST_SETUPS[::-1]
                for setup in order:
                    child = self.start(setup, app)
                    try:
                        self.load(setup, app, 64, False, "warmup", rep, 1.0)
                        for keep in setup.keep_conn:
                            self.load(setup, app, 64, keep, "fast", rep, self.args.duration)
                    finally:
                        self.stop(setup, child)

    def memory_256(self) -> None:
        for setup in MEMORY_SETUPS:
            child = self.start(setup, "wait")
            try:
                self.load(setup, "wait", 256, False, "memory", 0, 6.0,
                          during=lambda pid=child.pid: family_memory(pid))
            finally:
                self.stop(setup, child)


def family_memory(pid: int) -> Dict:
    """RSS/PSS/USS of a master and its workers (children), in bytes."""
    try:
        master = psutil.Process(pid)
        workers = master.children(recursive=True)
    except psutil.Error:
        return {}
    def info(p: psutil.Process) -> Dict[str, int]:
        try:
            m = p.memory_full_info()
            return {"rss": m.rss, "pss": getattr(m, "pss", 0), "uss": m.uss}
        except psutil.Error:
            return {"rss": 0, "pss": 0, "uss": 0}
    each = [info(w) for w in workers]
    top = info(master)
    return {
        "workers": len(workers),
        "worker_uss": [w["uss"] for w in each],
        "total_pss": top["pss"] + sum(w["pss"] for w in each),
        "total_uss": top["uss"] + sum(w["uss"] for w in each),
        "total_rss": top["rss"] + sum(w["rss"] for w in each),
    }


def _print(sample: Dict) -> None:
    r = sample.get("result")
    head = (f"  {sample['part']:<8} {sample['setup']:<22} {sample['app']:<7} "
            f"c{sample['connections']:<4} keep-conn {'on ' if sample['keep_conn'] else 'off'}")
    if not r:
        print(f"{head} FAILED: {str(sample.get('error')).splitlines()[0]}", flush=True)
        return
    print(f"{head} {r['rps']:>8,.0f} rps  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms"
          f"  errors {sample['errors']}  nginx-log {sample['nginx_error_lines']}", flush=True)


# -- the report ---------------------------------------------------------------------------

def _median(values: List[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def _cells(samples: List[Dict], part: str) -> Dict[tuple, Dict]:
    cells: Dict[tuple, Dict] = {}
    for s in samples:
        if s["part"] != part:
            continue
        key = (s["setup"], s["app"], s["connections"], s["keep_conn"])
        cell = cells.setdefault(key, {"rps": [], "p50": [], "p99": [], "errors": 0,
                                      "nginx": 0})
        if s.get("result"):
            cell["rps"].append(s["result"]["rps"])
            cell["p50"].append(s["result"]["p50_ms"])
            cell["p99"].append(s["result"]["p99_ms"])
            cell["errors"] += s["errors"]
        else:
            cell["errors"] += 1
        cell["nginx"] += s["nginx_error_lines"]
    return cells


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(meta: Dict, samples: List[Dict], memory: List[Dict]) -> str:
    out = [f"# Threads per worker: {meta['started_at']}", "",
           f"`{meta['command']}` on {meta['cpus']} CPUs, {meta['platform']}; load average "
           f"{meta['loadavg_start']} at the start, {meta['loadavg_end']} at the end. "
           f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}. "
           f"Medians of {meta['reps']} repetition(s) of {meta['duration']:g} s.", ""]
    uss: Dict[str, List[float]] = {}
    for m in memory:
        if m["part"] == "waiting" and m.get("worker_uss"):
            uss.setdefault(m["setup"], []).append(statistics.mean(m["worker_uss"]) / MIB)
    out += ["## Waiting app (20 ms sleep per request), 2 processes x 16 threads", "",
            "| server | keep-conn | connections | requests/s | p50 ms | p99 ms | errors | "
            "nginx errors | worker USS MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for (setup, _, conns, keep), c in sorted(_cells(samples, "waiting").items(),
                                               key=lambda kv: (kv[0][2], kv[0][0], kv[0][3])):
        label = "n/a (http)" if setup.startswith("gunicorn") else ("on" if keep else "off")
        out.append(f"| {setup} | {label} | {conns} | {_fmt(_median(c['rps']), ',.0f')} | "
                   f"{_fmt(_median(c['p50']), '.1f')} | {_fmt(_median(c['p99']), '.1f')} | "
                   f"{c['errors']} | {c['nginx']} | {_fmt(_median(uss.get(setup, [])), '.1f')} |")
    out += ["", "## Fast apps at 64 connections: threads = 16 next to threads = 1 "
            "(2 workers)", "", "| app | workers x threads | keep-conn | requests/s | p50 ms | "
            "p99 ms | errors |", "|---|---|---|---|---|---|---|"]
    for (setup, app, _, keep), c in sorted(_cells(samples, "fast").items(),
                                             key=lambda kv: (kv[0][1], kv[0][3], kv[0][0])):
        out.append(f"| {app} | {setup.rsplit('-', 1)[-1]} | {'on' if keep else 'off'} | "
                   f"{_fmt(_median(c['rps']), ',.0f')} | {_fmt(_median(c['p50']), '.2f')} | "
                   f"{_fmt(_median(c['p99']), '.2f')} | {c['errors']} |")
    out += ["", "## Memory to hold 256 waiting requests (1 s each, 256 connections)", "",
            "| pool | processes | requests/s | p50 ms | errors | PSS total MiB | "
            "USS total MiB | RSS total MiB |", "|---|---|---|---|---|---|---|---|"]
    for s in samples:
        if s["part"] != "memory":
            continue
        m = s.get("memory") or {}
        r = s.get("result") or {}
        out.append(f"| {s['setup']} | {m.get('workers', '-')} | {_fmt(r.get('rps'), ',.0f')} "
                   f"| {_fmt(r.get('p50_ms'), '.0f')} | {s.get('errors', '-')} | "
                   f"{_fmt(m.get('total_pss', 0) / MIB, '.1f')} | "
                   f"{_fmt(m.get('total_uss', 0) / MIB, '.1f')} | "
                   f"{_fmt(m.get('total_rss', 0) / MIB, '.1f')} |")
    return "\n".join(out) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions")
    parser.add_argument("--timeout", type=float, default=10.0, help="wrk's request timeout")
    parser.add_argument("--parts", default="waiting,fast,memory",
                        help="which parts: waiting, fast, memory")
    parser.add_argument("--peers-venv", type=Path, default=BENCH_DIR / ".venv-peers",
                        help="virtualenv with gunicorn and uWSGI (created if missing)")
    parser.add_argument("--no-install", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    try:
        tools = deps.ensure_system_tools(install=not args.no_install)
        wanted = {"gunicorn", "uwsgi"} if "waiting" in parts else set()
        peers = deps.ensure_peers(args.peers_venv, wanted, install=not args.no_install)
    except deps.SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = {"started_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(["python", "bench/threads.py", *(argv or sys.argv[1:])]),
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "versions": deps.versions(tools, peers, wanted),
            "reps": args.reps, "duration": args.duration}
    registry = ProcessRegistry()
    tmp = Path(tempfile.mkdtemp(prefix="fcgi-bench-threads-"))
    run = Run(args, tools, peers, registry, tmp)
    status = 0
    try:
        run.start_nginx(PEER_SETUPS + FAST_SETUPS + MEMORY_SETUPS)
        if "waiting" in parts:
            run.waiting_apps()
        if "fast" in parts:
            run.fast_apps()
        if "memory" in parts:
            run.memory_256()
    except (KeyboardInterrupt, StartError) as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        status = 1
    finally:
        registry.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / ("threads-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    base.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "samples": run.samples, "memory": run.memory}, indent=1))
    text = render(meta, run.samples, run.memory)
    base.with_suffix(".md").write_text(text)
    print("\n" + text + f"\nwrote {base}.md and .json")
    return status


if __name__ == "__main__":
    sys.exit(main())
