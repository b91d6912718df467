#!/usr/bin/env python3
"""Benchmark fcgi-manager against flup, uWSGI and gunicorn behind the same real nginx.

    python bench/run.py            # full matrix: 3 apps x c16/c64 x keep-conn off/on, 3 reps
    python bench/run.py --smoke    # under a minute: proves the whole chain works

Every server runs the same WSGI apps (bench/apps.py) with two worker processes on a unix
socket behind one private nginx; wrk loads nginx over loopback. Results go to
bench/results/<timestamp>.{json,md,png}. See bench/README.md for how to read them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import psutil
from benchlib import deps, nginx, report, syscalls, wrk
from benchlib.procs import (
    Child,
    ProcessRegistry,
    StartError,
    free_loopback_port,
    unix_socket_accepts,
    wait_until,
)
from benchlib.servers import (
    SERVERS,
    SUBJECT,
    WORKERS,
    Context,
    Server,
    fcgi_manager_problem,
    php_fpm_binary,
)

BENCH_DIR = Path(__file__).resolve().parent
VENV_DIR = BENCH_DIR / ".venv-peers"
RESULTS_DIR = BENCH_DIR / "results"
APPS = ("hello", "page", "post")
POST_BYTES = 64 * 1024
SOCKET_DEADLINE_S = 60.0  # importing an app and forking workers on a busy 2-core machine
HTTP_DEADLINE_S = 30.0
NGINX_DEADLINE_S = 15.0
FULL = {"apps": "hello,page,post", "connections": "16,64", "duration": 8.0, "reps": 3,
        "warmup": 1.0}
SMOKE = {"apps": "page,post", "connections": "16", "duration": 1.0, "reps": 1, "warmup": 0.0}


@dataclass
class Plan:
    """What one invocation measures."""

    servers: List[str]
    apps: List[str]
    connections: List[int]
    keep_conn: List[bool]
    duration_s: float
    reps: int
    warmup_s: float
    timeout_s: float
    smoke: bool
    syscalls: bool = False
    post_bytes: int = POST_BYTES
    workers: int = WORKERS

    @property
    def memory_app(self) -> str:
        """Worker memory is read after the page app (a realistic, non-trivial response)."""
        return "page" if "page" in self.apps else self.apps[-1]


def _csv(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Command-line options; the defaults of the full and smoke runs differ (see FULL/SMOKE)."""
    parser = argparse.ArgumentParser(
        description="Benchmark fcgi-manager against flup, uWSGI and gunicorn behind nginx.",
    )
    parser.add_argument("--smoke", action="store_true",
                        help="a run of under a minute that proves the whole chain works")
    parser.add_argument("--servers", help=f"comma-separated, from: {', '.join(SERVERS)} "
                        "(default: all; fcgi-manager is skipped if it cannot run yet)")
    parser.add_argument("--apps", help="comma-separated, from: hello, page, post")
    parser.add_argument("--connections", help="wrk concurrencies, e.g. 16,64")
    parser.add_argument("--keep-conn", default="off,on",
                        help="FastCGI connection modes to run: off, on or off,on")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (full: 8)")
    parser.add_argument("--reps", type=int, help="interleaved repetitions (full: 3)")
    parser.add_argument("--warmup", type=float,
                        help="seconds of unrecorded load after each server start (full: 1)")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="wrk's per-request timeout in seconds (default: 5)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where reports go")
    parser.add_argument("--no-install", action="store_true",
                        help="never install anything; fail if something is missing")
    parser.add_argument("--keep-tmp", action="store_true",
                        help="keep the temp dir (nginx.conf, server logs) for inspection")
    parser.add_argument("--syscalls", action="store_true",
                        help="also count system calls per request with strace -c (one extra "
                             "wrk run per server, app and keep-conn mode)")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    """Merge the options with the full or smoke defaults and validate the names."""
    base = SMOKE if args.smoke else FULL

    def pick(name: str):
        """The option if given, else the full or smoke default."""
        value = getattr(args, name)
        return base[name] if value is None else value

    servers = _csv(args.servers) if args.servers else list(SERVERS)
    apps = _csv(pick("apps"))
    keep = _csv(args.keep_conn)
    _check_names("server", servers, SERVERS)
    _check_names("app", apps, APPS)
    _check_names("keep-conn mode", keep, ("off", "on"))
    return Plan(
        servers=servers,
        apps=apps,
        connections=[int(c) for c in _csv(pick("connections"))],
        keep_conn=[mode == "on" for mode in keep],
        duration_s=pick("duration"),
        reps=max(1, pick("reps")),
        warmup_s=pick("warmup"),
        timeout_s=args.timeout,
        smoke=args.smoke,
        syscalls=args.syscalls,
    )


def _check_names(what: str, names: Sequence[str], known: Sequence[str]) -> None:
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise SystemExit(f"error: unknown {what} {', '.join(unknown) or '(none given)'}; "
                         f"choose from: {', '.join(known)}")


class Bench:
    """One benchmark run: the nginx, the servers started in turn, and what was measured."""

    def __init__(
        self, plan: Plan, tools: Dict[str, str], peers: deps.Peers,
        registry: ProcessRegistry, tmp: Path,
    ) -> None:
        self.plan = plan
        self.tools = tools
        self.peers = peers
        self.registry = registry
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.port = 0
        self.nginx: Optional[Child] = None
        self.error_log = nginx.ErrorLog(tmp / "nginx-error.log")
        self.samples: List[Dict] = []
        self.memory: List[Dict] = []
        self.failures: List[Dict] = []
        self.syscalls: List[Dict] = []
        self.broken: Dict[str, str] = {}

    def socket(self, server: str) -> Path:
        return self.tmp / f"{server}.sock"

    # --- nginx -----------------------------------------------------------------------

    def start_nginx(self) -> None:
        """Write the run's nginx.conf, start nginx, and wait until it answers."""
        self.port = free_loopback_port()
        backends = [
            nginx.Backend(name, SERVERS[name].protocol, self.socket(name),
                          SERVERS[name].nginx_params)
            for name in self.plan.servers
        ]
        conf = self.tmp / "nginx.conf"
        conf.write_text(nginx.render_config(self.tmp, self.port, backends))
        argv = nginx.command(self.tools["nginx"], self.tmp, conf)
        self.nginx = self.registry.start("nginx", argv, self.logs / "nginx.out")
        wait_until(lambda: nginx.http_status(self.port, "/ceiling") == 200,
                   NGINX_DEADLINE_S, "nginx", self.nginx)

    def recycle_nginx_workers(self) -> None:
        """Reload nginx so that its worker drops the idle upstream keepalive connections.

        A prefork worker blocked on an idle keep-conn connection only notices a stop signal
        when nginx closes that connection; this makes every server's stop prompt and starts
        the next server with an empty connection cache.
        """
        assert self.nginx is not None
        master = psutil.Process(self.nginx.pid)
        old = {proc.pid for proc in master.children()}
        os.kill(self.nginx.pid, signal.SIGHUP)

        def reloaded() -> bool:
            now = {proc.pid for proc in master.children()}
            return bool(now) and not (now & old)

        wait_until(reloaded, NGINX_DEADLINE_S, "nginx reload", self.nginx)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    # --- servers -----------------------------------------------------------------------

    def start_server(self, server: Server, app: str, rep: int) -> Child:
        """Start ``server`` on ``app`` and wait until a request through nginx succeeds."""
        sock = self.socket(server.name)
        ctx = Context(app=app, socket=sock, peers=self.peers)
        log = self.logs / f"{server.name}-{app}-rep{rep}.log"
        child = self.registry.start(server.name, server.argv(ctx), log, env=server.env(ctx),
                                    cwd=BENCH_DIR)
        try:
            wait_until(lambda: unix_socket_accepts(sock), SOCKET_DEADLINE_S,
                       f"{server.name} socket", child)
            path = f"/{server.name}/off/{app}"
            wait_until(lambda: nginx.http_status(self.port, path) == 200, HTTP_DEADLINE_S,
                       f"{server.name} answering GET {path} through nginx", child)
        except BaseException:
            self.registry.stop(child)
            raise
        return child

    def stop_server(self, server: Server, child: Child) -> None:
        """Stop the server and remove its socket file, so the next start begins clean."""
        self.registry.stop(child)
        try:
            self.socket(server.name).unlink()
        except FileNotFoundError:
            pass

    # --- measuring ---------------------------------------------------------------------

    def measure(self, server: str, path: str, app: str, conns: int,
                keep_conn: Optional[bool], rep: int, child: Optional[Child] = None) -> Dict:
        """One wrk run, with what nginx logged during it and the server's CPU time per
        request (its workers' and master's user + system time over the run)."""
        mark = self.error_log.mark()
        cpu_before = _server_cpu_s(child)
        sample: Dict = {"rep": rep, "server": server, "app": app, "connections": conns,
                        "keep_conn": keep_conn, "path": path, "result": None, "error": None}
        try:
            result = wrk.run(self.registry, self.tools["wrk"], self.url(path), conns,
                             self.plan.duration_s, self.plan.timeout_s, self.logs / "wrk.out",
                             post_bytes=self.plan.post_bytes if app == "post" else None)
            sample["result"] = result.to_dict()
            cpu_after = _server_cpu_s(child)
            if cpu_before is not None and cpu_after is not None and result.requests:
                sample["result"]["cpu_us_per_request"] = (
                    (cpu_after - cpu_before) * 1e6 / result.requests)
        except wrk.WrkError as exc:
            sample["error"] = str(exc)
            self.failures.append({"server": server, "app": app, "stage": "wrk",
                                  "message": str(exc)})
        lines = self.error_log.lines_since(mark)
        sample["nginx_error_lines"] = len(lines)
        sample["nginx_error_sample"] = lines[:3]
        self._check_nginx()
        _print_sample(sample)
        return sample

    def _check_nginx(self) -> None:
        if self.nginx is None or not self.nginx.running():
            tail = self.nginx.log_tail() if self.nginx else ""
            raise StartError(f"nginx exited during the run\n{tail}")

    def warm_up(self, server: Server, app: str) -> None:
        """Unrecorded load, so imports, caches and connection pools are warm when measured."""
        if self.plan.warmup_s <= 0:
            return
        try:
            wrk.run(self.registry, self.tools["wrk"], self.url(f"/{server.name}/off/{app}"),
                    max(self.plan.connections), self.plan.warmup_s, self.plan.timeout_s,
                    self.logs / "wrk.out",
                    post_bytes=self.plan.post_bytes if app == "post" else None)
        except wrk.WrkError:
            pass  # the measured runs will report it

    def record_memory(self, server: str, app: str, rep: int, child: Child) -> None:
        """RSS, PSS and USS of the server's processes (workers, and the master if any)."""
        try:
            master = psutil.Process(child.pid)
            workers = master.children(recursive=True)
            entry = {"rep": rep, "server": server, "app": app,
                     "master": _memory(master) if workers else None,
                     "workers": [_memory(p) for p in (workers or [master])]}
        except psutil.Error as exc:
            self.failures.append({"server": server, "app": app, "stage": "memory",
                                  "message": str(exc)})
            return
        self.memory.append(entry)

    def count_syscalls(self, server: Server, app: str, child: Child) -> None:
        """One wrk run per keep-conn mode with strace -c on the workers (see syscalls.py)."""
        strace = shutil.which("strace")
        if strace is None:
            self.failures.append({"server": server.name, "app": app, "stage": "syscalls",
                                  "message": "strace is not installed"})
            return
        for keep_conn in server.keep_conn_variants:
            if keep_conn is not None and keep_conn not in self.plan.keep_conn:
                continue
            path = f"/{server.name}/{'on' if keep_conn else 'off'}/{app}"
            tracer = syscalls.Tracer(strace, syscalls.worker_pids(child.pid),
                                     self.logs / f"strace-{server.name}-{app}-{keep_conn}.txt")
            tracer.start()
            try:
                result = wrk.run(self.registry, self.tools["wrk"], self.url(path),
                                 min(self.plan.connections), 2.0, self.plan.timeout_s,
                                 self.logs / "wrk.out",
                                 post_bytes=self.plan.post_bytes if app == "post" else None)
            except wrk.WrkError as exc:
                tracer.stop()
                self.failures.append({"server": server.name, "app": app,
                                      "stage": "syscalls", "message": str(exc)})
                continue
            calls = tracer.stop()
            self.syscalls.append({"server": server.name, "app": app, "keep_conn": keep_conn,
                                  "requests": result.requests,
                                  "per_request": syscalls.per_request(calls, result.requests)})

    # --- the matrix --------------------------------------------------------------------

    def measure_ceiling(self) -> None:
        """nginx alone (``return 200``): the most any server could reach here."""
        for conns in self.plan.connections:
            self.samples.append(self.measure(report.CEILING, "/ceiling", "hello", conns,
                                             None, 0))

    def run_block(self, server: Server, app: str, rep: int) -> None:
        """Start one server on one app, run every variant against it, stop it."""
        if server.name in self.broken:
            return
        try:
            child = self.start_server(server, app, rep)
        except StartError as exc:
            self.broken[server.name] = str(exc)
            self.failures.append({"server": server.name, "app": app, "stage": "start",
                                  "message": str(exc)})
            print(f"  {server.name}: could not start, skipped from now on:\n{exc}", flush=True)
            return
        try:
            self.warm_up(server, app)
            for keep_conn in server.keep_conn_variants:
                if keep_conn is not None and keep_conn not in self.plan.keep_conn:
                    continue
                path = f"/{server.name}/{'on' if keep_conn else 'off'}/{app}"
                for conns in self.plan.connections:
                    self.samples.append(self.measure(server.name, path, app, conns,
                                                     keep_conn, rep, child))
            if app == self.plan.memory_app:
                self.record_memory(server.name, app, rep, child)
            if self.plan.syscalls and rep == 0:
                self.count_syscalls(server, app, child)
        finally:
            self.recycle_nginx_workers()
            self.stop_server(server, child)

    def run(self) -> None:
        """nginx, its ceiling, then each repetition with the server order rotated."""
        self.start_nginx()
        self.measure_ceiling()
        servers = [SERVERS[name] for name in self.plan.servers]
        for rep in range(self.plan.reps):
            shift = rep % len(servers)
            order = servers[shift:] + servers[:shift]
            for app in self.plan.apps:
                print(f"[rep {rep + 1}/{self.plan.reps}] app {app}: "
                      f"{', '.join(s.name for s in order)}", flush=True)
                for server in order:
                    self.run_block(server, app, rep)


def _server_cpu_s(child: Optional[Child]) -> Optional[float]:
    """CPU seconds (user + system) of a server's process tree so far, or None.

    Workers that exited during the run take their time with them; the servers here keep
    their workers for the whole run, so the difference over a run is what it served with.
    """
    if child is None:
        return None
    try:
        root = psutil.Process(child.pid)
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total
    except psutil.Error:
        return None


def _memory(proc: psutil.Process) -> Dict[str, int]:
    info = proc.memory_full_info()
    return {"pid": proc.pid, "rss": info.rss, "pss": getattr(info, "pss", 0), "uss": info.uss}


def _print_sample(sample: Dict) -> None:
    """One progress line per wrk run."""
    keep = {None: "-", False: "off", True: "on"}[sample["keep_conn"]]
    head = (f"  {sample['server']:<14} {sample['app']:<5} c{sample['connections']:<3} "
            f"keep-conn {keep:<3}")
    result = sample["result"]
    if result is None:
        print(f"{head} FAILED: {str(sample['error']).splitlines()[0]}", flush=True)
        return
    errors = sum(result[k] for k in report.ERROR_KINDS)
    print(f"{head} {result['rps']:>9,.0f} rps  p50 {result['p50_ms']:7.2f} ms  "
          f"p99 {result['p99_ms']:7.2f} ms  errors {errors}  "
          f"nginx-log {sample['nginx_error_lines']}", flush=True)


def _estimate_s(plan: Plan) -> float:
    """Roughly how long the load itself takes, to print before starting."""
    cells = sum(
        len([k for k in SERVERS[s].keep_conn_variants if k is None or k in plan.keep_conn])
        for s in plan.servers
    ) * len(plan.apps) * len(plan.connections)
    starts = len(plan.servers) * len(plan.apps)
    per_rep = cells * plan.duration_s + starts * plan.warmup_s
    return plan.reps * per_rep + len(plan.connections) * plan.duration_s


def drop_unrunnable(plan: Plan, explicit: bool) -> List[str]:
    """Leave fcgi-manager out of a default run when this checkout cannot run it yet, and
    php-fpm when it is not installed (it is a Debian package, not a PyPI peer)."""
    skipped: List[str] = []
    if "php-fpm" in plan.servers and php_fpm_binary() is None:
        message = "php-fpm (not installed: apt-get install php-fpm)"
        if explicit:
            raise deps.SetupError(message)
        plan.servers.remove("php-fpm")
        print(f"note: skipping {message}", flush=True)
        skipped.append(message)
    return skipped + _drop_unrunnable_subject(plan, explicit)


def _drop_unrunnable_subject(plan: Plan, explicit: bool) -> List[str]:
    if SUBJECT not in plan.servers:
        return []
    problem = fcgi_manager_problem()
    if problem is None:
        return []
    message = f"{SUBJECT} (`python -m fcgi_manager run --help` failed: {problem})"
    if explicit:
        raise deps.SetupError(message)
    plan.servers.remove(SUBJECT)
    print(f"note: skipping {message}", flush=True)
    return [message]


def _raise_on_termination_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP all stop the run through the cleanup path.

    SIGINT is set explicitly because Python leaves it ignored when the harness was started
    in the background by a non-interactive shell.
    """
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)


def _ignore_signals_during_cleanup() -> None:
    """A second Ctrl-C must not cut the cleanup short and leave servers running."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def _meta(argv: Sequence[str], versions: Dict[str, str], skipped: List[str]) -> Dict:
    return {
        "started_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/run.py", *argv]),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_start": _loadavg(),
        "versions": versions,
        "skipped": skipped,
    }


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def write_reports(bench: Bench, meta: Dict, out_dir: Path) -> List[Path]:
    """Write <timestamp>.json, .md and (with matplotlib) .png; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = out_dir / (stamp + ("-smoke" if bench.plan.smoke else ""))
    rows = report.summarize(bench.samples)
    memory = report.summarize_memory(bench.memory)
    plan = dict(asdict(bench.plan), memory_app=bench.plan.memory_app)
    report.write_json(base.with_suffix(".json"), {
        "meta": meta, "plan": plan, "summary": [row.to_dict() for row in rows],
        "memory_summary": memory, "samples": bench.samples, "memory_samples": bench.memory,
        "failures": bench.failures, "syscalls": bench.syscalls,
    })
    markdown = report.render_markdown(meta, plan, rows, memory, bench.failures)
    markdown += report.syscall_table(bench.syscalls)
    base.with_suffix(".md").write_text(markdown)
    paths = [base.with_suffix(".json"), base.with_suffix(".md")]
    if report.render_png(base.with_suffix(".png"), rows, bench.plan.servers):
        paths.append(base.with_suffix(".png"))
    print("\n" + markdown)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Set up, run the matrix with every process stopped in the end, write the reports."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    plan = make_plan(args)
    _raise_on_termination_signals()
    try:
        tools = deps.ensure_system_tools(install=not args.no_install)
        skipped = drop_unrunnable(plan, explicit=args.servers is not None)
        peer_names = {SERVERS[s].peer for s in plan.servers if SERVERS[s].peer}
        peers = deps.ensure_peers(VENV_DIR, peer_names, install=not args.no_install)
    except deps.SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = _meta(argv, deps.versions(tools, peers, peer_names), skipped)
    print(f"servers: {', '.join(plan.servers)}; apps: {', '.join(plan.apps)}; "
          f"about {_estimate_s(plan) / 60:.1f} min of load", flush=True)

    registry = ProcessRegistry()
    tmp = Path(tempfile.mkdtemp(prefix="fcgi-bench-"))
    bench = Bench(plan, tools, peers, registry, tmp)
    status = 0
    try:
        bench.run()
    except KeyboardInterrupt:
        meta["interrupted"] = True
        status = 130
        print("\ninterrupted: stopping every process this run started", flush=True)
    except StartError as exc:
        bench.failures.append({"server": "nginx", "stage": "run", "message": str(exc)})
        print(f"error: {exc}", file=sys.stderr)
        status = 1
    finally:
        _ignore_signals_during_cleanup()
        registry.stop_all()
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    meta["loadavg_end"] = _loadavg()
    meta["finished_at"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    if bench.samples:
        for path in write_reports(bench, meta, args.out):
            print(f"wrote {path}")
    if status == 0 and bench.failures:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
