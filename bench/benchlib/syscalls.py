"""System calls per request: ``strace -c -f`` attached to a server's workers during a wrk run.

strace slows every call it sees, so the throughput of such a run means nothing; the count
does: calls made by the workers divided by the requests wrk completed is what each request
costs in kernel crossings, and it is the number to drive down on the hot path (the minimum
without keep-conn is accept4 + read + write + close, plus an amortised epoll_wait).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil

_ROW = re.compile(
    r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(?P<calls>\d+)\s+(?:(?P<errors>\d+)\s+)?(?P<name>\w+)\s*$"
)


def parse_summary(text: str) -> Dict[str, int]:
    """``strace -c``'s table -> {syscall: calls}."""
    calls: Dict[str, int] = {}
    for line in text.splitlines():
        match = _ROW.match(line)
        if match and match.group("name") != "total":
            calls[match.group("name")] = int(match.group("calls"))
    return calls


def worker_pids(server_pid: int) -> List[int]:
    """The processes that serve requests: the server's children, or the server itself."""
    try:
        root = psutil.Process(server_pid)
        children = root.children(recursive=True)
    except psutil.Error:
        return []
    return [p.pid for p in children] or [server_pid]


class Tracer:
    """``strace -c -f`` on a set of pids, from :meth:`start` to :meth:`stop`."""

    def __init__(self, strace: str, pids: List[int], out: Path) -> None:
        self.argv = [strace, "-c", "-f", "-o", str(out)]
        for pid in pids:
            self.argv += ["-p", str(pid)]
        self.out = out
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(1.0)  # strace attaches asynchronously; give it a moment before the load

    def stop(self) -> Dict[str, int]:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            return parse_summary(self.out.read_text())
        except FileNotFoundError:
            return {}


def per_request(calls: Dict[str, int], requests: int) -> Dict[str, float]:
    """Calls per request, largest first, with the total under ``"total"``."""
    if requests <= 0:
        return {}
    rows = {name: count / requests for name, count in calls.items()}
    ordered = dict(sorted(rows.items(), key=lambda item: -item[1]))
    ordered["total"] = sum(rows.values())
    return ordered
