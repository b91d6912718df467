"""Under load a worker rewrites its scoreboard slot twice per request, without a lock,
while the master reads it every tick to time requests against ``workers.timeout``.

A read that falls between the two halves of a write can pair the "busy" state with the
idle record's start time (0): the request then looks as old as the machine's uptime, and
the master killed a healthy worker "past workers.timeout" in the middle of a keep-conn
load test (nginx then logged "Connection reset by peer"). Readers must never see that.
"""

from __future__ import annotations

import os
import signal
import time

from fcgi_manager.scoreboard import Scoreboard, SlotWriter

from .support import figure


def test_a_slot_read_during_writes_never_shows_an_ancient_busy_request() -> None:
    board = Scoreboard(2)
    board.assign(0, 1, 1)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the writer, as fast as a worker can go
        try:
            writer = SlotWriter(board, 0)
            while True:
                writer.busy("GET", "/")
                writer.idle()
        finally:
            os._exit(0)
    reads = busy = ancient = 0
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            slot = board.read_slot(0)
            reads += 1
            if slot["state"] == "busy":
                busy += 1
                if time.monotonic() - float(slot["busy_since"]) > 5.0:  # type: ignore
                    ancient += 1
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        board.close()
    figure("scoreboard: reads during writes (busy / ancient)", f"{reads} ({busy} / {ancient})")
    assert busy > 0, "the writer never showed busy: the test measured nothing"
    assert ancient == 0
