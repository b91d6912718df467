"""A well-behaved FastCGI client in a process of its own (so that a test's own loop is
not starved of the GIL): one request per connection, in a loop, until its stdin closes.

    python loadgen.py ADDRESS --out counts.json [--path /] [--timeout 30]

Its counters go to ``--out`` (replaced atomically about five times a second, and once
more at the end): ``ok``, ``failed``, the first ``failures`` with their reasons, and
latency percentiles. A request succeeds when it answers 200 with ``ok from`` in the body.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from support import fcgi_request  # noqa: E402


def _write(path: Path, counts: Dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(counts))
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.buffer.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    latencies: List[float] = []
    failures: List[str] = []
    failed = 0
    next_write = 0.0
    while not stop.is_set():
        started = time.monotonic()
        try:
            reply = fcgi_request(args.address, args.path, timeout=args.timeout)
            if reply.status_code != 200 or b"ok from" not in reply.body:
                raise AssertionError(repr(reply))
            latencies.append(time.monotonic() - started)
        except Exception as exc:  # every way a request can fail is counted
            failed += 1
            if len(failures) < 10:
                failures.append(f"{time.monotonic() - started:.2f} s: {exc!r}")
        now = time.monotonic()
        if now >= next_write:
            next_write = now + 0.2
            _write(args.out, {"ok": len(latencies), "failed": failed, "failures": failures})
    ordered = sorted(latencies) or [0.0]
    _write(args.out, {
        "ok": len(latencies), "failed": failed, "failures": failures, "done": True,
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
