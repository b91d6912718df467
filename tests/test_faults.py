"""Under faults, the limits hold as written (issue: memory checked per request, no fixed
pauses, no false timeouts, no silent losses). Each test goes through the real CLI and a
real master; none is timed to the second: bounds with margins, polling with deadlines.
"""

from __future__ import annotations

import collections
import os
import resource
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from support import (
    ProcessTracker,
    _child_env,
    connect_fcgi,
    fcgi_request,
    skip_or_fail,
    wait_for,
)

APP = "threads_app:app"


def get(manager: Any, path: str, timeout: float = 10.0) -> Any:
    return fcgi_request(manager.bind, path, timeout=timeout,
                        QUERY_STRING=path.partition("?")[2])


# -- max_memory after every request ---------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 4])
def test_max_memory_is_checked_after_every_request(make_manager: Any, threads: int) -> None:
    """12 quick requests that each keep 50 MiB, max_memory 100 MiB: a worker may take a
    request only while under the limit, so none serves more than two of them (it was
    checked once a second: one worker served all twelve and reached 6x the limit)."""
    manager = make_manager(APP, count=1, workers={"threads": threads, "max_memory": "100M"})
    manager.start()
    served = collections.Counter()
    for _ in range(12):
        reply = get(manager, "/grow?mb=50")
        assert reply.status_code == 200
        served[int(reply.body)] += 1
    assert max(served.values()) <= 2, served
    data = manager.status()
    assert data["totals"]["crashes"] == 0
    assert all((w["rss_bytes"] or 0) < 200 << 20 for w in data["workers"]), data["workers"]
    manager.wait_log("is over workers.max_memory")


# -- the open-files limit ---------------------------------------------------------------------

def _limit_files(pid: int, room: int) -> None:
    """Let worker ``pid`` open only ``room`` more descriptors (as `ulimit -n` would). The
    limit bounds the descriptors' numbers, not their count: it lies above ``room`` free
    numbers."""
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    limit = free = 0
    while free < room:
        free += limit not in used
        limit += 1
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))


def test_at_the_open_files_limit_a_threaded_worker_resumes_within_milliseconds(
        make_manager: Any) -> None:
    """At the limit, a worker pauses accepting only until a connection of its own closes
    (it paused a fixed 0.5-1 s: 40 requests of 50 ms with room for 4 took ~10 s)."""
    manager = make_manager(APP, count=1, workers={"threads": 8})
    manager.start()
    (pid,) = manager.worker_pids()
    _limit_files(pid, 4)
    began = time.monotonic()
    with ThreadPoolExecutor(40) as pool:
        replies = list(pool.map(lambda i: get(manager, f"/sleep?s=0.05&i={i}", 30.0),
                                range(40)))
    elapsed = time.monotonic() - began
    assert [r.status_code for r in replies] == [200] * 40
    assert elapsed < 4.0, f"40 requests of 50 ms took {elapsed:.1f} s at the limit"
    data = manager.status()
    assert data["totals"]["accept_backoffs"] > 0, "the limit was never reached"
    log = manager.wait_log("the open-files limit is")
    assert log.count("the open-files limit is") == 1  # said once, with what to raise
    assert data["workers"][0]["accept_backoffs"] == data["totals"]["accept_backoffs"]


def test_at_the_open_files_limit_a_worker_accepts_as_soon_as_a_connection_closes(
        make_manager: Any) -> None:
    manager = make_manager(APP, count=1, workers={"read_timeout": 60})
    manager.start()
    (pid,) = manager.worker_pids()
    _limit_files(pid, 2)
    idle = [connect_fcgi(manager.bind) for _ in range(2)]  # they say nothing: parked
    try:
        wait_for(lambda: manager.status()["listen"]["queue"] in (0, None), 10,
                 "the idle connections accepted")
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(get, manager, "/", 20.0)
            wait_for(lambda: manager.status()["totals"]["accept_backoffs"] > 0, 10,
                     "the worker at its open-files limit")
            assert not waiting.done()
            idle.pop().close()
            closed = time.monotonic()
            assert waiting.result().status_code == 200
            assert time.monotonic() - closed < 0.5 + 0.5  # the back-off's cap, and margin
    finally:
        for sock in idle:
            sock.close()


# -- stable worker ids -----------------------------------------------------------------------

def test_a_replacement_keeps_the_id_of_the_worker_it_replaces(make_manager: Any) -> None:
    """Recycled (max_requests) or killed for workers.timeout, the replacement shows the
    same id: per-worker series in metrics and logs continue (it came back as 2, then 3)."""
    manager = make_manager(APP, count=1, workers={"max_requests": 2, "timeout": 2})
    manager.start()
    (first,) = manager.worker_pids()
    for _ in range(2):
        assert get(manager, "/").status_code == 200
    data = wait_for(lambda: (d := manager.status())["workers"] and
                    d["workers"][0]["pid"] != first and d, 15, "the recycled worker replaced")
    assert [w["id"] for w in data["workers"]] == [1]
    second = data["workers"][0]["pid"]
    try:
        reply = get(manager, "/sleep?s=30", 20.0)  # killed for workers.timeout
        assert reply.status_code != 200
    except OSError:
        pass  # the connection closed under the request
    data = wait_for(lambda: (d := manager.status())["totals"]["timeouts"] == 1 and
                    len(d["workers"]) == 1 and d["workers"][0]["pid"] != second and d, 15,
                    "the timed-out worker replaced")
    assert [w["id"] for w in data["workers"]] == [1]
    assert "[worker 2 " not in manager.log_text()


# -- a stalled master, a stopped worker -----------------------------------------------------

def test_a_stopped_master_during_an_error_flood_kills_no_worker(make_manager: Any) -> None:
    """Workers never wait for the master to read their output: with the master stopped
    for three times workers.timeout while they write tracebacks, every request is answered
    and no worker is killed when it resumes (it killed every busy one: their stacks were
    inside ``logging``). The lines that did not fit are counted and said, never torn.
    The log is the master's stderr, so the workers' lines go through its pipe (to a log
    file they write themselves: test_log_direct.py)."""
    manager = make_manager(APP, count=2, workers={"timeout": 2}, manager={"log": "-"})
    manager.log = manager.tmp / "stderr.log"
    tracker = ProcessTracker()
    with open(manager.log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "fcgi_manager", "-c",
                                 str(manager.config), "start", "--foreground"],
                                cwd=str(manager.tmp), env=_child_env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr)
    tracker.add(proc.pid)
    try:
        wait_for(lambda: manager.status_code() == 0, 30, "the foreground master")
        _stopped_master_flood(manager)
        manager.stop()
        proc.wait(timeout=30)
    finally:
        tracker.kill_all()


def _stopped_master_flood(manager: Any) -> None:
    master = manager.pid()
    codes: collections.Counter = collections.Counter()
    os.kill(master, signal.SIGSTOP)
    try:
        stop_at = time.monotonic() + 6.5
        with ThreadPoolExecutor(4) as pool:
            def flood(_: int) -> None:
                while time.monotonic() < stop_at:
                    codes[get(manager, "/err", 10.0).status_code] += 1
            list(pool.map(flood, range(4)))
    finally:
        os.kill(master, signal.SIGCONT)
    assert set(codes) == {200} and sum(codes.values()) > 20, codes
    log = manager.wait_log("were lost (the master did not read them in time)", 15)
    data = manager.status()
    assert data["totals"]["timeouts"] == 0 and data["totals"]["crashes"] == 0, log[-3000:]
    assert "past workers.timeout" not in log
    assert data["totals"]["log_lines_lost"] > 0
    for line in log.splitlines():  # every captured line is whole: each starts tagged
        assert line[:4].isdigit() or line.startswith("  ") or not line.strip(), line[:200]


def test_a_stopped_idle_worker_is_shown_stopped_then_replaced_as_stuck(
        make_manager: Any) -> None:
    manager = make_manager(APP, count=2, workers={"timeout": 3})
    manager.start()
    data = manager.wait_workers(2)
    frozen = next(w for w in data["workers"] if w["id"] == 1)["pid"]
    os.kill(frozen, signal.SIGSTOP)
    try:
        seen = wait_for(lambda: (d := manager.status()) and any(
            w["pid"] == frozen and w["stopped"] for w in d["workers"]) and d, 5,
            "status to show the worker stopped")
        assert [w["stopped"] for w in seen["workers"]].count(True) == 1
        data = wait_for(lambda: (d := manager.status())["totals"]["stuck"] == 1 and
                        frozen not in [w["pid"] for w in d["workers"]] and
                        len(d["workers"]) == 2 and d, 15, "the stuck worker replaced")
    finally:
        try:
            os.kill(frozen, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert sorted(w["id"] for w in data["workers"]) == [1, 2]
    assert data["totals"]["crashes"] == 0
    assert "missed its heartbeat" in manager.log_text()
    assert get(manager, "/").status_code == 200


def test_output_lines_are_dropped_whole_and_the_loss_is_said_first() -> None:
    """The worker's output writer on a pipe nobody reads: whole lines queue up to a bound,
    the newest are dropped (counted), and once the pipe drains the first line after them
    says how many were lost; no line is ever cut."""
    from fcgi_manager.worker.outpipe import LineWriter

    r, w = os.pipe()
    os.set_blocking(w, False)
    os.set_blocking(r, False)
    counted = []
    writer = LineWriter(w)
    writer.on_lost = counted.append
    try:
        for i in range(2000):
            writer.write(f"{i} " + "x" * 1000 + "\n")
        assert writer.lost > 0 and counted[-1] == writer.lost
        data = b""
        while True:
            try:
                data += os.read(r, 1 << 20)
            except BlockingIOError:
                if not writer.pending:
                    break
                writer.retry()
        lines = [line for line in data.split(b"\n") if line]
        notices = [line for line in lines if line.startswith(b"fcgi-manager: ")]
        assert notices == [f"fcgi-manager: {writer.lost} line(s) of this worker's output "
                           "were lost (the master did not read them in time)".encode()]
        assert all(len(line) == len(line.split()[0]) + 1001 for line in lines
                   if line not in notices)
        assert len(lines) - 1 + writer.lost == 2000
    finally:
        os.close(r)
        os.close(w)


# -- a full log disk --------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Any) -> Any:
    """A 256 KiB tmpfs of the test's own (root only), unmounted at teardown."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mnt)],
            capture_output=True).returncode != 0:
        skip_or_fail("needs root and mount(8) for a full disk")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(path: Any) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 512):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_full_log_disk_counts_lost_lines_and_says_so_when_it_works_again(
        make_manager: Any, small_disk: Any) -> None:
    log = small_disk / "app.log"
    manager = make_manager(APP, count=1, manager={"log": str(log)})
    manager.log = log
    manager.start()
    filler = small_disk / "filler"
    _fill(filler)
    for _ in range(5):
        assert get(manager, "/err").status_code == 200  # lines the master cannot write
    data = wait_for(lambda: (d := manager.status())["log_error"] and d, 10,
                    "status to say the log write fails")
    assert data["log_error"] == f"log write failing: ENOSPC on {log}"
    assert data["totals"]["log_lines_lost"] > 0
    filler.unlink()
    manager.cli("scale", "2")  # something to log once there is room again
    text = manager.wait_log("log line(s) were lost while writing failed (ENOSPC on", 10)
    assert wait_for(lambda: manager.status()["log_error"] is None, 10, "the error cleared")
    for line in text.splitlines():
        assert line[:4].isdigit() or line.startswith(("  ", "Traceback")) or not line.strip(), \
            f"a torn fragment in the log: {line[:120]!r}"


# -- log rotation ------------------------------------------------------------------------------

def _holds_deleted(pid: int, name: str) -> bool:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if name in target and target.endswith("(deleted)"):
            return True
    return False


@pytest.mark.parametrize("threads", [1, 4])
def test_idle_workers_reopen_the_access_log_at_once(make_manager: Any, tmp_path: Any,
                                                    threads: int) -> None:
    """logrotate's compress deletes the rotated file: an idle worker that kept it open
    until its next request kept its space from being freed."""
    access = tmp_path / "access.log"
    manager = make_manager(APP, count=2, workers={"threads": threads},
                           manager={"access_log": str(access)})
    manager.start()
    pids = manager.worker_pids()
    rotated = tmp_path / "access.log.1"
    access.rename(rotated)
    rotated.unlink()  # compress: the old file is gone
    assert manager.cli("reopen-logs").returncode == 0
    wait_for(lambda: not any(_holds_deleted(p, "access.log") for p in pids), 3,
             "every idle worker to let go of the deleted access log")
    assert access.exists()
    assert manager.worker_pids() == pids  # reopened, not replaced


# -- the access log and a kill ----------------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 4])
def test_a_finished_requests_access_line_survives_a_kill_for_timeout(
        make_manager: Any, tmp_path: Any, threads: int) -> None:
    """Lines wait up to a second in the worker's buffer: a request killed for
    workers.timeout right after another one finished took that one's line with it."""
    access = tmp_path / "access.log"
    manager = make_manager(APP, count=1, workers={"threads": threads, "timeout": 2},
                           manager={"access_log": str(access)})
    manager.start()
    assert get(manager, "/?finished-first").status_code == 200
    try:
        get(manager, "/sleep?s=30", 20.0)  # killed for workers.timeout
    except OSError:
        pass
    wait_for(lambda: manager.status()["totals"]["timeouts"] == 1, 15, "the kill")
    assert "finished-first" in access.read_text()
