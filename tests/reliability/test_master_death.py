"""Item 5: ``kill -9`` on the master under load. Every worker exits within a few seconds
(each PID checked), and ``start`` on the same config succeeds at once: no orphan holds
the socket, and the stale pidfile, listening socket and control socket are no obstacle."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Dict

from support import fcgi_request, pid_alive, wait_for

from .support import LoadProcesses, figure, rel_manager, wait_pool, worker_pids


def test_workers_exit_when_the_master_is_killed(make_manager: Any, tmp_path: Path) -> None:
    manager = rel_manager(make_manager, workers=4)
    manager.start()
    before = wait_pool(manager, 4)
    master = before["pid"]
    workers = worker_pids(before)
    gone_after: Dict[int, float] = {}
    with LoadProcesses(manager.bind, 4, tmp_path, timeout=5) as load:
        load.wait_started()
        os.kill(master, signal.SIGKILL)
        killed_at = time.monotonic()

        def all_gone() -> bool:
            for pid in workers:
                if pid not in gone_after and not pid_alive(pid):
                    gone_after[pid] = time.monotonic() - killed_at
            return len(gone_after) == len(workers)

        wait_for(all_gone, 15, "every worker to exit after the master died")
        restart_started = time.monotonic()
        result = manager.start(check=False)
        restart_took = time.monotonic() - restart_started
        assert result.returncode == 0, result
        manager.record()
        after = wait_pool(manager, 4)
        at_restart = [c["ok"] for c in load.counts()]
        wait_for(lambda: all(c["ok"] > n for c, n in zip(load.counts(), at_restart)), 15,
                 "every client served by the new master")
    reply = fcgi_request(manager.bind, "/")
    text = "; ".join([
        figure("master death: workers exited after", sorted(round(v, 3) for v in
                                                            gone_after.values()), "s"),
        figure("master death: start took", restart_took, "s"),
        figure("master death: start said", result.stdout.strip()),
    ])
    assert max(gone_after.values()) < 3.0, text
    assert after["pid"] != master and not set(worker_pids(after)) & set(workers), text
    assert reply.status_code == 200, (text, reply)
