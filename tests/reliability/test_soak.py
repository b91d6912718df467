"""Item 7: ``bench/soak.py`` in its short form (15 s): load, reloads and recycles, with the
master's RSS sampled every second; it must stay flat and no request may fail. Also the
regression test for what the full soak found (a connection closed under its client when
its worker stopped)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import (
    FcgiReply,
    cgi_params,
    fcgi_request,
    fcgi_request_bytes,
    pid_alive,
    read_fcgi_records,
    wait_for,
)

from .support import (
    ROOT,
    connect,
    figure,
    rel_manager,
    wait_pool,
    watches_listener,
    worker_pids,
)


def test_short_soak(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--seconds", "15", "--json",
         str(out)], cwd=str(ROOT), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=120)
    figures = json.loads(out.read_text()) if out.exists() else {}
    figures.pop("samples", None)
    text = "; ".join([
        figure("soak: output", proc.stdout.strip()),
        figure("soak: master slope", figures.get("master_slope_kib_per_min"), "KiB/min"),
        figure("soak: master rise", figures.get("master_rise_kib"), "KiB"),
        figure("soak: workers' mean slope", figures.get("workers_mean_slope_kib_per_min"),
               "KiB/min"),
        figure("soak: figures", figures),
    ])
    assert proc.returncode == 0, (text, proc.stderr)
    assert figures["requests"] > 1000 and figures["failed"] == 0, text
    assert figures["reloads"] >= 2 and figures["recycled"] > 0, text
    assert figures["crashes"] == 0, text


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("how", ["recycle", "reload"])
def test_a_connection_accepted_before_the_worker_stops_is_served(make_manager: Any,
                                                                 how: str) -> None:
    """What the soak caught: a worker that stops (recycled, or replaced by a reload) must
    not close a connection it accepted whose request had not arrived yet. It serves it
    itself, or hands it to the worker that replaces it (handoff.py)."""
    manager = rel_manager(make_manager, workers=1,
                          worker_opts={"max_requests": 1} if how == "recycle" else {})
    manager.start()
    (pid,) = worker_pids(wait_pool(manager, 1))
    count = _open_fds(pid)
    with connect(manager.bind) as fresh:
        wait_for(lambda: _open_fds(pid) > count, 5, "the worker to accept")
        if how == "recycle":
            first = fcgi_request(manager.bind, "/")  # its last request: it recycles now
            assert first.status_code == 200, first
        else:
            result = manager.cli("reload", timeout=60)
            assert result.returncode == 0, result
        # The worker has stopped accepting (and, before the fix, closed ``fresh``), or
        # has already handed ``fresh`` on and exited.
        assert wait_for(lambda: not pid_alive(pid) or not watches_listener(pid, manager.bind),
                        10, "the old worker to stop accepting")
        try:
            fresh.sendall(fcgi_request_bytes(cgi_params("/")))
            reply = FcgiReply(read_fcgi_records(fresh, 1, 10))
            outcome = repr(reply)
        except OSError as exc:
            reply, outcome = None, repr(exc)
    text = figure(f"fresh connection across a {how}", outcome)
    assert reply is not None and reply.status_code == 200, text
    # Answered by the old worker, or by the new one it handed the connection to.
    assert b"ok from " in reply.body, text
