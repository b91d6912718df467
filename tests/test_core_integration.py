"""The core life cycle through the real CLI and real front ends: start, serve through
Debian's nginx and libfcgi's ``cgi-fcgi``, status, crashes, stop, and the failure modes
around starting (import errors, stale and live sockets, a killed master)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List

import psutil
import pytest
from support import (
    FCGI_BEGIN,
    FCGI_PARAMS,
    FcgiReply,
    Manager,
    Nginx,
    cgi_params,
    connect_fcgi,
    fcgi_pairs,
    fcgi_record,
    fcgi_request,
    fcgi_request_bytes,
    has_ipv6_loopback,
    pid_alive,
    read_fcgi_records,
    require_program,
    skip_or_fail,
    wait_for,
)

MakeManager = Callable[..., Manager]
MakeNginx = Callable[..., Nginx]


def assert_gone(m: Manager, pids: List[int]) -> None:
    """The master and every worker ever seen have exited; no file is left behind."""
    wait_for(lambda: not any(pid_alive(p) for p in pids), 10, f"pids {pids} to exit")
    assert not m.pidfile.exists(), "the pidfile was left behind"
    assert not m.control.exists(), "the control socket was left behind"
    if m.socket_path is not None:
        assert not m.socket_path.exists(), "the listening socket file was left behind"


def processes_for(config: Path) -> List[int]:
    """PIDs whose command line names ``config`` (to prove nothing is left running)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = proc.info.get("cmdline") or []
        if str(config) in cmd and proc.info.get("status") != psutil.STATUS_ZOMBIE:
            found.append(proc.info["pid"])
    return found


def wait_busy(m: Manager, uri_part: str, timeout: float = 10.0) -> Dict[str, Any]:
    def busy() -> Any:
        for w in m.status()["workers"]:
            cur = w["current"]
            if w["state"] == "busy" and cur and uri_part in cur["uri"]:
                return w
        return None
    return wait_for(busy, timeout, f"a worker busy with {uri_part}")


SPEC_TOP = {"pid", "version", "started_at", "uptime_s", "config", "app", "generation",
            "listen", "totals", "workers"}
SPEC_LISTEN = {"bind", "backlog", "queue", "max_queue"}
SPEC_TOTALS = {"accepted", "active", "max_active", "respawns", "crashes", "timeouts", "slow",
               "recycled", "shed", "max_children_reached"}
SPEC_WORKER = {"id", "pid", "state", "generation", "requests", "started_at", "rss_bytes",
               "cpu_percent", "current"}


def check_status_shape(data: Dict[str, Any], m: Manager, workers: int) -> None:
    assert SPEC_TOP <= set(data), SPEC_TOP - set(data)
    assert SPEC_LISTEN <= set(data["listen"])
    assert SPEC_TOTALS <= set(data["totals"])
    assert isinstance(data["pid"], int) and pid_alive(data["pid"])
    assert data["pid"] == m.read_pidfile()
    from fcgi_manager import __version__

    assert data["version"] == __version__
    from fcgi_manager import compiled

    # The master's environment is the test's: the same core, by the same rule.
    assert data["core"] == compiled.core()
    assert data["config"] == str(m.config)
    assert data["app"] == m.sections["app"]["module"]
    assert data["generation"] == 1
    assert abs(data["started_at"] - time.time()) < 120
    assert 0 <= data["uptime_s"] < 120
    assert data["listen"]["bind"] == m.bind
    assert data["listen"]["backlog"] == 1024
    assert all(isinstance(data["totals"][k], int) for k in SPEC_TOTALS)
    assert len(data["workers"]) == workers
    for w in data["workers"]:
        assert SPEC_WORKER <= set(w), SPEC_WORKER - set(w)
        assert w["state"] in ("starting", "idle", "busy", "stopping")
        assert w["generation"] == 1
        assert pid_alive(w["pid"]) and w["pid"] != data["pid"]
        assert psutil.Process(w["pid"]).ppid() == data["pid"]
        assert w["rss_bytes"] is None or w["rss_bytes"] > 1_000_000
        assert isinstance(w["cpu_percent"], (int, float))
    assert sorted(w["id"] for w in data["workers"]) == list(range(1, workers + 1))


def run_cgi_fcgi(sock: Path, env: Dict[str, str], body: bytes = b"") -> bytes:
    """``cgi-fcgi -bind -connect SOCK``: its environment is the request's CGI params."""
    binary = require_program("cgi-fcgi")
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_NAME": "cgi.example", "SERVER_PORT": "8081",
            "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
            "QUERY_STRING": "", "REQUEST_METHOD": "GET"}
    base.update(env)
    proc = subprocess.run([binary, "-bind", "-connect", str(sock)], env=base, input=body,
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def compiled_words() -> str:
    from fcgi_manager import compiled

    return compiled.describe()


def cgi_body(out: bytes) -> bytes:
    head, sep, body = out.partition(b"\r\n\r\n")
    assert sep, out
    assert head.startswith(b"Status: 200 OK"), out
    return body


@pytest.mark.needs("cgi-fcgi", "nginx")
def test_life_cycle_through_nginx_and_cgi_fcgi(make_manager: MakeManager,
                                               make_nginx: MakeNginx) -> None:
    m = make_manager(count=2)
    started = m.start()
    assert "started" in started.stdout
    data = m.status()
    check_status_shape(data, m, workers=2)
    human = m.cli("status").stdout
    assert f"({compiled_words()})" in human.splitlines()[0], human
    master = data["pid"]
    seen = {master, *m.worker_pids(data)}

    nginx = make_nginx(m.bind)
    cases = [
        ("/app/x/y?q=1", "/app", "/x/y", "q=1"),
        ("/app/", "/app", "/", ""),
        ("/app", "/app", "", ""),
        ("/", "", "/", ""),
        ("/users/42?full=1", "", "/users/42", "full=1"),
    ]
    for url, script, path, query in cases:
        resp = nginx.get(url)
        assert resp.status == 200, (url, resp, nginx.error_log())
        body = resp.json()
        assert (body["script_name"], body["path_info"]) == (script, path), url
        assert body["environ"]["QUERY_STRING"] == query
        assert body["environ"]["REQUEST_URI"] == url
        assert body["pid"] in seen

    # cgi-fcgi: the environment variables are the CGI params, as sent.
    out = run_cgi_fcgi(m.socket_path, {"SCRIPT_NAME": "/cgi", "PATH_INFO": "/a/b",
                                       "QUERY_STRING": "k=v", "REQUEST_URI": "/cgi/a/b?k=v",
                                       "HTTP_X_CUSTOM": "custom value"})
    body = json.loads(cgi_body(out))
    assert (body["script_name"], body["path_info"]) == ("/cgi", "/a/b")
    assert body["environ"]["HTTP_X_CUSTOM"] == "custom value"
    assert body["environ"]["SERVER_NAME"] == "cgi.example"
    assert body["environ"]["SERVER_PORT"] == "8081"
    payload = os.urandom(100_000)
    out = run_cgi_fcgi(m.socket_path, {"REQUEST_METHOD": "POST", "PATH_INFO": "/echo",
                                       "SCRIPT_NAME": "", "CONTENT_LENGTH": str(len(payload)),
                                       "CONTENT_TYPE": "application/octet-stream"}, payload)
    assert cgi_body(out) == payload

    data = m.status()
    assert data["totals"]["accepted"] >= len(cases) + 2
    assert sum(w["requests"] for w in data["workers"]) == data["totals"]["accepted"]
    assert data["totals"]["crashes"] == data["totals"]["respawns"] == 0

    # A worker killed with SIGKILL is noticed and replaced.
    victim = data["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> Any:
        d = m.status()
        pids = m.worker_pids(d)
        if victim in pids or len(pids) != 2 or any(w["state"] != "idle" for w in d["workers"]):
            return None
        return d
    data = wait_for(replaced, 15, "the killed worker to be replaced")
    seen.update(m.worker_pids(data))
    assert data["pid"] == master
    assert data["totals"]["crashes"] == 1 and data["totals"]["respawns"] == 1
    assert "unexpectedly" in m.log_text() and str(victim) in m.log_text()
    assert nginx.get("/app/after-crash").json()["path_info"] == "/after-crash"

    stopped = m.stop()
    assert "stopped" in stopped.stdout
    assert_gone(m, sorted(seen))
    assert m.status_code() == 3


@pytest.mark.parametrize("keep_conn", [False, True], ids=["new-conn", "keep-conn"])
def test_one_mib_post_round_trips_through_nginx(make_manager: MakeManager,
                                                make_nginx: MakeNginx, keep_conn: bool) -> None:
    m = make_manager(count=2)
    m.start()
    nginx = make_nginx(m.bind, keep_conn=keep_conn)
    payload = os.urandom(1024 * 1024)
    for url in ("/app/echo", "/echo"):
        resp = nginx.post(url, payload)
        assert resp.status == 200, (resp, nginx.error_log())
        assert resp.header("X-Body-Length") == str(len(payload))
        assert resp.header("X-Body-SHA256") == hashlib.sha256(payload).hexdigest()
        assert resp.body == payload
    assert "[error]" not in nginx.error_log(), nginx.error_log()


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_import_error_fails_start_with_the_traceback(make_manager: MakeManager,
                                                     preload: bool) -> None:
    m = make_manager("broken_import:app", count=2, app={"preload": preload})
    result = m.start(check=False)
    assert result.returncode == 1, result
    assert "Traceback (most recent call last)" in result.stderr, result
    assert "broken_import.py" in result.stderr and "_read_settings" in result.stderr
    assert "RuntimeError: broken_import: the settings could not be read" in result.stderr
    assert "Error:" in result.stderr
    assert result.stdout.strip() == "" or "started" not in result.stdout
    wait_for(lambda: not processes_for(m.config), 10, "no process left for the config")
    assert not m.pidfile.exists() and not m.control.exists()
    assert not m.socket_path.exists()
    assert m.status_code() == 3


def test_malformed_connections_do_not_disturb_a_concurrent_request(
        make_manager: MakeManager) -> None:
    m = make_manager(count=1)  # one worker: everything below goes through it
    m.start()
    worker_pid = m.worker_pids()[0]
    address = m.bind
    rid = 7
    with connect_fcgi(address, 10) as normal:
        # A normal request, sent up to (not including) its body...
        params = cgi_params("/echo", "POST", b"hello body")
        begin = fcgi_record(FCGI_BEGIN, rid, struct.pack("!HB5x", 1, 0))
        normal.sendall(begin + fcgi_record(FCGI_PARAMS, rid, fcgi_pairs(params))
                       + fcgi_record(FCGI_PARAMS, rid))
        # ...while other connections send garbage, a wrong version, a short BEGIN_REQUEST.
        bad_inputs = [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            struct.pack("!BBHHBx", 2, FCGI_BEGIN, 1, 8, 0) + b"\0" * 8,
            fcgi_record(FCGI_BEGIN, 1, b"\0\1\0"),
        ]
        for data in bad_inputs:
            with connect_fcgi(address, 10) as bad:
                bad.sendall(data)
                bad.settimeout(10)
                try:
                    got = bad.recv(65536)
                except ConnectionResetError:  # pragma: no cover - reported below
                    pytest.fail(f"the worker reset the connection after {data[:20]!r}")
                if got:
                    # Anything sent back must be a FastCGI record (never a crash dump)...
                    assert got[0] == 1
        # ...then the normal request finishes, untouched.
        normal.sendall(fcgi_record(5, rid, b"hello body") + fcgi_record(5, rid))
        reply = FcgiReply(read_fcgi_records(normal, rid, 10))
        assert reply.status == "200 OK" and reply.body == b"hello body", reply
    assert fcgi_request(address, "/hello").status == "200 OK"
    data = m.status()
    assert m.worker_pids(data) == [worker_pid], "the worker was replaced"
    assert data["totals"]["crashes"] == 0
    m.wait_log("closed a connection")


def test_start_when_running_says_so(make_manager: MakeManager) -> None:
    m = make_manager(count=1)
    m.start()
    pid = m.pid()
    again = m.cli("start")
    assert again.returncode == 0, again
    assert "already running" in again.stdout and str(pid) in again.stdout
    assert m.pid() == pid


def test_stale_pidfile_and_socket_do_not_prevent_start(make_manager: MakeManager,
                                                       tmp_path: Path) -> None:
    m = make_manager(count=1)
    dead = subprocess.Popen(["true"])
    dead.wait()
    m.pidfile.write_text(f"{dead.pid}\n")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(m.socket_path))  # a socket file nobody listens on
    stale.close()
    assert m.socket_path.exists()
    assert m.status_code() == 1  # LSB: dead, but the pidfile exists
    m.start()
    assert m.read_pidfile() == m.pid() != dead.pid
    assert fcgi_request(m.bind, "/hello").status == "200 OK"


def test_live_socket_of_another_server_is_refused(make_manager: MakeManager) -> None:
    m = make_manager(count=1)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(m.socket_path))
    other.listen(1)
    try:
        result = m.start(check=False)
        assert result.returncode == 1, result
        assert f"Error: {m.socket_path} is in use" in result.stderr, result
        assert "Traceback" not in result.stderr
        assert m.socket_path.exists(), "the other server's socket was removed"
        assert not m.pidfile.exists()
        wait_for(lambda: not processes_for(m.config), 10, "no process left for the config")
    finally:
        other.close()


def test_tcp_port_in_use_is_refused(make_manager: MakeManager) -> None:
    m = make_manager(count=1, bind="tcp")
    with socket.socket() as other:
        other.bind(("127.0.0.1", m.port))
        other.listen(1)
        result = m.start(check=False)
    assert result.returncode == 1, result
    assert f"cannot bind 127.0.0.1:{m.port}" in result.stderr
    assert "Traceback" not in result.stderr
    wait_for(lambda: not processes_for(m.config), 10, "no process left for the config")


def test_status_codes_and_master_killed_with_sigkill(make_manager: MakeManager) -> None:
    m = make_manager(count=2)
    assert m.status_code() == 3  # not running
    m.start()
    assert m.status_code() == 0
    data = m.status()
    master, workers = data["pid"], m.worker_pids(data)
    in_flight = _in_thread(lambda: fcgi_request(m.bind, "/sleep?s=1", timeout=30))
    wait_busy(m, "/sleep")
    os.kill(master, signal.SIGKILL)
    wait_for(lambda: not pid_alive(master), 5, "the master to die")
    # Workers never outlive the master: the idle one exits at once, the busy one after
    # finishing its request.
    reply = in_flight.result(timeout=30)
    assert reply.status == "200 OK" and reply.body.startswith(b"slept"), reply
    wait_for(lambda: not any(pid_alive(p) for p in workers), 5, "the workers to exit")
    assert m.status_code() == 1  # dead, but the pidfile exists
    text = m.cli("status")
    assert "dead" in text.stdout + text.stderr
    # The pidfile and socket file it left behind do not stop a new master.
    m.start()
    data = m.status()
    assert data["pid"] != master
    assert fcgi_request(m.bind, "/hello").status == "200 OK"


def _in_thread(fn: Callable[[], Any]) -> Future:
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return future


def test_sigterm_lets_the_running_request_finish(make_manager: MakeManager) -> None:
    m = make_manager(count=2)
    m.start()
    data = m.status()
    pids = [data["pid"], *m.worker_pids(data)]
    slow = _in_thread(lambda: fcgi_request(m.bind, "/sleep?s=3", timeout=30))
    busy = wait_busy(m, "/sleep")
    assert busy["current"]["method"] == "GET" and busy["current"]["elapsed_s"] >= 0
    asked = time.monotonic()
    os.kill(data["pid"], signal.SIGTERM)
    # New connections are refused at once (the socket is closed and removed)...
    wait_for(lambda: not m.socket_path.exists(), 5, "the listening socket to be removed")
    with pytest.raises(OSError):
        fcgi_request(m.bind, "/hello", timeout=5)
    # ...while the request in flight completes normally.
    reply = slow.result(timeout=30)
    assert reply.status == "200 OK" and reply.body.startswith(b"slept 3"), reply
    assert reply.app_status == 0
    assert_gone(m, pids)
    assert time.monotonic() - asked < 10


def test_stop_now_returns_within_five_seconds(make_manager: MakeManager) -> None:
    m = make_manager(count=2)
    m.start()
    data = m.status()
    pids = [data["pid"], *m.worker_pids(data)]
    slow = _in_thread(lambda: fcgi_request(m.bind, "/sleep?s=30", timeout=40))
    wait_busy(m, "/sleep")
    result = m.stop(now=True)
    assert result.seconds < 5.0, result
    assert_gone(m, pids)
    try:
        reply = slow.result(timeout=10)
    except OSError:
        return  # the connection was closed: fine
    assert not reply.body.startswith(b"slept"), "the 30 s request was not cut short"


@pytest.mark.parametrize("family", ["tcp", "tcp6"])
def test_tcp_bind(make_manager: MakeManager, make_nginx: MakeNginx, family: str) -> None:
    if family == "tcp6" and not has_ipv6_loopback():
        # Not a missing program: a kernel without IPv6 cannot be fixed by CI's installs.
        skip_or_fail("this machine has no IPv6 loopback (::1); CI machines have one")
    m = make_manager(count=1, bind=family)
    m.start()
    assert m.status()["listen"]["bind"] == m.bind
    reply = fcgi_request(m.bind, "/hello")
    assert reply.status == "200 OK"
    cli = m.request("/some/where?x=1")
    assert cli.returncode == 0, cli
    assert json.loads(cli.stdout)["path_info"] == "/some/where"
    nginx = make_nginx(m.bind)
    assert nginx.get("/app/tcp").json()["path_info"] == "/tcp"
    data = m.status()
    m.stop()
    assert_gone(m, [data["pid"], *m.worker_pids(data)])
    with pytest.raises(OSError):
        fcgi_request(m.bind, "/hello", timeout=5)


def test_request_bytes_helper_matches_the_product_encoder() -> None:
    # The tests' own encoder is what the product's parser must accept: cross-check once.
    from fcgi_manager.wire import protocol

    params = cgi_params("/x", "POST", b"abc")
    ours = fcgi_request_bytes(params, b"abc", rid=3)
    events = protocol.ServerConnection().feed(ours)
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "BeginRequest" and "Params" in kinds and kinds[-1] == "StdinEnd"
    got = next(e for e in events if type(e).__name__ == "Params").params
    assert got == params


def test_a_unix_socket_path_too_long_is_refused_with_the_reason(
        make_manager: MakeManager, tmp_path: Path) -> None:
    """sun_path holds 107 bytes: a longer listen.bind says so (it printed "None")."""
    long_path = tmp_path / ("s" * 120 + ".sock")
    m = make_manager(count=1, bind=f"unix:{long_path}")
    result = m.start(check=False)
    assert result.returncode == 1, result
    assert "too long for a unix socket" in result.stderr, result
    assert "listen.bind" in result.stderr and "None" not in result.stderr, result
    assert "Traceback" not in result.stderr
