"""What operators read: the access log, JSON logs, process titles, the post_fork hook and
the OpenMetrics page -- each through the real CLI, real workers and (where it matters) a
real nginx in front."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List

import psutil
import pytest
from support import Manager, Nginx, ProcessTracker, _child_env, fcgi_request, wait_for

MakeManager = Callable[..., Manager]
MakeNginx = Callable[..., Nginx]

TEXT_LINE = re.compile(
    r'^(?P<addr>\S+) - - \[(?P<time>\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\] '
    r'"(?P<method>\S+) (?P<uri>\S+) (?P<proto>[^"]+)" (?P<status>\d{3}) (?P<bytes>\d+|-) '
    r'(?P<ms>\d+\.\d{3})ms worker=(?P<worker>\d+) rss=(?P<rss>\d+\.\d)MiB '
    r'cpu=(?P<cpu>\d+\.\d{3})ms$')


def lines_of(path: Path) -> List[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def wait_lines(path: Path, needle: str, count: int = 1, timeout: float = 10.0) -> List[str]:
    """The lines of ``path`` containing ``needle``, once there are ``count`` of them (the
    access log is buffered: lines come within a second)."""
    return wait_for(lambda: [ln for ln in lines_of(path) if needle in ln]
                    if len([ln for ln in lines_of(path) if needle in ln]) >= count else None,
                    timeout, f"{count} line(s) with {needle!r} in {path}")


# -- access log ----------------------------------------------------------------------------

def test_access_log_lines_through_nginx_and_reopen(make_manager: MakeManager,
                                                   make_nginx: MakeNginx) -> None:
    """One line per request with every field php-fpm and gunicorn users grep for; moved by
    logrotate, it is reopened by ``reopen-logs`` and by SIGUSR1."""
    m = make_manager(count=2)
    access = m.tmp / "access.log"
    m.update("manager", access_log=str(access))
    m.start()
    nginx = make_nginx(m.bind)
    for i in range(6):
        resp = nginx.get(f"/hello/{i}?q=1", headers={"User-Agent": "tests/1.0"})
        assert resp.status == 200
    assert nginx.get("/crash/").status == 500
    found = wait_lines(access, "/hello/", 6)
    ids = {w["id"] for w in m.status()["workers"]}
    for line in found:
        match = TEXT_LINE.match(line)
        assert match, f"not the default format: {line!r}"
        assert match["addr"] == "127.0.0.1" and match["method"] == "GET"
        assert match["uri"].startswith("/hello/") and match["uri"].endswith("?q=1")
        assert match["proto"] == "HTTP/1.1" and match["status"] == "200"
        assert int(match["bytes"]) > 100  # the JSON body and its headers
        assert float(match["ms"]) > 0 and float(match["cpu"]) >= 0
        assert float(match["rss"]) > 5  # a Python worker's resident memory, in MiB
        assert int(match["worker"]) in ids
    crash = wait_lines(access, '"GET /crash/ ')
    assert TEXT_LINE.match(crash[0])["status"] == "500"

    rotated = m.tmp / "access.log.1"
    access.rename(rotated)
    result = m.cli("reopen-logs")
    assert result.returncode == 0, result
    for _ in range(4):  # both workers: each reopens at its next write
        assert nginx.get("/after-reopen").status == 200
    wait_lines(access, "/after-reopen", 4)
    assert not [ln for ln in lines_of(rotated) if "/after-reopen" in ln]

    access.rename(m.tmp / "access.log.2")
    os.kill(m.pid(), signal.SIGUSR1)
    wait_for(access.exists, 10, "SIGUSR1 to reopen the access log")
    assert nginx.get("/after-usr1").status == 200
    wait_lines(access, "/after-usr1")


def test_access_log_with_threads(make_manager: MakeManager) -> None:
    """``workers.threads``: each app thread measures its own requests (its own CPU clock),
    the lines meet in one file, and the main loop writes them once traffic stops."""
    m = make_manager(count=1, workers={"threads": 4},
                     manager={"access_log": "access.jsonl", "log_format": "json"})
    access = m.tmp / "access.jsonl"
    m.start()
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: fcgi_request(m.bind, f"/sleep?s=0.3&n={i}"),
                                range(8)))
    assert all(r.status.startswith("200") for r in replies)
    entries = wait_for(lambda: [json.loads(x) for x in lines_of(access)]
                       if len(lines_of(access)) >= 8 else None, 10, "8 access lines")
    assert sorted(e["uri"] for e in entries) == sorted(f"/sleep?s=0.3&n={i}"
                                                       for i in range(8))
    for e in entries:
        assert e["status"] == 200 and e["worker"] == 1 and e["duration_ms"] >= 300
        assert e["cpu_ms"] < e["duration_ms"] / 2  # it slept: this thread's CPU, not all's


def test_access_format_and_escaping(make_manager: MakeManager) -> None:
    """``access_format`` picks the atoms; request data cannot forge a line."""
    access = Path("access.log")
    m = make_manager(count=1, manager={
        "access_log": str(access),  # relative to the config file's directory
        "access_format": '%(m)s|%(U)s|%(q)s|%(s)s|%(B)s|%(D)s|%(w)s|%(rss)s|%(cpu_pct)s|%(a)s',
    })
    access = m.tmp / "access.log"
    m.start()
    reply = fcgi_request(m.bind, "/path?secret=1", HTTP_USER_AGENT='evil"\n127.0.0.1 fake')
    assert reply.status.startswith("200")
    line = wait_lines(access, "|/path|")[0]
    method, path, query, status, nbytes, micros, worker, rss, cpu_pct, agent = line.split("|")
    assert (method, path, query, status) == ("GET", "/path", "secret=1", "200")
    assert int(nbytes) > len(reply.body) and int(micros) > 0 and worker == "1"
    assert int(rss) > 1 << 20 and 0 <= float(cpu_pct) <= 100.0 * 2
    assert agent == "evil\\x22\\x0a127.0.0.1 fake"
    assert len(lines_of(access)) == 1


def test_bad_access_format_is_a_config_error(make_manager: MakeManager) -> None:
    m = make_manager(count=1, manager={"access_format": "%(h)s %(nope)s"})
    result = m.start(check=False)
    assert result.returncode != 0
    assert "access_format" in result.stderr and "nope" in result.stderr, result


def test_access_log_to_stderr_in_the_foreground(make_manager: MakeManager) -> None:
    """``access_log = "-"``: lines go to the master's stderr, untagged (not as worker
    output), while the manager's own log goes to its file."""
    m = make_manager(count=1, manager={"access_log": "-"})
    tracker = ProcessTracker()
    proc = subprocess.Popen([sys.executable, "-m", "fcgi_manager", "-c", str(m.config),
                             "start", "--foreground"], cwd=str(m.tmp), env=_child_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    tracker.add(proc.pid)
    try:
        wait_for(lambda: m.status_code() == 0, 30, "the foreground master")
        m.record()
        assert fcgi_request(m.bind, "/to-stderr").status.startswith("200")
        m.stop()
        _, err = proc.communicate(timeout=30)
    finally:
        tracker.kill_all()
    text = err.decode(errors="replace")
    lines = [ln for ln in text.splitlines() if "/to-stderr" in ln]
    assert len(lines) == 1 and TEXT_LINE.match(lines[0]), text
    assert "/to-stderr" not in m.log_text()


# -- JSON logs -----------------------------------------------------------------------------

def test_json_logs_and_json_access_log(make_manager: MakeManager) -> None:
    """``log_format = "json"``: every line of the log is one object with ts, level, pid and
    worker; worker records stay one object even with a traceback; the app's own output is
    tagged with its worker; the access log is JSON lines with every field."""
    m = make_manager("hooks:app", count=1, manager={"log_format": "json",
                                                     "access_log": "access.jsonl"})
    access = m.tmp / "access.jsonl"
    m.start()
    worker = m.status()["workers"][0]
    assert fcgi_request(m.bind, "/print").status.startswith("200")
    m.cli("stop")
    entries = [json.loads(line) for line in lines_of(m.log)]  # every line parses
    assert entries
    for entry in entries:
        assert {"ts", "level", "pid", "worker", "event", "message"} <= set(entry), entry
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$", entry["ts"])
    master = [e for e in entries if e["worker"] is None]
    assert master and all(e["pid"] == entries[0]["pid"] for e in master)
    printed = [e for e in entries if e["message"] == "a line the app printed"]
    assert printed and printed[0]["worker"] == worker["id"]
    assert printed[0]["pid"] == worker["pid"] and printed[0]["event"] == "output"

    requests = [json.loads(line) for line in lines_of(access)]
    assert len(requests) == 1
    req = requests[0]
    assert req["event"] == "request" and req["worker"] == worker["id"]
    assert req["pid"] == worker["pid"] and req["method"] == "GET" and req["uri"] == "/print"
    assert req["status"] == 200 and req["bytes"] > 0 and req["duration_ms"] > 0
    assert req["rss_bytes"] > 1 << 20 and req["cpu_ms"] >= 0
    assert req["remote_addr"] == "127.0.0.1" and req["level"] == "info"


def test_json_log_keeps_a_worker_traceback_in_one_object(make_manager: MakeManager) -> None:
    m = make_manager(count=1, manager={"log_format": "json"})
    m.start()
    assert fcgi_request(m.bind, "/crash/").status.startswith("500")
    found = wait_for(lambda: [e for e in map(json.loads, lines_of(m.log))
                              if "CrashedOnPurpose" in e["message"]], 10, "the traceback")
    entry = found[0]
    assert entry["level"] == "error" and entry["worker"] == 1
    assert "Traceback (most recent call last)" in entry["message"]
    assert "\n" in entry["message"]  # the whole traceback, in this one object


# -- process titles ------------------------------------------------------------------------

def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_process_titles(make_manager: MakeManager) -> None:
    """``ps`` and ``top`` tell the master from each worker: comm always, the full title in
    the command line with the setproctitle extra (a test dependency)."""
    import setproctitle  # noqa: F401 - the optional extra must be there for this test

    m = make_manager(count=2, manager={"name": "shop"})
    m.start()
    data = m.status()
    assert _comm(data["pid"]) == "fcgi-mgr master"
    assert _cmdline(data["pid"]) == f"fcgi-manager: master [shop] ({m.config})"
    for w in data["workers"]:
        assert _comm(w["pid"]) == f"fcgi-worker {w['id']}"
        assert _cmdline(w["pid"]) == f"fcgi-manager: worker {w['id']} [shop]"
    # Found by name, as an operator would.
    named = {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "fcgi-mgr master"}
    assert data["pid"] in named
    # Reload re-executes the master: its title survives.
    assert m.cli("reload").returncode == 0
    assert _comm(m.pid()) == "fcgi-mgr master"
    assert m.stop().returncode == 0


# -- post_fork -----------------------------------------------------------------------------

def test_post_fork_runs_in_each_worker_before_it_serves(make_manager: MakeManager) -> None:
    m = make_manager("hooks:app", count=2, app={"preload": True, "post_fork": "hooks:post_fork"})
    m.start()
    data = m.status()
    by_pid = {w["pid"]: w["id"] for w in data["workers"]}
    seen: Dict[int, Any] = {}

    def both() -> bool:
        with ThreadPoolExecutor(2) as pool:
            for reply in pool.map(lambda _: json.loads(fcgi_request(m.bind, "/sleep").body),
                                  range(2)):
                seen[reply["pid"]] = reply
        return len(seen) == 2
    wait_for(both, 20, "an answer from each worker")
    for pid, reply in seen.items():
        assert reply["imported_in"] == data["pid"]  # preload: imported in the master
        assert reply["calls"] == [{"worker": by_pid[pid], "pid": pid}]  # once, in itself


def test_post_fork_error_is_reported_like_an_import_error(make_manager: MakeManager) -> None:
    m = make_manager("hooks:app", count=1, app={"post_fork": "hooks:failing_hook"})
    result = m.start(check=False)
    assert result.returncode == 1, result
    assert "ConnectionError: cannot reach the database from worker 1" in result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert "app.post_fork" in result.stderr
    assert not m.pidfile.exists()


# -- OpenMetrics ---------------------------------------------------------------------------

def _families(text: str) -> Dict[str, Any]:
    from prometheus_client.openmetrics import parser  # a test dependency

    assert text.endswith("# EOF\n")
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def _sample(families: Dict[str, Any], family: str, name: str, **labels: str) -> float:
    for s in families[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {name}{labels}")


def test_openmetrics_follows_prometheus_conventions(make_manager: MakeManager,
                                                    make_nginx: MakeNginx) -> None:
    """Counters end in _total, worker states are a label, per-worker series carry the
    worker id (never the pid), and the request-duration histogram only grows -- also
    across worker recycling (max_requests)."""
    m = make_manager(count=2, workers={"max_requests": 7},
                     status={"path": "/fcgi-status"})
    m.start()
    nginx = make_nginx(m.bind)
    for _ in range(5):
        assert nginx.get("/hello").status == 200
    assert nginx.get("/sleep?s=0.3").status == 200

    page = nginx.get("/fcgi-status?openmetrics")
    assert page.header("Content-Type").startswith("application/openmetrics-text")
    fam = _families(page.text)
    assert fam["fcgi_manager_requests"].type == "counter"
    served = _sample(fam, "fcgi_manager_requests", "fcgi_manager_requests_total")
    assert served >= 6
    states = {s.labels["state"]: s.value for s in fam["fcgi_manager_workers"].samples}
    assert set(states) == {"idle", "busy", "starting", "stopping"}
    assert states["busy"] == 1 and sum(states.values()) == 2  # busy: the page itself
    for name in ("respawns", "crashes", "timeouts", "slow_requests", "recycled", "shed",
                 "max_children_reached"):
        assert fam[f"fcgi_manager_{name}"].type == "counter", name
    for name in ("listen_queue", "listen_queue_max", "start_time_seconds"):
        assert fam[f"fcgi_manager_{name}"].type == "gauge", name
    started = _sample(fam, "fcgi_manager_start_time_seconds", "fcgi_manager_start_time_seconds")
    assert abs(started - m.status()["started_at"]) < 1
    ids = {str(w["id"]) for w in m.status()["workers"]}
    for family in ("fcgi_manager_worker_requests", "fcgi_manager_worker_busy"):
        labels = [s.labels for s in fam[family].samples]
        assert {lb["id"] for lb in labels} == ids and all("pid" not in lb for lb in labels)

    hist = fam["fcgi_manager_request_duration_seconds"]
    assert hist.type == "histogram"
    buckets = [(s.labels["le"], s.value) for s in hist.samples
               if s.name.endswith("_bucket")]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1][0] == "+Inf"
    count = _sample(fam, "fcgi_manager_request_duration_seconds",
                    "fcgi_manager_request_duration_seconds_count")
    assert count == counts[-1] and count >= 6
    assert _sample(fam, "fcgi_manager_request_duration_seconds",
                   "fcgi_manager_request_duration_seconds_bucket", le="0.25") <= count - 1
    assert _sample(fam, "fcgi_manager_request_duration_seconds",
                   "fcgi_manager_request_duration_seconds_sum") >= 0.3

    # Recycle every worker (max_requests = 7): nothing the pool counted goes backwards.
    for _ in range(20):
        assert nginx.get("/hello").status == 200
    wait_for(lambda: m.status()["totals"]["recycled"] >= 2, 20, "workers to recycle")
    after = _families(nginx.get("/fcgi-status?openmetrics").text)
    assert _sample(after, "fcgi_manager_requests", "fcgi_manager_requests_total") >= served + 20
    assert _sample(after, "fcgi_manager_request_duration_seconds",
                   "fcgi_manager_request_duration_seconds_count") >= count + 20
    assert _sample(after, "fcgi_manager_recycled", "fcgi_manager_recycled_total") >= 2
