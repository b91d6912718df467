"""fcgi-manager as PID 1 (a container without an init): workers start and serve, TERM is a
graceful stop that finishes the request in flight and exits 0, and the orphans an app
leaves behind are reaped instead of piling up as zombies."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Iterator, List

import psutil
import pytest
from support import FcgiReply, ended_early, fcgi_request, wait_for

from .support import Pid1Master, ns_pid, status, write_config

pytestmark = pytest.mark.needs("unshare")


@pytest.fixture
def masters(request: pytest.FixtureRequest) -> Iterator[List[Pid1Master]]:
    made: List[Pid1Master] = []
    yield made
    leaked = [m.master_pid for m in made if m.cleanup()]
    assert not leaked or ended_early(request.node), \
        f"masters still running after the test (killed now): {leaked}"


def test_workers_serve_and_term_stops_gracefully(tmp_path: Path,
                                                 masters: List[Pid1Master]) -> None:
    inst = write_config(tmp_path, "pid1", count=2)
    paths = inst["paths"]
    master = Pid1Master(paths["config"]).start()
    masters.append(master)
    master.wait_serving(paths["socket"], workers=2)
    assert ns_pid(master.master_pid) == 1, "the master is PID 1 of its namespace"
    workers = master.children()
    assert len(workers) == 2 and all(ns_pid(w.pid) != 1 for w in workers)
    for _ in range(10):
        reply = fcgi_request(f"unix:{paths['socket']}", "/hello")
        assert reply.status_code == 200, reply
    log = paths["log"].read_text()
    assert "unexpectedly" not in log, log

    # A request in flight when TERM comes is finished, then the master exits 0.
    replies: List[FcgiReply] = []
    slow = threading.Thread(target=lambda: replies.append(
        fcgi_request(f"unix:{paths['socket']}", "/sleep?s=1.5", timeout=30)))
    slow.start()
    wait_for(lambda: any(w["state"] == "busy" for w in status(paths["config"])["workers"]),
             10, "the slow request to start")
    master.signal(signal.SIGTERM)
    slow.join(30)
    assert replies and replies[0].status_code == 200, replies
    assert b"slept 1.5" in replies[0].body, replies[0]
    assert master.wait_exit(30) == 0, master.text()
    log = paths["log"].read_text()
    assert "got SIGTERM: stop" in log and "master stopped" in log, log
    assert not paths["socket"].exists(), "the socket file is removed on a clean stop"
    for w in workers:
        assert not psutil.pid_exists(w.pid) or w.status() == psutil.STATUS_ZOMBIE


def test_orphans_the_app_leaves_are_reaped(tmp_path: Path,
                                           masters: List[Pid1Master]) -> None:
    inst = write_config(tmp_path, "orphans", module="orphan:app", count=1)
    paths = inst["paths"]
    master = Pid1Master(paths["config"]).start()
    masters.append(master)
    master.wait_serving(paths["socket"], workers=1)
    worker_pids = {p.pid for p in master.children()}
    orphans: List[psutil.Process] = []
    for n in range(3):
        release = tmp_path / f"release-{n}"
        reply = fcgi_request(f"unix:{paths['socket']}", f"/orphan?release={release}")
        assert reply.status_code == 200, reply

        def handed_over(release: Path = release) -> List[psutil.Process]:
            return [p for p in master.children()
                    if p.pid not in worker_pids and str(release) in " ".join(p.cmdline())]
        orphan = wait_for(handed_over, 10, "the orphan to be handed to the master")[0]
        assert orphan.ppid() == master.master_pid
        orphans.append(orphan)
    for n in range(3):
        (tmp_path / f"release-{n}").touch()

    def reaped() -> bool:
        for orphan in orphans:
            try:
                orphan.status()  # a zombie still answers: it was not reaped
                return False
            except psutil.NoSuchProcess:
                pass
        return True
    wait_for(reaped, 10, lambda: "the orphans to be reaped (no zombie left): " + ", ".join(
        f"{p.pid}" for p in orphans))
    zombies = [p.pid for p in master.children() if p.status() == psutil.STATUS_ZOMBIE]
    assert not zombies, zombies
    assert paths["log"].read_text().count("not a worker (a process the app left behind)") == 3
    # The worker that started them still serves.
    assert fcgi_request(f"unix:{paths['socket']}", "/hello").status_code == 200
    master.signal(signal.SIGTERM)
    assert master.wait_exit(30) == 0, master.text()


def test_term_while_the_app_is_imported_ends_the_start(tmp_path: Path,
                                                      masters: List[Pid1Master]) -> None:
    """PID 1 gets no default signal action: TERM during a slow import must still stop it
    at once, instead of waiting for the runtime's SIGKILL."""
    started, release = tmp_path / "started", tmp_path / "release"
    inst = write_config(tmp_path, "boot", module="slow_boot:app", count=1,
                        app={"preload": True, "env": {"SLOW_BOOT_STARTED": str(started),
                                                      "SLOW_BOOT_RELEASE": str(release)}})
    master = Pid1Master(inst["paths"]["config"]).start()
    masters.append(master)
    wait_for(started.exists, 20, "the import to begin")
    began = time.monotonic()
    master.signal(signal.SIGTERM)
    assert master.wait_exit(10) == 128 + signal.SIGTERM, master.text()
    assert time.monotonic() - began < 5
    assert not release.exists()
    assert "got SIGTERM while starting, as PID 1: exiting" in master.text()
