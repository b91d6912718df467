"""``status --watch``: piped snapshots without escape codes, JSON lines with rates, and the
curses view on a real pseudo-terminal (drawn once, then updated in place; ``q`` quits)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from typing import Callable, List

from support import Manager, ProcessTracker, _child_env, fcgi_request, skip_or_fail, wait_for

MakeManager = Callable[..., Manager]
SNAPSHOT = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  ", re.M)


def _watch(m: Manager, *args: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fcgi_manager", "-c", str(m.config),
                             "status", "--watch", "--interval", "0.2", *args],
                            cwd=str(m.tmp), env=_child_env({"TERM": "xterm"}), **popen)


class Reader:
    """Non-blocking reads of a pipe or pty, polled against a deadline."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = b""

    def read_until(self, predicate: Callable[[bytes], bool], timeout: float, what: str) -> bytes:
        deadline = time.monotonic() + timeout
        while not predicate(self.data):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; got {self.data[-2000:]!r}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # a pty whose other side closed
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"EOF while waiting for {what}: {self.data[-2000:]!r}")
                self.data += chunk
        return self.data


def test_watch_piped_writes_plain_snapshots_then_reports_the_stop(
        make_manager: MakeManager) -> None:
    m = make_manager(count=2)
    m.start()
    tracker = ProcessTracker()
    proc = _watch(m, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    tracker.add(proc.pid)
    try:
        reader = Reader(proc.stdout.fileno())  # type: ignore[union-attr]
        fcgi_request(m.bind, "/")
        text = reader.read_until(lambda d: len(SNAPSHOT.findall(d.decode())) >= 4, 20,
                                 "four snapshots")
        assert b"\x1b" not in text  # no escape code in a pipe
        decoded = text.decode()
        assert "req/s   per worker 1:" in decoded and "master pid" in decoded
        assert len(re.findall(r"^ID +PID +STATE", decoded, re.M)) >= 3  # the whole table
        m.stop()
        out, err = proc.communicate(timeout=20)
    finally:
        tracker.kill_all()
    assert proc.returncode == 3, (out, err)  # LSB "not running", once the master is gone
    assert b"not running" in out


def test_watch_json_lines_carry_rates(make_manager: MakeManager) -> None:
    m = make_manager(count=1)
    m.start()
    tracker = ProcessTracker()
    proc = _watch(m, "--json", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                  stdin=subprocess.DEVNULL)
    tracker.add(proc.pid)
    try:
        reader = Reader(proc.stdout.fileno())  # type: ignore[union-attr]
        reader.read_until(lambda d: d.count(b"\n") >= 1, 20, "the first line")

        def served_while_watched() -> bool:
            fcgi_request(m.bind, "/")
            seen = reader.data.count(b"\n")
            lines = reader.read_until(lambda d: d.count(b"\n") > seen and d.endswith(b"\n"),
                                      20, "the next line").splitlines()
            last = json.loads(lines[-1])
            return bool(last["rates"] and last["rates"]["requests_per_s"] > 0)
        wait_for(served_while_watched, 20, "a positive rate")
    finally:
        tracker.kill_all()
    records = [json.loads(line) for line in reader.data.splitlines()]
    assert records[0]["rates"] is None and records[0]["workers"][0]["id"] == 1
    rates = [r["rates"] for r in records[1:]]
    assert all(set(r) == {"requests_per_s", "workers", "interval_s"} for r in rates)
    assert any(r["workers"]["1"] > 0 for r in rates)


def test_watch_on_a_terminal_redraws_in_place_and_q_quits(make_manager: MakeManager) -> None:
    if not os.path.exists("/dev/ptmx"):
        skip_or_fail("no pseudo-terminals")
    m = make_manager(count=2)
    m.start()
    master_fd, slave_fd = os.openpty()
    fcntl.ioctl(slave_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    tracker = ProcessTracker()
    proc = _watch(m, stdin=slave_fd, stdout=slave_fd, stderr=slave_fd, start_new_session=True)
    os.close(slave_fd)
    tracker.add(proc.pid)
    try:
        reader = Reader(master_fd)
        first = reader.read_until(lambda d: b"req/s" in d and b"q quit" in d, 20,
                                  "the first frame")
        assert first.count(b"\x1b[2J") <= 1  # cleared once, when curses starts
        for _ in range(3):
            fcgi_request(m.bind, "/")
        seen = len(reader.data)
        # Later frames: the clock's and the counters' changed cells, each after a cursor move
        # to its row ("ESC [ row ; col H"): several updates, none a full repaint.
        reader.read_until(lambda d: d[seen:].count(b"\x1b[1;") >= 3, 20, "later frames")
        later = reader.data[seen:]
        assert b"\x1b[2J" not in later and b"\x1b[H\x1b[J" not in later  # updated in place
        screen = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-B]|\x1b[=>]", b" ",
                        reader.data).decode(errors="replace")
        assert "REQ/S" in screen and "CURRENT" in screen
        os.write(master_fd, b"q")
        assert proc.wait(10) == 0
    finally:
        tracker.kill_all()
        os.close(master_fd)


def test_watch_rates_follow_worker_replacement() -> None:
    """A worker id whose pid changed counts from 0 again (no negative rates)."""
    from fcgi_manager.cli.watch import Rates

    rates = Rates()

    def snap(total: int, workers: List[tuple]) -> dict:
        return {"totals": {"accepted": total},
                "workers": [{"id": i, "pid": p, "requests": r} for i, p, r in workers]}
    assert rates.update(snap(100, [(1, 10, 60), (2, 20, 40)]), 0.0) is None
    rate = rates.update(snap(130, [(1, 11, 5), (2, 20, 65)]), 1.0)
    assert rate == {"requests_per_s": 30.0, "workers": {1: 5.0, 2: 25.0}, "interval_s": 1.0}
