"""Item 4: an app that kills its worker on every request, and a deploy that breaks.

* Under steady load, an app calling ``os._exit(1)`` per request puts the master in backoff
  (``backoff_s`` in ``status --json``; respawns grow slowly) and the master stays idle;
  fixing the file and running ``reload`` brings service back.
* ``preload = false``: a reload whose new code fails to import is refused (exit 1) and
  the old workers keep serving.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List

from support import fcgi_request, wait_for

from .support import (
    LoadProcesses,
    figure,
    process_cpu_seconds,
    rel_manager,
    status,
    wait_pool,
    worker_pids,
)

CRASHING = '''import os


def app(environ, start_response):
    os._exit(1)
'''
GOOD = '''import os


def app(environ, start_response):
    body = ("ok from %d" % os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''
BROKEN = '''raise RuntimeError("this deploy is broken on purpose")
'''


def _app_dir(tmp_path: Path, name: str, text: str) -> Path:
    apps = tmp_path / "apps"
    apps.mkdir(exist_ok=True)
    (apps / f"{name}.py").write_text(text)
    return apps


def test_crash_loop_backs_off_and_reload_recovers(make_manager: Any, tmp_path: Path) -> None:
    apps = _app_dir(tmp_path, "looper", CRASHING)
    manager = rel_manager(make_manager, app="looper:app", extra_path=[apps])
    manager.start()
    master = status(manager)["pid"]
    with LoadProcesses(manager.bind, 2, tmp_path, timeout=2) as load:
        # Let the loop get going, then watch it for 3 s.
        wait_for(lambda: status(manager)["totals"]["crashes"] >= 3, 15, "crashes")
        samples: List[Dict[str, Any]] = []
        cpu_before = process_cpu_seconds(master)
        started = time.monotonic()
        while time.monotonic() - started < 3.0:
            data = status(manager)
            samples.append({"t": round(time.monotonic() - started, 2),
                            "backoff_s": data["backoff_s"],
                            "respawns": data["totals"]["respawns"],
                            "crashes": data["totals"]["crashes"]})
            time.sleep(0.2)  # the sampling pace inside the measuring window
        window = time.monotonic() - started
        master_cpu = 100.0 * (process_cpu_seconds(master) - cpu_before) / window
        respawned = samples[-1]["respawns"] - samples[0]["respawns"]
        max_backoff = max(s["backoff_s"] for s in samples)
        failed_before_fix = sum(c["failed"] for c in load.counts())

        # Fix the app and reload: service comes back.
        (apps / "looper.py").write_text(GOOD)
        reload_started = time.monotonic()
        result = manager.cli("reload", timeout=60)
        reloaded_in = time.monotonic() - reload_started
        at_fix = [c["ok"] for c in load.counts()]
        wait_for(lambda: all(c["ok"] > n + 5 for c, n in zip(load.counts(), at_fix)), 20,
                 "both clients served after the fix")
        recovered_in = time.monotonic() - reload_started
    after = status(manager)
    text = "; ".join([
        figure("crash loop: max backoff_s seen", max_backoff, "s"),
        figure("crash loop: respawns in 3 s", respawned),
        figure("crash loop: master CPU over 3 s", master_cpu, "%"),
        figure("crash loop: failed requests before the fix", failed_before_fix),
        figure("crash loop: reload took", reloaded_in, "s"),
        figure("crash loop: serving again after", recovered_in, "s"),
        figure("crash loop: samples", samples[::3]),
    ])
    assert max_backoff > 0, text
    assert respawned <= 15, text
    assert master_cpu < 5, text
    assert result.returncode == 0, (text, result)
    assert after["pid"] == master and after["generation"] == 2, text
    assert fcgi_request(manager.bind, "/").status_code == 200, text


def test_reload_with_a_broken_import_is_refused(make_manager: Any, tmp_path: Path) -> None:
    apps = _app_dir(tmp_path, "deployed", GOOD)
    manager = rel_manager(make_manager, app="deployed:app", extra_path=[apps])
    manager.update("app", preload=False)
    manager.start()
    before = wait_pool(manager, 2)
    (apps / "deployed.py").write_text(BROKEN)
    with LoadProcesses(manager.bind, 1, tmp_path, timeout=5) as load:
        load.wait_started()
        result = manager.cli("reload", timeout=60)
        at_reload = load.counts()[0]["ok"]
        wait_for(lambda: load.counts()[0]["ok"] > at_reload + 20, 10, "serving after")
        counts = load.stop()
    after = status(manager)
    reply = fcgi_request(manager.bind, "/")
    text = "; ".join([
        figure("broken reload: exit status", result.returncode),
        figure("broken reload: message", (result.stderr or result.stdout).strip()[-300:]),
        figure("broken reload: client during it", counts[0]),
    ])
    assert result.returncode == 1, (text, result)
    assert "broken on purpose" in result.stderr + result.stdout, (text, result)
    assert after["generation"] == before["generation"], text
    assert worker_pids(after) == worker_pids(before), text
    assert counts[0]["failed"] == 0, text
    assert reply.status_code == 200 and b"ok from" in reply.body, (text, reply)
