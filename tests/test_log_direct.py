"""Workers write their own lines to a log file (``outpipe.FileLineWriter``): under an error
flood the lines arrive whole, tagged and escaped as the master wrote them; reopen-logs
moves them to the new file; a stopped master holds none of them up. Through the real CLI
and real workers; every wait polls with a deadline."""

from __future__ import annotations

import json
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, List

from support import Manager, fcgi_request, wait_for

MakeManager = Callable[..., Manager]
APP = "flood:app"
TAGGED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[(worker \d+ pid (\d+)|master \d+)\] ")


def lines_of(path: Path) -> List[str]:
    try:
        return path.read_bytes().decode("utf-8").split("\n")[:-1]
    except FileNotFoundError:
        return []


def flood(m: Manager, prefix: str, count: int, clients: int = 4) -> None:
    """``count`` failing requests from ``clients`` threads, each answered 500."""
    def one(i: int) -> str:
        return fcgi_request(m.bind, f"/{prefix}/{i}").status

    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(one, range(count)))
    assert all(s.startswith("500") for s in statuses), statuses


def wait_marks(path: Path, prefix: str, count: int, timeout: float = 20.0) -> List[str]:
    """The lines of ``path`` once each of the ``count`` requests' second lines is there."""
    def done() -> Any:
        lines = lines_of(path)
        return lines if sum(f"] second line /{prefix}/" in ln for ln in lines) >= count \
            else None
    return wait_for(done, timeout, f"{count} '{prefix}' tracebacks in {path}")


def holds(pid: int, path: Path) -> bool:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
        except OSError:
            continue
    return False


def test_a_flood_reaches_the_file_whole_tagged_and_escaped(make_manager: MakeManager) -> None:
    m = make_manager(APP, count=2)
    m.start()
    workers = set(m.worker_pids())
    flood(m, "f", 200)
    assert fcgi_request(m.bind, "/print/p1").status.startswith("200")
    assert fcgi_request(m.bind, "/child/c1").status.startswith("200")
    lines = wait_marks(m.log, "f", 200)
    lines = wait_for(lambda: (ls := lines_of(m.log)) and any("child says" in ln for ln in ls)
                     and ls, 10, "the child process's line")
    raw = m.log.read_bytes()
    assert b"\x1b" not in raw and b"\r" not in raw  # escaped, never written as they are
    for line in lines:  # whole lines, each tagged: nothing torn or interleaved
        assert TAGGED.match(line), line[:200]
    seconds = [ln for ln in lines if re.search(r"\] second line /f/\d+$", ln)]
    assert sorted(ln.rsplit("/", 1)[1] for ln in seconds) == sorted(map(str, range(200)))
    pids = {int(match.group(2)) for ln in seconds if (match := TAGGED.match(ln))}
    assert pids <= workers and pids, (pids, workers)
    assert any(ln.endswith("] RuntimeError: flood /f/7 cr\\rinside esc\\x1b[31m")
               for ln in lines)
    assert any(re.search(r"\[worker \d+ pid \d+\] printed /print/p1 cr\\rinside esc\\x1b\[2J$",
                         ln) for ln in lines)
    assert any(re.search(r"\[worker \d+ pid \d+\] child says /child/c1$", ln) for ln in lines)
    assert m.status()["totals"]["log_lines_lost"] == 0


def test_json_lines_from_a_flood_are_objects_with_their_worker(
        make_manager: MakeManager) -> None:
    m = make_manager(APP, count=2, manager={"log_format": "json"})
    m.start()
    flood(m, "j", 40)

    def records() -> Any:
        objs = [json.loads(ln) for ln in lines_of(m.log)]
        return objs if sum("second line /j/" in o.get("message", "") for o in objs) >= 40 \
            else None
    objs = wait_for(records, 20, "40 tracebacks as JSON objects")
    tracebacks = [o for o in objs if "second line /j/" in o.get("message", "")]
    assert all(o["worker"] in (1, 2) and o["level"] == "error" for o in tracebacks)
    assert "cr\\rinside esc\\x1b[31m" in tracebacks[0]["message"]


def test_reopen_logs_moves_the_workers_lines_to_the_new_file(make_manager: MakeManager) -> None:
    m = make_manager(APP, count=2)
    m.start()
    flood(m, "before", 8)
    wait_marks(m.log, "before", 8)
    rotated = m.log.with_name(m.log.name + ".1")
    os.rename(m.log, rotated)
    result = m.cli("reopen-logs")
    assert result.returncode == 0, result
    pids = m.worker_pids()
    # Idle workers let go of the old file at once (the master wakes them), not at their
    # next line: logrotate's compress would delete it with its space still held.
    wait_for(lambda: not any(holds(pid, rotated) for pid in pids), 10,
             "the workers to close the rotated file")
    assert all(holds(pid, m.log) for pid in pids)
    flood(m, "after", 40)
    wait_marks(m.log, "after", 40)
    old = rotated.read_bytes()
    assert b"/after/" not in old
    flood(m, "later", 8)
    wait_marks(m.log, "later", 8)
    assert rotated.read_bytes() == old  # nothing more in the old file
    assert m.worker_pids() == pids  # reopened, not replaced


def test_a_stopped_master_does_not_stop_the_workers_logging(make_manager: MakeManager) -> None:
    """The master relayed every line: stopped, it held the workers' tracebacks back (and,
    past the pipe's room, they were lost). Writing the file themselves, workers log on."""
    m = make_manager(APP, count=2, workers={"timeout": 60})
    m.start()
    master = m.pid()
    os.kill(master, signal.SIGSTOP)
    try:
        flood(m, "stopped", 300)
        wait_marks(m.log, "stopped", 300)  # all of them, while the master is stopped
    finally:
        os.kill(master, signal.SIGCONT)
    data = m.status()
    assert data["totals"]["log_lines_lost"] == 0
    assert data["totals"]["timeouts"] == 0 and data["totals"]["crashes"] == 0
