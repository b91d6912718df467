"""Running operations: reload under load, timeouts and slow-request stacks, recycling,
scaling, log reopening, the status page, ``check`` and ``request``."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import psutil
import pytest
from support import Manager, Nginx, fcgi_request, pid_alive, wait_for

MakeManager = Callable[..., Manager]
MakeNginx = Callable[..., Nginx]

RELOADABLE = '''
import os

VERSION = "{version}"


def app(environ, start_response):
    body = ("%s %d\\n" % (VERSION, os.getpid())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


def write_app(directory: Path, version: str, text: Optional[str] = None) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "reloadable.py").write_text(text if text is not None else
                                             RELOADABLE.format(version=version))


def _in_thread(fn: Callable[[], Any]) -> Future:
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return future


class Hammer:
    """``clients`` threads sending GETs through nginx (keep-alive to nginx) until stopped;
    every response and every failure is recorded."""

    def __init__(self, port: int, path: str, clients: int = 8) -> None:
        self.port = port
        self.path = path
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.bodies: List[str] = []
        self.failures: List[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True)
                        for _ in range(clients)]

    def _run(self) -> None:
        conn: Optional[http.client.HTTPConnection] = None
        while not self.stop_event.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                conn.request("GET", self.path)
                resp = conn.getresponse()
                body = resp.read().decode("utf-8", "replace")
                with self.lock:
                    if resp.status == 200:
                        self.bodies.append(body)
                    else:
                        self.failures.append(f"HTTP {resp.status}: {body[:200]}")
            except (OSError, http.client.HTTPException) as exc:
                with self.lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Hammer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(40)

    def count(self) -> int:
        with self.lock:
            return len(self.bodies)

    def seen_since(self, start: int, text: str) -> bool:
        with self.lock:
            return any(b.startswith(text) for b in self.bodies[start:])


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_reload_under_load_fails_no_request(make_manager: MakeManager, make_nginx: MakeNginx,
                                            tmp_path: Path, preload: bool) -> None:
    code = tmp_path / "code"
    write_app(code, "v1")
    m = make_manager("reloadable:app", count=2, path=[str(code)], app={"preload": preload})
    m.start()
    nginx = make_nginx(m.bind)
    assert nginx.get("/").text.startswith("v1 ")
    seen_pids = set(m.worker_pids())
    master = m.pid()
    with Hammer(nginx.port, "/app/x", clients=8) as hammer:
        wait_for(lambda: hammer.count() > 50, 20, "the load to get going")
        for generation, version in ((2, "v2"), (3, "v3"), (4, "v4")):
            write_app(code, version)
            mark = hammer.count()
            result = m.cli("reload", timeout=120)
            assert result.returncode == 0, result
            assert f"generation {generation}" in result.stdout
            wait_for(lambda v=version, n=mark: hammer.seen_since(n, v + " "), 20,
                     f"responses from {version}")
            m.record_quietly()
            seen_pids.update(m.tracker.procs)
        mark = hammer.count()
        wait_for(lambda: hammer.count() > mark + 100, 20, "more load after the last reload")
        tail_mark = hammer.count()
        wait_for(lambda: hammer.count() > tail_mark + 50, 20, "the tail of the load")
    assert hammer.failures == [], hammer.failures[:10]
    assert len(hammer.bodies) > 300
    # Once the last reload is done, only the newest code answers.
    with hammer.lock:
        tail = hammer.bodies[tail_mark:]
    assert tail and all(b.startswith("v4 ") for b in tail), set(b[:3] for b in tail)
    data = m.wait_workers(2, generation=4)
    assert data["pid"] == master, "a reload must keep the master's pid"
    assert data["generation"] == 4
    assert data["totals"]["crashes"] == 0
    assert "[error]" not in nginx.error_log(), nginx.error_log()[-3000:]


def test_reload_with_a_syntax_error_keeps_the_old_workers(make_manager: MakeManager,
                                                          tmp_path: Path) -> None:
    code = tmp_path / "code"
    write_app(code, "v1")
    m = make_manager("reloadable:app", count=2, path=[str(code)])
    m.start()
    before = m.status()
    write_app(code, "v2", text="def app(environ, start_response)\n    return []\n")
    result = m.cli("reload", timeout=120)
    assert result.returncode == 1, result
    assert "SyntaxError" in result.stderr and "reloadable.py" in result.stderr, result
    assert "old workers keep serving" in result.stderr
    after = m.status()
    assert after["generation"] == 1
    assert m.worker_pids(after) == m.worker_pids(before)
    assert fcgi_request(m.bind, "/").body.startswith(b"v1 ")
    assert "reload refused" in m.log_text()
    # Fixed code reloads normally afterwards.
    write_app(code, "v2")
    result = m.cli("reload", timeout=120)
    assert result.returncode == 0, result
    assert fcgi_request(m.bind, "/").body.startswith(b"v2 ")


def test_reload_with_a_bad_config_is_refused(make_manager: MakeManager) -> None:
    m = make_manager(count=1)
    m.start()
    before = m.status()
    text = m.config.read_text()
    m.config.write_text(text + "\n[workers]\ncount = 1\n")  # a second [workers] table
    result = m.cli("reload", timeout=120)
    assert result.returncode == 1, result
    assert str(m.config) in result.stderr and "not valid TOML" in result.stderr
    m.config.write_text(text)  # the CLI itself needs a readable config again
    assert m.status()["generation"] == 1
    assert m.worker_pids() == m.worker_pids(before)


STACK_LINE = re.compile(r'File "[^"]*slow\.py", line \d+ in sleep_for_test')


def test_timeout_logs_the_stack_and_replaces_the_worker(make_manager: MakeManager) -> None:
    m = make_manager(count=2, workers={"timeout": 2})
    m.start()
    before = m.worker_pids()
    hung = _in_thread(lambda: fcgi_request(m.bind, "/sleep?s=10", timeout=30))
    data = wait_for(lambda: (lambda d: d["totals"]["timeouts"] == 1 and d)(m.status()), 15,
                    "totals.timeouts = 1")
    reply = hung.result(timeout=20)
    assert reply.app_status is None or not reply.body.startswith(b"slept"), reply
    data = m.wait_workers(2)
    assert len(set(m.worker_pids(data)) - set(before)) == 1, "exactly one worker replaced"
    assert data["totals"]["timeouts"] == 1 and data["totals"]["crashes"] == 0
    log = m.wait_log("sleep_for_test")
    assert "past workers.timeout" in log
    assert STACK_LINE.search(log), log[-3000:]
    assert fcgi_request(m.bind, "/hello").status == "200 OK"


def test_slow_request_logs_a_stack_once(make_manager: MakeManager) -> None:
    m = make_manager(count=1, workers={"slow_request": 0.5})
    m.start()
    pid = m.worker_pids()[0]
    reply = fcgi_request(m.bind, "/sleep?s=1.5", timeout=30)
    assert reply.status == "200 OK" and reply.body.startswith(b"slept"), reply
    log = m.wait_log("sleep_for_test")
    assert "is slow" in log and "/sleep?\u2026" in log  # the query string is hidden
    assert STACK_LINE.search(log), log[-3000:]
    data = m.status()
    assert data["totals"]["slow"] == 1
    assert m.worker_pids(data) == [pid], "a slow request must not cost the worker"
    assert fcgi_request(m.bind, "/hello").status == "200 OK"
    assert m.status()["totals"]["slow"] == 1


def test_max_requests_recycles_workers(make_manager: MakeManager) -> None:
    m = make_manager(count=2, workers={"max_requests": 20})
    m.start()
    first = set(m.worker_pids())
    for i in range(50):
        reply = fcgi_request(m.bind, f"/hello?{i}")
        assert reply.status == "200 OK", (i, reply)
    data = wait_for(lambda: (lambda d: d["totals"]["recycled"] >= 2 and d)(m.status()), 15,
                    "two recycled workers")
    data = m.wait_workers(2)
    now = set(m.worker_pids(data))
    assert now != first and len(now) == 2
    assert data["totals"]["crashes"] == 0 and data["totals"]["respawns"] == 0
    assert data["totals"]["accepted"] >= 50
    assert all(w["requests"] < 20 for w in data["workers"])
    assert "recycled (max_requests)" in m.log_text()


def test_max_memory_recycles_a_worker_between_requests(make_manager: MakeManager) -> None:
    # 1 MiB is below any Python worker's RSS: the first request must be its last.
    m = make_manager(count=1, workers={"max_memory": "1MiB"})
    m.start()
    first = m.worker_pids()
    reply = fcgi_request(m.bind, "/hello")
    assert reply.status == "200 OK", reply  # the request itself is served in full
    data = wait_for(lambda: (lambda d: d["totals"]["recycled"] >= 1 and d)(m.status()), 15,
                    "a worker recycled for max_memory")
    data = m.wait_workers(1)
    assert m.worker_pids(data) != first
    assert data["totals"]["crashes"] == 0
    assert "recycled (max_memory)" in m.log_text()
    assert "workers.max_memory" in m.log_text()


def test_scale_commands_and_signals(make_manager: MakeManager) -> None:
    m = make_manager(count=2)
    m.start()
    master = m.pid()
    steps: List[Tuple[Tuple[str, ...], int]] = [
        (("scale", "+1"), 3), (("scale", "-1"), 2), (("scale", "3"), 3)]
    for args, expected in steps:
        result = m.cli(*args)
        assert result.returncode == 0, result
        m.wait_workers(expected)
    os.kill(master, signal.SIGTTIN)
    m.wait_workers(4)
    os.kill(master, signal.SIGTTOU)
    data = m.wait_workers(3)
    assert data["totals"]["crashes"] == 0
    for bad in ("0", "lots", "-5"):
        result = m.cli("scale", bad)
        assert result.returncode == 1, result
        assert "Error:" in result.stderr and "scale" in result.stderr
    assert len(m.status()["workers"]) == 3


def test_reopen_logs_after_the_log_is_moved(make_manager: MakeManager) -> None:
    m = make_manager(count=1)
    m.start()
    rotated = m.log.with_name(m.log.name + ".1")
    os.rename(m.log, rotated)
    assert fcgi_request(m.bind, "/crash/before-reopen").status.startswith("500")
    wait_for(lambda: "/crash/before-reopen" in rotated.read_text(), 10,
             "the old file to get lines until reopened")
    result = m.cli("reopen-logs")
    assert result.returncode == 0, result
    assert m.log.exists()
    assert fcgi_request(m.bind, "/crash/after-reopen").status.startswith("500")
    text = m.wait_log("/crash/after-reopen")
    assert "CrashedOnPurpose" in text  # the worker's traceback goes to the new file too
    assert "/crash/after-reopen" not in rotated.read_text()
    # SIGUSR1 does the same.
    os.rename(m.log, rotated)
    os.kill(m.pid(), signal.SIGUSR1)
    wait_for(m.log.exists, 10, "SIGUSR1 to reopen the log")
    assert fcgi_request(m.bind, "/crash/after-usr1").status.startswith("500")
    m.wait_log("/crash/after-usr1")


def _keys(data: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "top": set(data), "listen": set(data["listen"]), "totals": set(data["totals"]),
        "worker": set().union(*(set(w) for w in data["workers"])),
    }


def test_status_page_text_json_openmetrics_and_ping(make_manager: MakeManager,
                                                    make_nginx: MakeNginx) -> None:
    from prometheus_client.openmetrics import parser  # a test dependency
    m = make_manager(count=2, status={"path": "/fcgi-status", "ping_path": "/fcgi-ping"})
    m.start()
    nginx = make_nginx(m.bind)
    for _ in range(5):
        assert nginx.get("/hello").status == 200

    ping = nginx.get("/fcgi-ping")
    assert ping.status == 200 and ping.text == "pong\n"

    text = nginx.get("/fcgi-status")
    assert text.status == 200 and text.header("Content-Type").startswith("text/plain")
    assert f"master pid {m.pid()}" in text.text and "reloadable" not in text.text
    for pid in m.worker_pids():
        assert str(pid) in text.text

    page = nginx.get("/fcgi-status?json")
    assert page.status == 200 and page.header("Content-Type") == "application/json"
    cli = m.status()
    as_page = page.json()
    assert _keys(as_page) == _keys(cli)
    assert as_page["pid"] == cli["pid"] and as_page["generation"] == cli["generation"]
    assert as_page["totals"]["accepted"] >= 5 + 1 + 1  # the page is a request too
    assert sorted(w["pid"] for w in as_page["workers"]) == m.worker_pids(cli)

    om = nginx.get("/fcgi-status?openmetrics")
    assert om.status == 200
    assert om.header("Content-Type").startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n")
    families = {f.name: f for f in parser.text_string_to_metric_families(om.text)}
    assert families and all(name.startswith("fcgi_manager_") for name in families)
    requests = families["fcgi_manager_requests"]
    assert requests.type == "counter"
    assert requests.samples[0].value >= 8
    workers = families["fcgi_manager_workers"]
    assert workers.type == "gauge" and sum(s.value for s in workers.samples) == 2
    per_worker = {s.labels["id"] for s in families["fcgi_manager_worker_requests"].samples}
    assert per_worker == {str(w["id"]) for w in m.status()["workers"]}


def test_check_good_app(make_manager: MakeManager) -> None:
    m = make_manager("hello:app", count=1)
    result = m.cli("check", timeout=60)
    assert result.returncode == 0, result
    assert "GET / -> 200 OK" in result.stdout and "healthy" in result.stdout
    assert not m.pidfile.exists()


def test_check_broken_app_shows_the_traceback(make_manager: MakeManager) -> None:
    m = make_manager("broken_import:app", count=1)
    result = m.cli("check", timeout=60)
    assert result.returncode == 1, result
    assert "Traceback (most recent call last)" in result.stderr
    assert "broken_import.py" in result.stderr and "_read_settings" in result.stderr
    assert "Error: cannot import the app module 'broken_import'" in result.stderr
    assert "hint:" in result.stderr


def test_check_app_that_fails_its_request(make_manager: MakeManager) -> None:
    m = make_manager("crash:app", count=1)
    result = m.cli("check", timeout=60)
    assert result.returncode == 1, result
    assert "500" in result.stdout
    assert "CrashedOnPurpose" in result.stdout + result.stderr


def test_request_command(make_manager: MakeManager, tmp_path: Path) -> None:
    m = make_manager(count=1)
    data_file = tmp_path / "body.bin"
    payload = b"posted \x00 bytes\n" * 1000
    data_file.write_bytes(payload)
    assert m.request("/hello").returncode == 1, "no server yet: no response"
    m.start()
    hello = m.request("/hello/x?y=1", "-X", "POST", "--data", f"@{data_file}", "-H", "X-A: b")
    assert hello.returncode == 0, hello
    seen = json.loads(hello.stdout)
    assert seen["environ"]["REQUEST_METHOD"] == "POST"
    assert seen["environ"]["HTTP_X_A"] == "b"
    assert seen["environ"]["CONTENT_LENGTH"] == str(len(payload))
    assert seen["path_info"] == "/hello/x" and seen["environ"]["QUERY_STRING"] == "y=1"
    echo = m.request("/echo", "--data", f"@{data_file}")  # --data implies POST
    assert echo.returncode == 0, echo
    assert echo.stdout.encode() == payload
    head = m.request("/echo", "-i", "-X", "POST", "--data", f"@{data_file}")
    assert head.stdout.startswith("Status: 200 OK\n")
    assert f"X-Body-Length: {len(payload)}" in head.stdout
    bad = m.request("/hello", "-H", "no colon")
    assert bad.returncode == 2 and "Name: value" in bad.stderr


def test_restart_replaces_the_master(make_manager: MakeManager) -> None:
    m = make_manager(count=1)
    m.start()
    old = m.status()
    result = m.cli("restart", timeout=120)
    assert result.returncode == 0, result
    assert "stopped" in result.stdout and "started" in result.stdout
    new = m.status()
    assert new["pid"] != old["pid"] and new["generation"] == 1
    assert fcgi_request(m.bind, "/hello").status == "200 OK"


def test_reload_and_stop_work_from_signals_when_the_control_socket_is_gone(
        make_manager: MakeManager, tmp_path: Path) -> None:
    code = tmp_path / "code"
    write_app(code, "v1")
    m = make_manager("reloadable:app", count=1, path=[str(code)])
    m.start()
    data = m.status()
    pids = [data["pid"], *m.worker_pids(data)]
    m.control.unlink()
    write_app(code, "v2")
    reload = m.cli("reload", timeout=60)
    assert reload.returncode == 0, reload
    assert "SIGHUP" in reload.stdout
    wait_for(lambda: fcgi_request(m.bind, "/").body.startswith(b"v2 "), 20,
             "the new code after SIGHUP")
    # No control socket, so no status: find the new worker as the master's child.
    new_workers = [c.pid for c in psutil.Process(data["pid"]).children()]
    m.tracker.add_all(new_workers)
    pids += new_workers
    stop = m.stop()
    assert "stopped" in stop.stdout
    wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "every process to exit")
    assert not m.pidfile.exists()


@pytest.mark.parametrize("gap", [0.0, 0.2], ids=["together", "during-re-exec"])
def test_a_stop_signal_during_a_reload_stops_gracefully(make_manager: MakeManager,
                                                        tmp_path: Path, gap: float) -> None:
    """``kill -HUP; kill -TERM`` (a reload, then a stop, as systemd or a deploy script may
    send them): the TERM that arrives while the master re-executes itself is neither
    lost nor fatal, so the master stops gracefully, and removes its pidfile and socket."""
    code = tmp_path / "code"
    write_app(code, "v1")
    m = make_manager("reloadable:app", count=1, path=[str(code)])
    m.start()
    data = m.status()
    master = data["pid"]
    os.kill(master, signal.SIGHUP)
    if gap:
        wait_for(lambda: "re-executing" in m.log.read_text(), 20, "the reload's re-exec")
    os.kill(master, signal.SIGTERM)
    wait_for(lambda: not pid_alive(master), 30, "the master to stop")
    assert "master stopped" in m.log.read_text(), m.log.read_text()[-2000:]
    assert not m.pidfile.exists()
    assert m.socket_path is not None and not m.socket_path.exists()
