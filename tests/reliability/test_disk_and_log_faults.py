"""Item 8: disk and log faults never stop serving.

* ``manager.log = "/dev/full"``: every log write fails with ENOSPC; requests go on and the
  master (``start --foreground``) reports the failure once on its stderr.
* The log file is replaced by a directory, then ``reopen-logs``: the reopen fails and
  says so (exit status 1), logging goes on in the old file, and serving goes on.
* The disk is "full" for request bodies (``RLIMIT_FSIZE`` makes the spool file's writes
  fail with EFBIG): that request's connection is closed with one log line; the worker and
  every other request are fine.
"""

from __future__ import annotations

import resource
from typing import Any

from support import fcgi_request, wait_for

from .support import (
    Foreground,
    LoadClient,
    connect,
    figure,
    rel_manager,
    start_with_limit,
    status,
    wait_closed,
    worker_pids,
)


def _garbage_connection(address: str) -> None:
    """A connection the worker rejects with a log line (the log gets written)."""
    with connect(address) as sock:
        sock.sendall(b"\x07garbage\x00\x00\x00\x00\x00\x00\x00\x00")
        wait_closed(sock, 10)


def test_log_on_a_full_disk(make_manager: Any) -> None:
    manager = rel_manager(make_manager)
    manager.update("manager", log="/dev/full")
    fg = Foreground(manager)
    try:
        before = fg.wait_ready(2)
        good = LoadClient(manager.bind)
        good.start()
        try:
            for _ in range(5):  # worker log lines, each a failed write in the master
                _garbage_connection(manager.bind)
            scaled = status(manager)
            manager.cli("scale", "+1")  # master log lines, and a worker start
            wait_for(lambda: len(status(manager)["workers"]) == 3, 10, "3 workers")
            wait_for(lambda: good.done > 50, 10, "requests served")
        finally:
            good.stop()
        after = status(manager)
    finally:
        code = fg.close()
    stderr = fg.stderr()
    reports = [line for line in stderr.splitlines() if "/dev/full" in line]
    text = "; ".join([
        figure("log on /dev/full: reports on stderr", reports),
        figure("log on /dev/full: good client", good.summary()),
        figure("log on /dev/full: master exit status", code),
    ])
    assert len(reports) == 1, (text, stderr)
    assert "log write failing: ENOSPC on /dev/full" in reports[0], (text, stderr)
    assert not good.failures, text
    assert after["pid"] == before["pid"] == scaled["pid"], text
    assert after["totals"]["crashes"] == 0, text
    assert code == 0, (text, stderr)


def test_log_file_replaced_by_a_directory(make_manager: Any) -> None:
    manager = rel_manager(make_manager)
    fg = Foreground(manager)
    try:
        before = fg.wait_ready(2)
        good = LoadClient(manager.bind)
        good.start()
        try:
            manager.log.rename(manager.log.with_name("rotated.log"))
            manager.log.mkdir()
            results = [manager.cli("reopen-logs") for _ in range(3)]
            _garbage_connection(manager.bind)
            done = good.done
            wait_for(lambda: good.done > done + 50, 10, "requests served after")
        finally:
            good.stop()
        after = status(manager)
    finally:
        code = fg.close()
    stderr = fg.stderr()
    reports = [line for line in stderr.splitlines() if "log file" in line or "the log" in line]
    rotated = manager.log.with_name("rotated.log").read_text()
    text = "; ".join([
        figure("log replaced by a directory: reopen-logs exit status",
               [r.returncode for r in results]),
        figure("log replaced by a directory: reports on stderr", reports),
        figure("log replaced by a directory: good client", good.summary()),
    ])
    # Each failed reopen is reported (stderr: at most once per attempt) and refused.
    assert 1 <= len(reports) <= len(results), (text, stderr)
    assert all("Is a directory" in line for line in reports), (text, stderr)
    for result in results:
        assert result.returncode == 1 and "Is a directory" in result.stderr, (text, result)
    assert not good.failures, text
    assert after["pid"] == before["pid"] and after["totals"]["crashes"] == 0, text
    assert "closed a connection" in rotated, text  # logging went on in the old file
    assert code == 0, (text, stderr)


def test_request_body_spool_on_a_full_disk(make_manager: Any) -> None:
    limit = 1 << 20
    manager = rel_manager(make_manager, worker_opts={"max_body_in_memory": "64KiB"})

    start_with_limit(manager, resource.RLIMIT_FSIZE, limit)
    before = status(manager)
    log_start = len(manager.log_text())
    good = LoadClient(manager.bind)
    good.start()
    try:
        try:
            reply = fcgi_request(manager.bind, "/echo", "POST", b"z" * (2 * limit), timeout=10)
            outcome = f"answered {reply.status!r}"
        except OSError as exc:
            outcome = f"failed: {exc!r}"
        manager.wait_log("cannot spool")
        fits = fcgi_request(manager.bind, "/echo", "POST", b"y" * (limit // 2))
    finally:
        good.stop()
    lines = [line for line in manager.log_text()[log_start:].splitlines() if "[worker" in line]
    after = status(manager)
    text = "; ".join([
        figure("full disk for bodies: the 2 MiB request", outcome),
        figure("full disk for bodies: worker log lines", lines),
        figure("full disk for bodies: a 512 KiB body", fits.body.strip()[:40]),
        figure("full disk for bodies: good client", good.summary()),
    ])
    assert len(lines) == 1 and "File too large" in lines[0], text
    assert fits.status_code == 200 and fits.body.startswith(b"524288 "), (text, fits)
    assert not good.failures, text
    assert after["totals"]["crashes"] == 0 and worker_pids(after) == worker_pids(before), text


