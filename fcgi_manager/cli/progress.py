"""What ``stop`` and ``reload`` are waiting for, shown on a terminal while they wait.

A graceful stop can take up to ``graceful_timeout`` and a reload until the new workers
are ready; waiting in silence looks like a hang. On a terminal (stderr is a tty) one line
is redrawn in place from the master's status::

    waiting for 1 request: GET /slow, 3.1 s
    reload: 1 of 2 new workers ready (generation 3)

and erased when the wait ends. Piped, nothing is written: scripts and logs get only the
result line.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, List, Optional, TextIO

from ..errors import ControlError
from ..wire import control

POLL_INTERVAL = 0.25


class Line:
    """One status line, redrawn in place on a terminal; nothing at all otherwise."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        self.stream = stream or sys.stderr
        try:
            self.enabled = self.stream.isatty()
        except (AttributeError, ValueError):
            self.enabled = False
        self.shown = False

    def show(self, text: str) -> None:
        if not self.enabled or not text:
            return
        self.stream.write("\r\033[K" + text)
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def requests_in_flight(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The requests running now, longest first."""
    out = []
    for worker in data.get("workers") or ():
        for req in worker.get("in_flight") or ([worker["current"]] if worker.get("current")
                                                else []):
            if req:
                out.append(req)
    out.sort(key=lambda r: -float(r.get("elapsed_s") or 0.0))
    return out


def describe_requests(requests: List[Dict[str, Any]], limit: int = 2) -> str:
    """``1 request: GET /slow, 3.1 s`` (the longest ones first)."""
    parts = [f"{r.get('method', '?')} {r.get('uri', '?')}, {float(r.get('elapsed_s') or 0):.1f} s"
             for r in requests[:limit]]
    more = f" (+{len(requests) - limit} more)" if len(requests) > limit else ""
    return f"{_plural(len(requests), 'request')}: " + "; ".join(parts) + more


def stop_text(data: Optional[Dict[str, Any]], pid: int, started: float, grace: float,
              drain: float = 0.0) -> str:
    """What a stop waits for, from one status snapshot (None: the master no longer answers).

    During ``drain`` (manager.shutdown_delay) the workers still serve: say so, rather than
    "waiting for N workers to exit", which they are not doing yet."""
    elapsed = time.monotonic() - started
    left = max(0.0, grace - elapsed)
    deadline = f" (killed in {left:.0f} s)" if grace else ""
    if data is None:
        return f"waiting for the master (pid {pid}) to exit"
    requests = requests_in_flight(data)
    if elapsed < drain:
        serving = f"; {describe_requests(requests)}" if requests else ""
        return (f"draining: still serving, the ping path answers 503 for "
                f"{drain - elapsed:.0f} s more{serving}")
    if requests:
        return "waiting for " + describe_requests(requests) + deadline
    workers = len(data.get("workers") or ())
    if workers:
        return f"waiting for {_plural(workers, 'worker')} to exit{deadline}"
    return f"waiting for the master (pid {pid}) to exit"


def reload_text(data: Optional[Dict[str, Any]], old_generation: int) -> str:
    """What a reload waits for: the import check, then the new generation's workers."""
    if data is None:
        return "reload: the master is checking the new code"
    generation = int(data.get("generation") or 0)
    if generation <= old_generation:
        return "reload: checking the new configuration and code"
    workers = data.get("workers") or ()
    new = [w for w in workers if w.get("generation") == generation]
    ready = [w for w in new if w.get("state") in ("idle", "busy")]
    target = int(data.get("target_workers") or len(new))
    return f"reload: {len(ready)} of {target} new workers ready (generation {generation})"


def snapshot(path: str) -> Optional[Dict[str, Any]]:
    """The master's status, or None if it does not answer within a moment."""
    try:
        return control.call(path, "status", timeout=1.0)
    except ControlError:
        return None
