#!/usr/bin/env python3
"""What observability costs: the access log on vs off, and the histogram and titles.

    python bench/features.py --baseline REF      # about 3 minutes
    python bench/features.py --quick             # under a minute, numbers rough

Every variant is fcgi-manager serving ``bench/apps.py:hello`` with 2 workers on a unix
socket, behind one private nginx, loaded with wrk (keep-conn off and on), in one run with
the order rotated per repetition:

* ``before``: the checkout at ``--baseline REF`` (``git archive``), i.e. the code without
  the duration histogram and process titles -- against ``off`` it is their cost;
* ``off``: this checkout, access log off (histogram and titles always on; titles include
  the command line when ``setproctitle`` is installed);
* ``text``: the access log to a file, default text format;
* ``json``: the access log to a file as JSON lines (``log_format = "json"``).

Writes bench/results/features-<timestamp>.{json,md} and prints the Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import psutil
from benchlib import deps, nginx, wrk
from benchlib.procs import (
    Child,
    ProcessRegistry,
    free_loopback_port,
    unix_socket_accepts,
    wait_until,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
VARIANTS = ("before", "off", "text", "json")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", default="", metavar="REF",
                   help="git ref of the code without the features (omit: no 'before' row)")
    p.add_argument("--quick", action="store_true", help="1 repetition of 2 s")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--out", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.reps = 2.0, 1
    return args


def extract(ref: str, into: Path) -> Path:
    """The package as it was at ``ref`` (only fcgi_manager/), for the 'before' variant."""
    data = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", ref, "fcgi_manager"],
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into)  # noqa: S202 - our own repository's archive
    return into


def write_config(tmp: Path, variant: str) -> Path:
    sock = tmp / f"{variant}.sock"
    manager = [f'pidfile = "{tmp / variant}.pid"', f'log = "{tmp / variant}.log"']
    if variant in ("text", "json"):
        manager.append(f'access_log = "{tmp / variant}-access.log"')
    if variant == "json":
        manager.append('log_format = "json"')
    conf = tmp / f"{variant}.toml"
    conf.write_text(f"""[app]
module = "apps:hello"
path = ["{BENCH_DIR}"]

[listen]
bind = "unix:{sock}"

[workers]
count = 2

[manager]
{chr(10).join(manager)}
""")
    return conf


def cpu_seconds(child: Child) -> float:
    root = psutil.Process(child.pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    tools = deps.ensure_system_tools(install=False)
    variants = [v for v in VARIANTS if v != "before" or args.baseline]
    registry = ProcessRegistry()
    samples: List[Dict] = []
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fcgi-features-") as tmp_name:
        tmp = Path(tmp_name)
        roots = {v: REPO_ROOT for v in variants}
        if args.baseline:
            roots["before"] = extract(args.baseline, tmp / "before-src")
        port = free_loopback_port()
        backends = [nginx.Backend(v, "fastcgi", tmp / f"{v}.sock") for v in variants]
        conf = tmp / "nginx.conf"
        conf.write_text(nginx.render_config(tmp, port, backends))
        try:
            ng = registry.start("nginx", nginx.command(tools["nginx"], tmp, conf),
                                tmp / "nginx.out")
            wait_until(lambda: nginx.http_status(port, "/ceiling") == 200, 15, "nginx", ng)
            for rep in range(args.reps):
                order = variants[rep % len(variants):] + variants[:rep % len(variants)]
                for variant in order:
                    samples += run_variant(args, tools, registry, tmp, port, variant,
                                           roots[variant], rep, ng)
        finally:
            registry.stop_all()
    report = render(samples, args, load, os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"features-{stamp}{'-smoke' if args.quick else ''}"
    (out / f"{name}.json").write_text(json.dumps({"args": vars(args), "samples": samples},
                                                 indent=1))
    (out / f"{name}.md").write_text(report)
    print(report)
    return 0


def run_variant(args: argparse.Namespace, tools: Dict[str, str], registry: ProcessRegistry,
                tmp: Path, port: int, variant: str, root: Path, rep: int,
                ng: Child) -> List[Dict]:
    conf = write_config(tmp, variant)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(BENCH_DIR)]))
    child = registry.start(variant, [sys.executable, "-m", "fcgi_manager", "-c", str(conf),
                                     "start", "--foreground"], tmp / f"{variant}.out",
                           env=env, cwd=tmp)
    out = []
    try:
        wait_until(lambda: unix_socket_accepts(tmp / f"{variant}.sock"), 60, variant, child)
        wait_until(lambda: nginx.http_status(port, f"/{variant}/off/hello") == 200, 30,
                   variant, child)
        wrk.run(registry, tools["wrk"], f"http://127.0.0.1:{port}/{variant}/off/hello",
                args.connections, 1.0, 5.0, tmp / "wrk.out")  # warm-up, not recorded
        for mode in ("off", "on"):
            before, nginx_before = cpu_seconds(child), cpu_seconds(ng)
            result = wrk.run(registry, tools["wrk"],
                             f"http://127.0.0.1:{port}/{variant}/{mode}/hello",
                             args.connections, args.duration, 5.0, tmp / "wrk.out")
            cpu = cpu_seconds(child) - before
            nginx_cpu = cpu_seconds(ng) - nginx_before
            sample = {"variant": variant, "keep_conn": mode, "rep": rep,
                      "rps": result.rps, "p99_ms": result.p99_ms, "errors": result.errors,
                      "cpu_us_per_request": cpu * 1e6 / max(1, result.requests),
                      "nginx_cpu_us_per_request": nginx_cpu * 1e6 / max(1, result.requests)}
            print(json.dumps(sample), flush=True)
            out.append(sample)
    finally:
        registry.stop(child)
        for suffix in (".sock", "-access.log"):
            try:
                (tmp / f"{variant}{suffix}").unlink()
            except FileNotFoundError:
                pass
    return out


def render(samples: List[Dict], args: argparse.Namespace, load_start, load_end) -> str:
    lines = [f"# Observability cost ({datetime.datetime.now():%Y-%m-%d %H:%M})", "",
             f"hello through nginx, 2 workers, wrk -c{args.connections}, {args.duration:g} s "
             f"x {args.reps} repetition(s), order rotated; load average "
             f"{load_start[0]:.2f} -> {load_end[0]:.2f}."
             + (f" `before` = {args.baseline}." if args.baseline else ""), "",
             "| variant | keep-conn | rps (median) | vs off | p99 ms | fcgi-manager CPU "
             "µs/request | vs off | nginx CPU µs/request | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    med: Dict[tuple, float] = {}
    for s in samples:
        med.setdefault((s["variant"], s["keep_conn"]), [])  # type: ignore[arg-type]
    for key in med:
        rows = [s for s in samples if (s["variant"], s["keep_conn"]) == key]
        med[key] = statistics.median(s["rps"] for s in rows)
    def median_of(variant: str, mode: str, field: str) -> float:
        return statistics.median(s[field] for s in samples
                                 if (s["variant"], s["keep_conn"]) == (variant, mode))

    for (variant, mode), rps in sorted(med.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cpu = median_of(variant, mode, "cpu_us_per_request")
        base = med.get(("off", mode))
        ratio = f"{(rps / base - 1) * 100:+.1f} %" if base else "-"
        base_cpu = median_of("off", mode, "cpu_us_per_request") if base else 0.0
        cpu_ratio = f"{(cpu / base_cpu - 1) * 100:+.1f} %" if base_cpu else "-"
        errors = sum(s["errors"] for s in samples
                     if (s["variant"], s["keep_conn"]) == (variant, mode))
        lines.append(f"| {variant} | {mode} | {rps:,.0f} | {ratio} | "
                     f"{median_of(variant, mode, 'p99_ms'):.1f} | {cpu:.1f} | {cpu_ratio} | "
                     f"{median_of(variant, mode, 'nginx_cpu_us_per_request'):.1f} | {errors} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
