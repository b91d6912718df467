"""``status --watch``: a live view of the pool, like ``top`` or ``circus-top``.

On a terminal it is a full-screen ``curses`` view redrawn in place (curses sends only the
cells that changed, so nothing flickers): the master's line with a clock, the totals with
requests per second, and one row per worker with its own rate and current request.
``q`` (or Ctrl-C) quits; the view survives the master going away and coming back.

Piped (stdout is not a terminal, or ``--json``), it writes one snapshot per interval and
never an escape code: the text table with a rates line, or one JSON object per line (the
``status --json`` object plus ``"rates"``), which ``jq`` and log shippers read as they come.

Rates are differences between two snapshots: requests per second for the pool and for each
worker id (a worker replaced in between counts from 0 again).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, Dict, List, Optional, TextIO, Tuple

from .. import status as status_mod
from ..errors import FcgiManagerError
from ..escaping import escape

Fetch = Callable[[], Dict[str, Any]]


class Rates:
    """Requests per second between consecutive snapshots."""

    def __init__(self) -> None:
        self.last: Optional[Tuple[float, int, Dict[int, Tuple[int, int]]]] = None

    def update(self, data: Dict[str, Any], now: float) -> Optional[Dict[str, Any]]:
        """The rates since the previous snapshot (None for the first one)."""
        workers = {w["id"]: (w["pid"], w["requests"]) for w in data["workers"]}
        total = int(data["totals"]["accepted"])
        previous, self.last = self.last, (now, total, workers)
        if previous is None:
            return None
        then, old_total, old_workers = previous
        elapsed = max(now - then, 1e-6)
        per_worker = {}
        for wid, (pid, requests) in workers.items():
            old_pid, old_requests = old_workers.get(wid, (pid, 0))
            base = old_requests if old_pid == pid else 0
            per_worker[wid] = round(max(0, requests - base) / elapsed, 1)
        return {"requests_per_s": round(max(0, total - old_total) / elapsed, 1),
                "workers": per_worker, "interval_s": round(elapsed, 3)}


def run(fetch: Fetch, interval: float, as_json: bool,
        out: Optional[TextIO] = None) -> int:
    """Watch until interrupted (piped) or ``q`` (terminal); returns the exit status."""
    out = out or sys.stdout
    if not as_json and out.isatty():
        return _run_curses(fetch, interval)
    return _run_piped(fetch, interval, as_json, out)


# -- piped ---------------------------------------------------------------------------------

def _run_piped(fetch: Fetch, interval: float, as_json: bool, out: TextIO) -> int:
    rates = Rates()
    next_at = time.monotonic()
    try:
        while True:
            data = fetch()  # a master that stopped ends the watch (the caller reports it)
            rate = rates.update(data, time.monotonic())
            if as_json:
                out.write(json.dumps({**data, "rates": _json_rates(rate)}) + "\n")
            else:
                out.write(time.strftime("%Y-%m-%d %H:%M:%S  ") + _rates_line(rate, data) + "\n")
                out.write(status_mod.render_text(data) + "\n")
            out.flush()
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
    except BrokenPipeError:  # `status --watch | head`
        return 0


def _json_rates(rate: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if rate is None:
        return None
    return {**rate, "workers": {str(k): v for k, v in rate["workers"].items()}}


def _rates_line(rate: Optional[Dict[str, Any]], data: Dict[str, Any]) -> str:
    if rate is None:
        return f"{data['totals']['accepted']} requests (rates from the next snapshot)"
    workers = " ".join(f"{wid}:{r:g}" for wid, r in sorted(rate["workers"].items()))
    return f"{rate['requests_per_s']:g} req/s   per worker {workers}"


# -- terminal ------------------------------------------------------------------------------

def screen_lines(data: Optional[Dict[str, Any]], rate: Optional[Dict[str, Any]],
                 error: str, width: int, clock: str) -> List[Tuple[str, bool]]:
    """The view as (text, bold) lines, cut to ``width``: plain data, tested without a
    terminal."""
    lines: List[Tuple[str, bool]] = []
    if data is None:
        title = "fcgi-manager status --watch"
        lines.append((_pair(title, clock, width), True))
        lines.append(("", False))
        lines.append((f"no master answers: {error}" if error else "connecting...", False))
        lines.append(("(retrying every interval; q quits)", False))
        return [(text[:width], bold) for text, bold in lines]
    t = data["totals"]
    li = data["listen"]
    head = (f"fcgi-manager {data['version']}  master {data['pid']}  up "
            f"{status_mod.human_duration(data['uptime_s'])}  generation {data['generation']}"
            f"  {data['app']}")
    lines.append((_pair(head, clock, width), True))
    queue = "-" if li["queue"] is None else str(li["queue"])
    max_queue = "-" if li["max_queue"] is None else str(li["max_queue"])
    lines.append((f"listen {li['bind']}  queue {queue}/{li['backlog']} (max {max_queue})",
                  False))
    total_rate = "-" if rate is None else f"{rate['requests_per_s']:.1f}"
    lines.append((f"requests {t['accepted']}  {total_rate} req/s   workers "
                  f"{len(data['workers'])} ({data['mode']}): {t['active']} busy, "
                  f"{t['idle']} idle, max busy {t['max_active']}", True))
    lines.append((f"respawned {t['respawns']}  crashed {t['crashes']}  timed out "
                  f"{t['timeouts']}  recycled {t['recycled']}  slow {t['slow']}  shed "
                  f"{t['shed']}" + (f"  BACKOFF {data['backoff_s']}s"
                                    if data.get("backoff_s") else ""), False))
    if error:
        lines.append((f"(last refresh failed: {error})", False))
    lines.append(("", False))
    header = f"{'ID':>4} {'PID':>7} {'STATE':<8} {'GEN':>3} {'REQS':>8} {'REQ/S':>7} " \
             f"{'UPTIME':>7} {'RSS':>10} {'CPU%':>5}  CURRENT"
    lines.append((header, True))
    per = rate["workers"] if rate else {}
    for w in data["workers"]:
        cur = w["current"]
        current = (escape(f"{cur['method']} {cur['uri']}") +
                   f" ({status_mod.human_duration(cur['elapsed_s'])})" if cur else "")
        r = per.get(w["id"])
        lines.append((f"{w['id']:>4} {w['pid']:>7} {w['state']:<8} {w['generation']:>3} "
                      f"{w['requests']:>8} {'-' if r is None else f'{r:.1f}':>7} "
                      f"{status_mod.human_duration(w['uptime_s']):>7} "
                      f"{status_mod.human_size(w['rss_bytes']):>10} "
                      f"{w['cpu_percent']:>5.1f}  {current}", False))
    return [(text[:width], bold) for text, bold in lines]


def _pair(left: str, right: str, width: int) -> str:
    room = width - len(right) - 1
    if room < 10:
        return left
    return left[:room].ljust(room) + " " + right


def _run_curses(fetch: Fetch, interval: float) -> int:
    import curses

    def main(stdscr: Any) -> int:
        try:
            curses.curs_set(0)
        except curses.error:
            pass
        stdscr.timeout(100)  # getch waits at most 0.1 s: q is answered at once
        rates = Rates()
        data: Optional[Dict[str, Any]] = None
        rate: Optional[Dict[str, Any]] = None
        error = ""
        next_fetch = 0.0
        while True:
            now = time.monotonic()
            if now >= next_fetch:
                next_fetch = now + interval
                try:
                    data = fetch()
                    rate = rates.update(data, now)
                    error = ""
                except FcgiManagerError as exc:
                    error = exc.message
                    if data is not None and "not running" in error:
                        data, rate, rates = None, None, Rates()
            _draw(stdscr, data, rate, error)
            key = stdscr.getch()
            if key in (ord("q"), ord("Q"), 27):
                return 0

    try:
        return curses.wrapper(main)
    except KeyboardInterrupt:
        return 0


def _draw(stdscr: Any, data: Optional[Dict[str, Any]], rate: Optional[Dict[str, Any]],
          error: str) -> None:
    import curses

    height, width = stdscr.getmaxyx()
    # erase() + refresh(): curses compares with what is on the screen and sends only the
    # difference -- unlike clear(), which repaints everything (the flicker of `watch`).
    stdscr.erase()
    rows = screen_lines(data, rate, error, max(1, width - 1), time.strftime("%H:%M:%S"))
    for y, (text, bold) in enumerate(rows[: max(0, height - 1)]):
        try:
            stdscr.addstr(y, 0, text, curses.A_BOLD if bold else curses.A_NORMAL)
        except curses.error:
            pass
    try:
        stdscr.addstr(height - 1, 0, "q quit"[: max(0, width - 1)], curses.A_DIM)
    except curses.error:
        pass
    stdscr.refresh()
