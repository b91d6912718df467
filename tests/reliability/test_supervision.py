"""The master's loop never waits, and what it asks of a worker shows in ``status``.

* A reload whose new code takes 8 s to import, while a worker is SIGKILLed: the check
  runs beside the loop, so the worker is replaced within 2 s, ``status`` answers within
  1 s all along, and no request fails but the killed worker's own.
* Control clients that send a byte a second (several at once) delay neither ``status``
  from another client nor the master's timers; each is closed when its time is up.
* A worker asked to stop while it finishes a request shows ``stopping`` (with the request
  it finishes) until it exits.
* A worker that grows over ``max_memory`` after its last request, and then gets no more,
  is recycled from the master's own memory samples within 5 s.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from support import fcgi_request, pid_alive, wait_for

from .support import LoadProcesses, ctl, figure, rel_manager, status, wait_pool, worker_pids

FAST = '''import os


def app(environ, start_response):
    body = ("ok from %d" % os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''
SLOW_IMPORT = "import time\ntime.sleep(8)\n" + FAST

GROWER = '''import os
import threading
import time
from urllib.parse import parse_qs

KEPT = []


def _grow(mib, delay, marker):
    time.sleep(delay)
    with open(marker, "w") as f:  # growing from now on
        f.write(str(os.getpid()))
    for _ in range(mib):
        KEPT.append(bytearray(1 << 20))
        KEPT[-1][::4096] = b"x" * 256  # touch every page: resident, not just reserved


def app(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if environ.get("PATH_INFO") == "/grow-later":
        # Grows after the response, once the worker's own check (right after the
        # request) has passed: only the master's samples can see it.
        args = (int(query["mib"][0]), float(query["delay"][0]), query["marker"][0])
        threading.Thread(target=_grow, args=args, daemon=True).start()
    body = ("ok from %d" % os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


def _app_dir(tmp_path: Path, name: str, text: str) -> Path:
    apps = tmp_path / "apps"
    apps.mkdir(exist_ok=True)
    (apps / f"{name}.py").write_text(text)
    return apps


def _timed_status(manager: Any) -> float:
    started = time.monotonic()
    status(manager)
    return time.monotonic() - started


def test_slow_reload_check_blocks_nothing(make_manager: Any, tmp_path: Path) -> None:
    apps = _app_dir(tmp_path, "slowdeploy", FAST)
    manager = rel_manager(make_manager, app="slowdeploy:app", extra_path=[apps])
    manager.update("app", preload=False)
    manager.start()
    before = wait_pool(manager, 2)
    (apps / "slowdeploy.py").write_text(SLOW_IMPORT)
    result: Dict[str, Any] = {}
    with LoadProcesses(manager.bind, 1, tmp_path, timeout=10) as load:
        load.wait_started()
        reloader = threading.Thread(
            target=lambda: result.update(r=manager.cli("reload", timeout=120)), daemon=True)
        reloader.start()
        manager.wait_log("reload: checking the new configuration and code")
        victim = before["workers"][0]
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        latencies: List[float] = []

        def replaced() -> Optional[float]:
            latencies.append(_timed_status(manager))
            data = status(manager)
            ids = {w["id"]: w["pid"] for w in data["workers"]}
            if ids.get(victim["id"]) not in (None, victim["pid"]):
                return time.monotonic() - killed_at
            return None

        replaced_in = wait_for(replaced, 10, "the killed worker replaced")
        # The check goes on for seconds: status keeps answering all along.
        while time.monotonic() - killed_at < 5.0:
            latencies.append(_timed_status(manager))
            time.sleep(0.1)  # the sampling pace
        checking = "reload: re-executing" not in manager.log_text()
        reloader.join(90)
        at_reload = load.counts()[0]["ok"]
        wait_for(lambda: load.counts()[0]["ok"] > at_reload + 5, 20, "serving after")
        counts = load.stop()
    after = status(manager)
    text = "; ".join([
        figure("slow reload: killed worker replaced in", replaced_in, "s"),
        figure("slow reload: slowest status during the check", max(latencies), "s"),
        figure("slow reload: status calls", len(latencies)),
        figure("slow reload: still checking 5 s after the kill", checking),
        figure("slow reload: client", counts[0]),
    ])
    assert checking, text  # the 8 s import was still running while we measured
    assert replaced_in < 2.0, text
    assert max(latencies) < 1.0, text
    assert "r" in result and result["r"].returncode == 0, (text, result)
    assert after["generation"] == before["generation"] + 1, text
    assert counts[0]["failed"] <= 1, text  # at most the request the killed worker held


def _trickle(path: str, data: bytes, stop: threading.Event, out: Dict[str, Any]) -> None:
    """Send ``data`` a byte a second; record when the master closed the connection."""
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.settimeout(0.05)
        for byte in data:
            if stop.is_set():
                break
            try:
                sock.send(bytes([byte]))
                out["sent"] = out.get("sent", 0) + 1
                if sock.recv(1) == b"":
                    break
            except socket.timeout:
                continue
            except OSError:
                break
            finally:
                stop.wait(1.0)
        out["closed_after"] = time.monotonic() - started


def test_slow_control_clients_delay_no_one(make_manager: Any) -> None:
    manager = rel_manager(make_manager, workers=1, worker_opts={"slow_request": 0.5})
    manager.start()
    wait_pool(manager, 1)
    body = json.dumps({"id": 1, "command": "status", "args": {}}).encode()
    frame = struct.pack("!I", len(body)) + body
    stop = threading.Event()
    outcomes: List[Dict[str, Any]] = [{} for _ in range(4)]
    threads = [threading.Thread(target=_trickle, args=(str(manager.control), frame, stop, o),
                                daemon=True) for o in outcomes]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: all(o.get("sent") for o in outcomes), 10, "the trickles to start")
        latencies = [_timed_status(manager) for _ in range(10)]
        # A timer of the master: a slow request's stack is logged on time.
        slow_started = time.monotonic()
        reply = fcgi_request(manager.bind, "/sleep?s=1.5")
        logged = "is slow" in manager.log_text()
        slow_took = time.monotonic() - slow_started
        for t in threads:
            t.join(15)
    finally:
        stop.set()
    closed = [o.get("closed_after") for o in outcomes]
    text = "; ".join([
        figure("slow control clients: status latencies", [round(x, 3) for x in latencies]),
        figure("slow control clients: closed by the master after", closed, "s"),
        figure("slow control clients: slow request logged", f"{logged} ({slow_took:.2f} s)"),
    ])
    assert max(latencies) < 1.0, text
    assert reply.status_code == 200 and logged, text
    assert all(c is not None and c < 5.0 for c in closed), text


def test_stopping_shows_in_status_during_a_graceful_stop(make_manager: Any) -> None:
    manager = rel_manager(make_manager, workers=1)
    manager.start()
    before = wait_pool(manager, 1)
    replies: Dict[str, Any] = {}
    request = threading.Thread(target=lambda: replies.update(
        r=fcgi_request(manager.bind, "/sleep?s=3")), daemon=True)
    request.start()
    wait_for(lambda: status(manager)["workers"][0]["state"] == "busy", 10, "busy")
    ctl(manager, "stop")
    during = status(manager)
    request.join(20)
    wait_for(lambda: not pid_alive(before["pid"]), 20, "the master to exit")
    worker = during["workers"][0]
    text = "; ".join([
        figure("graceful stop: worker in status", {k: worker[k] for k in ("state", "current")}),
        figure("graceful stop: the request", getattr(replies.get("r"), "status", None)),
    ])
    assert worker["state"] == "stopping", text
    assert worker["current"] and "/sleep" in worker["current"]["uri"], text
    assert replies["r"].status_code == 200, text


def test_idle_worker_over_max_memory_is_recycled(make_manager: Any, tmp_path: Path) -> None:
    apps = _app_dir(tmp_path, "grower", GROWER)
    manager = rel_manager(make_manager, app="grower:app", workers=1, extra_path=[apps],
                          worker_opts={"max_memory": "96MiB"})
    manager.start()
    before = wait_pool(manager, 1)
    (first,) = worker_pids(before)
    marker = tmp_path / "grown"
    reply = fcgi_request(manager.bind,
                         f"/grow-later?mib=120&delay=1.5&marker={marker}")
    assert reply.status_code == 200
    wait_for(marker.exists, 20, "the worker to start growing")
    grown_at = time.monotonic()
    data = wait_for(lambda: (lambda d: first not in worker_pids(d) and d)(status(manager)),
                    10, "the grown worker recycled")
    recycled_in = time.monotonic() - grown_at
    data = wait_pool(manager, 1)
    log = manager.log_text()
    text = "; ".join([
        figure("max_memory: idle worker recycled after it began to grow", recycled_in, "s"),
        figure("max_memory: totals", data["totals"]),
    ])
    assert recycled_in < 5.0, text
    assert "is idle at" in log and "over workers.max_memory (96 MiB)" in log, text
    assert data["totals"]["recycled"] == 1 and data["totals"]["crashes"] == 0, text
    assert fcgi_request(manager.bind, "/").status_code == 200, text
