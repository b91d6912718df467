"""Run wrk once and read its numbers.

wrk runs with one thread (``-t1``: the machine has two cores, and the servers need them
more than the load generator does), ``--latency``, and ``bench/wrk_report.lua``, which
prints the summary as one JSON line and, for the ``post`` app, sends the request body.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

from .procs import ProcessRegistry

MARKER = "BENCH_JSON "
LUA_SCRIPT = Path(__file__).resolve().parent.parent / "wrk_report.lua"


class WrkError(RuntimeError):
    """wrk failed or printed no summary."""


@dataclass
class WrkResult:
    """What one wrk run measured. Latencies are of completed requests only."""

    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int
    non_2xx: int

    @property
    def socket_errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts

    @property
    def errors(self) -> int:
        """Every failed request: socket errors, timeouts and 4xx/5xx answers."""
        return self.socket_errors + self.non_2xx

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def parse_summary(output: str) -> WrkResult:
    """Build a result from the BENCH_JSON line of wrk's output."""
    for line in output.splitlines():
        if line.startswith(MARKER):
            raw = json.loads(line[len(MARKER):])
            break
    else:
        raise WrkError(f"wrk printed no summary:\n{output[-2000:]}")
    duration_s = raw["duration_us"] / 1e6
    return WrkResult(
        requests=raw["requests"],
        duration_s=duration_s,
        rps=raw["requests"] / duration_s if duration_s > 0 else 0.0,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        connect_errors=raw["connect"],
        read_errors=raw["read"],
        write_errors=raw["write"],
        timeouts=raw["timeout"],
        non_2xx=raw["status"],
    )


def run(
    registry: ProcessRegistry,
    wrk_bin: str,
    url: str,
    connections: int,
    duration_s: float,
    timeout_s: float,
    log_path: Path,
    post_bytes: Optional[int] = None,
) -> WrkResult:
    """Load ``url`` for ``duration_s`` with ``connections`` connections from one thread."""
    argv = [
        wrk_bin,
        "-t1",
        f"-c{connections}",
        f"-d{duration_s:g}s",
        f"--timeout={timeout_s:g}s",
        "--latency",
        "-s",
        str(LUA_SCRIPT),
        url,
    ]
    env = dict(os.environ, WRK_POST_BYTES=str(post_bytes or 0))
    log_path.write_bytes(b"")
    child = registry.start("wrk", argv, log_path, env=env)
    try:
        child.popen.wait(timeout=duration_s + timeout_s + 30)
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish: {' '.join(argv)}") from exc
    finally:
        registry.stop(child)
    output = log_path.read_text(errors="replace")
    if child.popen.returncode != 0:
        raise WrkError(f"wrk exited with {child.popen.returncode}:\n{output[-2000:]}")
    return parse_summary(output)
