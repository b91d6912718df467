"""Safe to run as root: one regression test per attack of the security review.

Each test reproduces the attack or the careless setup through the real CLI and checks
that it fails now: app code never runs with uid 0 when ``manager.user`` is set, the
client filter fails closed, a stale pidfile is never signalled, nothing of the manager
leaks into processes the app starts, workers die with a killed master, files are never
created through links or in directories others can write, log lines cannot be forged,
and query strings stay out of status and logs.

Tests that need root skip when run by hand as another user and fail under CI=true.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Callable, List

import psutil
import pytest
from support import (
    FCGI_STDOUT,
    Manager,
    ProcessTracker,
    _child_env,
    cgi_params,
    fcgi_manager,
    fcgi_request,
    fcgi_request_bytes,
    free_port,
    need_root,
    pid_alive,
    read_fcgi_records,
    render_toml,
    wait_for,
)

MakeManager = Callable[..., Manager]





def _spawn(tracker: ProcessTracker, argv: List[str]) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    tracker.add(proc.pid)
    return proc


# -- no app code with uid 0 -------------------------------------------------------

ESCALATING_APP = textwrap.dedent('''
    """At import: try to become root again, from the main thread and from a thread, and
    record what the process's ids were."""
    import json
    import os
    import threading

    RECORDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "records")


    def _attempt(where):
        try:
            os.setresuid(0, 0, 0)
            error = None
        except OSError as exc:
            error = exc.errno
        try:
            os.seteuid(0)
            seteuid_error = None
        except OSError as exc:
            seteuid_error = exc.errno
        record = {"where": where, "pid": os.getpid(), "resuid": list(os.getresuid()),
                  "resgid": list(os.getresgid()), "setresuid_errno": error,
                  "seteuid_errno": seteuid_error}
        name = f"{os.getpid()}-{where}-{threading.get_ident()}.json"
        with open(os.path.join(RECORDS, name), "w") as f:
            json.dump(record, f)


    _attempt("import")
    _thread = threading.Thread(target=_attempt, args=("thread",))
    _thread.start()
    _thread.join()


    def app(environ, start_response):
        body = json.dumps(list(os.getresuid())).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]
''')


def _records(d: Path) -> List[dict]:
    out = []
    for p in sorted((d / "records").glob("*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except ValueError:
            pass  # being written
    return out


def _assert_never_root(d: Path, at_least: int) -> None:
    records = _records(d)
    assert len(records) >= at_least, records
    nobody = pwd.getpwnam("nobody").pw_uid
    for r in records:
        assert r["resuid"] == [nobody, nobody, nobody], r
        assert 0 not in r["resgid"], r
        assert r["setresuid_errno"] == 1 and r["seteuid_errno"] == 1, r  # EPERM


def _escalating_config(d: Path, preload: bool) -> Path:
    (d / "records").mkdir(mode=0o1777, exist_ok=True)
    (d / "records").chmod(0o1777)
    (d / "escalate.py").write_text(ESCALATING_APP)
    config = d / "esc.toml"
    config.write_text(render_toml({
        "app": {"module": "escalate:app", "path": [str(d)], "preload": preload},
        "listen": {"bind": f"unix:{d / 'esc.sock'}"},
        "workers": {"count": 2, "graceful_timeout": 5},
        "manager": {"user": "nobody", "pidfile": str(d / "esc.pid"),
                    "control": str(d / "esc.ctl"), "log": str(d / "esc.log")},
    }))
    return config


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_import_never_runs_as_root_in_start_and_reload(shared_dir: Path, preload: bool,
                                                       tracker: ProcessTracker) -> None:
    config = _escalating_config(shared_dir, preload)
    cli = ["-c", str(config)]
    out = fcgi_manager(cli + ["start"], tracker=tracker)
    assert out.returncode == 0, out
    try:
        data = json.loads(fcgi_manager(cli + ["status", "--json"]).stdout)
        tracker.add_all([data["pid"]] + [w["pid"] for w in data["workers"]])
        _assert_never_root(shared_dir, 2)
        # The master itself stays root (it owns the files); the app's workers do not.
        assert psutil.Process(data["pid"]).uids().real == 0
        reply = fcgi_request(f"unix:{shared_dir / 'esc.sock'}", "/")
        nobody = pwd.getpwnam("nobody").pw_uid
        assert json.loads(reply.body) == [nobody] * 3
        before = len(_records(shared_dir))
        out = fcgi_manager(cli + ["reload"], timeout=120)
        assert out.returncode == 0, out
        # The validation import, and the new generation's import, ran too -- as nobody.
        _assert_never_root(shared_dir, before + 2)
        data = json.loads(fcgi_manager(cli + ["status", "--json"]).stdout)
        tracker.add_all(w["pid"] for w in data["workers"])
        assert data["generation"] == 2
    finally:
        out = fcgi_manager(cli + ["stop"], timeout=60)
        assert out.returncode == 0, out


def test_check_imports_the_app_without_root(shared_dir: Path) -> None:
    config = _escalating_config(shared_dir, True)
    out = fcgi_manager(["-c", str(config), "check"], timeout=60)
    assert out.returncode == 0, out
    assert "as nobody" in out.stdout
    _assert_never_root(shared_dir, 2)


def test_root_without_user_is_said_by_start_check_and_status(make_manager: MakeManager
                                                              ) -> None:
    need_root()
    m = make_manager("hello:app", count=1)
    out = m.start()
    assert "workers run as root" in out.stdout, out
    status = m.cli("status")
    assert status.returncode == 0 and "workers run as root" in status.stdout, status
    assert m.status()["workers_user"] == "root"
    check = m.cli("check")
    assert check.returncode == 0 and "workers run as root" in check.stdout, check
    m.stop()


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_manager_user_root_is_no_drop(make_manager: MakeManager, preload: bool) -> None:
    """``manager.user = "root"`` (an explicit choice) starts and serves: there is nothing
    to drop to, so it is the same as no manager.user."""
    need_root()
    m = make_manager("hello:app", count=1, app={"preload": preload},
                     manager={"user": "root", "group": "root"})
    m.start()
    assert fcgi_request(f"unix:{m.socket_path}", "/").status_code == 200
    assert m.status()["workers_user"] == "root"
    m.stop()


# -- the client filter fails closed -------------------------------------------------

def _refused(port: int) -> bool:
    """True if a request from 127.0.0.1 gets no answer (the worker closed it unread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        try:
            conn.sendall(fcgi_request_bytes(cgi_params("/")))
            return conn.recv(65536) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True


def test_clear_env_keeps_fcgi_web_server_addrs(make_manager: MakeManager) -> None:
    m = make_manager("hello:app", count=1, bind="tcp", app={"clear_env": True})
    out = m.cli("start", env={"FCGI_WEB_SERVER_ADDRS": "127.0.0.2"})
    assert out.returncode == 0, out
    m.record()
    assert _refused(m.port)
    m.wait_log("not in listen.allowed_clients")
    # Allowed addresses still get through.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.bind(("127.0.0.2", 0))
        conn.connect(("127.0.0.1", m.port))
        conn.sendall(fcgi_request_bytes(cgi_params("/")))
        stdout = b"".join(c for t, _, c in read_fcgi_records(conn, 1) if t == FCGI_STDOUT)
        assert stdout.startswith(b"Status: 200"), stdout
    # And after a reload (the master re-executes itself with its own environment).
    out = m.cli("reload", timeout=120)
    assert out.returncode == 0, out
    m.record()
    assert _refused(m.port)
    m.stop()


def test_bad_client_entries_are_config_errors(make_manager: MakeManager) -> None:
    m = make_manager("hello:app", count=1, bind="tcp", listen={"allowed_clients": ["10.0.0.x"]})
    out = m.cli("start")
    assert out.returncode == 1, out
    assert "listen.allowed_clients" in out.stderr and "10.0.0.x" in out.stderr, out
    assert "keep dying" not in out.stderr
    m.update("listen", allowed_clients=[])
    out = m.cli("start", env={"FCGI_WEB_SERVER_ADDRS": "127.0.0.1,nonsense"})
    assert out.returncode == 1, out
    assert "FCGI_WEB_SERVER_ADDRS" in out.stderr and "nonsense" in out.stderr, out
    assert not m.pidfile.exists()


# -- the pidfile proves who it names -----------------------------------------------

DECOYS = {
    "sleep": ["sleep", "1000"],
    "python": [sys.executable, "-c", "import time; time.sleep(1000)  # fcgi-manager"],
}


@pytest.mark.parametrize("decoy", sorted(DECOYS))
def test_stale_pidfile_naming_another_process(make_manager: MakeManager,
                                              tracker: ProcessTracker, decoy: str) -> None:
    m = make_manager("hello:app", count=1)
    victim = _spawn(tracker, DECOYS[decoy])
    wait_for(lambda: pid_alive(victim.pid), 10, "the decoy")
    m.pidfile.write_text(f"{victim.pid}\n")

    status = m.cli("status")
    assert status.returncode == 1, status  # LSB: dead, but the pidfile exists
    out = m.cli("reload")
    assert out.returncode == 1, out
    assert pid_alive(victim.pid), "reload signalled the decoy"
    out = m.cli("stop")
    assert out.returncode == 0 and "not running" in out.stdout, out
    assert pid_alive(victim.pid), "stop signalled the decoy"
    assert not m.pidfile.exists(), "stop left the stale pidfile"

    m.pidfile.write_text(f"{victim.pid}\n")
    out = m.start()
    assert "already running" not in out.stdout, out
    assert m.pid() != victim.pid and m.read_pidfile() == m.pid()
    assert m.cli("status").returncode == 0
    m.stop()
    assert pid_alive(victim.pid)


def test_pidfile_written_by_another_user_is_not_believed(make_manager: MakeManager,
                                                        tracker: ProcessTracker) -> None:
    """The app's user, if it can write the pidfile's directory, could name any process
    with its exact start time: a pidfile root or we did not write proves nothing."""
    need_root()
    m = make_manager("hello:app", count=1)
    victim = _spawn(tracker, DECOYS["sleep"])
    wait_for(lambda: pid_alive(victim.pid), 10, "the decoy")
    with open(f"/proc/{victim.pid}/stat", "rb") as f:
        start = f.read().rsplit(b")", 1)[1].split()[19].decode()
    m.pidfile.write_text(f"{victim.pid} {start}\n")
    nobody = pwd.getpwnam("nobody")
    os.chown(m.pidfile, nobody.pw_uid, nobody.pw_gid)
    assert m.cli("status").returncode == 1
    out = m.cli("stop")
    assert out.returncode == 0 and "not running" in out.stdout, out
    assert pid_alive(victim.pid), "stop signalled the pid a forged pidfile named"


def test_stop_checks_who_answers_on_the_control_socket(make_manager: MakeManager,
                                                       tracker: ProcessTracker) -> None:
    """A control socket served by an impostor that names another pid: stop must not wait
    for that pid and then SIGKILL it."""
    m = make_manager("hello:app", count=1, workers={"graceful_timeout": 1})
    victim = _spawn(tracker, DECOYS["sleep"])
    fake = textwrap.dedent(f'''
        import json, os, socket, struct
        s = socket.socket(socket.AF_UNIX)
        s.bind({str(m.control)!r})
        s.listen(4)
        while True:
            c, _ = s.accept()
            n = struct.unpack("!I", c.recv(4))[0]
            c.recv(n)
            body = json.dumps({{"id": 1, "ok": True,
                               "result": {{"stopping": True, "pid": {victim.pid}}}}}).encode()
            c.sendall(struct.pack("!I", len(body)) + body)
            c.close()
    ''')
    impostor = _spawn(tracker, [sys.executable, "-c", fake])
    wait_for(lambda: m.control.exists(), 10, "the impostor's socket")
    m.pidfile.write_text(f"{victim.pid}\n")
    out = m.cli("stop", timeout=60)
    assert out.returncode == 1 and "not killed" in out.stderr, out
    assert pid_alive(victim.pid), "stop killed the pid an impostor named"
    assert pid_alive(impostor.pid), "stop killed a process the pidfile does not name"


# -- nothing of the manager leaks into the app's children ---------------------------

FD_APP = textwrap.dedent('''
    import json
    import os
    import subprocess
    import sys

    LISTER = """if True:
        import json, os
        seen = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                seen[fd] = os.readlink("/proc/self/fd/" + fd)
            except OSError:
                pass  # the descriptor listdir itself used
        print(json.dumps(seen))
    """


    def app(environ, start_response):
        if environ["PATH_INFO"] == "/background":
            # A helper the app leaves behind, started the careless way.
            proc = subprocess.Popen(["sleep", "1000"], close_fds=False,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            body = str(proc.pid).encode()
        else:
            body = subprocess.run([sys.executable, "-c", LISTER], close_fds=False,
                                  stdout=subprocess.PIPE, check=True).stdout
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [body]
''')


def _fd_app(tmp: Path) -> Path:
    apps = tmp / "fdapps"
    apps.mkdir(exist_ok=True)
    (apps / "fdapp.py").write_text(FD_APP)
    return apps


def test_app_children_inherit_no_manager_descriptors(make_manager: MakeManager,
                                                     tmp_path: Path) -> None:
    m = make_manager("fdapp:app", count=1, path=[str(_fd_app(tmp_path))])
    # `start` run from a shell that has a descriptor open (a pipe to nowhere).
    r, w = os.pipe()
    os.set_inheritable(w, True)
    try:
        proc = subprocess.run([sys.executable, "-m", "fcgi_manager", "-c", str(m.config),
                               "start"], env=_child_env(), pass_fds=(w,), timeout=90,
                              capture_output=True)
        assert proc.returncode == 0, proc
        shell_pipe = os.readlink(f"/proc/self/fd/{w}")
    finally:
        os.close(r)
        os.close(w)
    data = m.record()
    master_fds = {os.readlink(f"/proc/{data['pid']}/fd/{fd}")
                  for fd in os.listdir(f"/proc/{data['pid']}/fd")}
    assert shell_pipe not in master_fds, "the daemon kept the shell's descriptor"
    for when in ("start", "reload"):  # the reload's exec carries descriptors across
        if when == "reload":
            assert m.cli("reload", timeout=120).returncode == 0
            m.wait_workers(1, generation=2)
        reply = fcgi_request(f"unix:{m.socket_path}", "/fds")
        assert reply.status_code == 200, reply
        fds = json.loads(reply.body)
        extra = {fd: target for fd, target in fds.items()
                 if int(fd) > 2 and not target.startswith("/proc/")}
        assert not extra, f"after {when}, the app's child inherited {extra}"
    m.stop()


def test_background_child_does_not_keep_the_port(make_manager: MakeManager,
                                                 tmp_path: Path,
                                                 tracker: ProcessTracker) -> None:
    m = make_manager("fdapp:app", count=1, bind="tcp", path=[str(_fd_app(tmp_path))])
    m.start()
    reply = fcgi_request(f"127.0.0.1:{m.port}", "/background")
    assert reply.status_code == 200, reply
    helper = int(reply.body)
    tracker.add(helper)
    m.stop()
    assert pid_alive(helper)  # it lives on, as the app left it
    out = m.start(check=False)
    assert out.returncode == 0, f"the app's helper kept the port busy: {out}"
    m.record()
    assert fcgi_request(f"127.0.0.1:{m.port}", "/fds").status_code == 200
    m.stop()


# -- workers die with a SIGKILLed root master, even after a reload ------------------

SPAWNING_APP = textwrap.dedent('''
    import os
    import subprocess

    # At import: a background helper started the careless way (it inherits what it can).
    subprocess.Popen(["sleep", "1000"], close_fds=False, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
''')


def _sleep_children_of_session() -> List[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if (p.info["cmdline"] or [])[:2] == ["sleep", "1000"]]


def test_sigkilled_root_master_takes_dropped_workers_along(shared_dir: Path,
                                                           tracker: ProcessTracker) -> None:
    (shared_dir / "spawner.py").write_text(SPAWNING_APP)
    port = free_port()
    config = shared_dir / "spawn.toml"
    config.write_text(render_toml({
        "app": {"module": "spawner:app", "path": [str(shared_dir)], "preload": False},
        "listen": {"bind": f"127.0.0.1:{port}"},
        "workers": {"count": 2, "graceful_timeout": 5},
        "manager": {"user": "nobody", "pidfile": str(shared_dir / "spawn.pid"),
                    "log": str(shared_dir / "spawn.log")},
    }))
    cli = ["-c", str(config)]
    before = set(_sleep_children_of_session())
    try:
        assert fcgi_manager(cli + ["start"], tracker=tracker).returncode == 0
        assert fcgi_manager(cli + ["reload"], timeout=120).returncode == 0
        data = json.loads(fcgi_manager(cli + ["status", "--json"]).stdout)
        workers = [w["pid"] for w in data["workers"]]
        tracker.add_all([data["pid"], *workers])
        os.kill(data["pid"], signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(p) for p in workers), 15,
                 "the workers to exit after the master was killed")
        # A new master can start on the same address at once.
        out = fcgi_manager(cli + ["start"], tracker=tracker)
        assert out.returncode == 0, out
        assert fcgi_manager(cli + ["stop"]).returncode == 0
    finally:
        tracker.add_all(set(_sleep_children_of_session()) - before)


# -- no links followed, no directories others can write ----------------------------

@pytest.mark.parametrize("key", ["pidfile", "log", "socket"])
def test_world_writable_directory_is_refused(make_manager: MakeManager, tmp_path: Path,
                                             key: str) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    m = make_manager("hello:app", count=1)
    if key == "pidfile":
        m.update("manager", pidfile=str(open_dir / "app.pid"))
    elif key == "log":
        m.update("manager", log=str(open_dir / "app.log"))
    else:
        m.update("listen", bind=f"unix:{open_dir / 'app.sock'}")
    out = m.cli("start")
    assert out.returncode == 1, out
    assert str(open_dir) in out.stderr and "writable by every user" in out.stderr, out
    assert list(open_dir.iterdir()) == []
    open_dir.chmod(0o1777)  # with the sticky bit (like /tmp) it is fine
    m.start()
    m.stop()


def test_log_symlink_is_not_followed(make_manager: MakeManager, tmp_path: Path) -> None:
    """A link at the log's path that root did not make (the app's user may write the
    log's directory) is refused: root never appends through it."""
    need_root()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    m = make_manager("hello:app", count=1)
    m.log.symlink_to(victim)
    nobody = pwd.getpwnam("nobody")
    os.lchown(m.log, nobody.pw_uid, nobody.pw_gid)
    out = m.cli("start")
    assert out.returncode == 1 and "symbolic link" in out.stderr, out
    assert victim.read_text() == "precious\n"


def test_pidfile_temporary_name_symlink_is_not_followed(make_manager: MakeManager,
                                                        tmp_path: Path,
                                                        tracker: ProcessTracker) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    m = make_manager("slow:app", count=1)
    proc = subprocess.Popen([sys.executable, "-m", "fcgi_manager", "-c", str(m.config),
                             "start", "--foreground"], env=_child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tracker.add(proc.pid)
    # The name the pidfile used to be written through, planted before the master is ready.
    (tmp_path / f".{m.pidfile.name}.{proc.pid}.tmp").symlink_to(victim)
    try:
        wait_for(lambda: m.read_pidfile() == proc.pid, 30, "the pidfile")
        assert victim.read_text() == "precious\n"
        assert oct(victim.stat().st_mode & 0o777) == oct(0o600)
        assert not m.pidfile.is_symlink()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_control_path_holding_a_file_is_not_removed(make_manager: MakeManager) -> None:
    m = make_manager("hello:app", count=1)
    m.control.write_text("not a socket\n")
    out = m.cli("start")
    assert out.returncode == 1 and str(m.control) in out.stderr, out
    assert m.control.read_text() == "not a socket\n"


def test_log_is_created_with_the_umask(make_manager: MakeManager) -> None:
    m = make_manager("hello:app", count=1, manager={"umask": "077"})
    m.start()
    assert m.log.stat().st_mode & 0o777 == 0o600
    m.stop()


# -- log lines cannot be forged -----------------------------------------------------

FORGED = "2026-01-01 00:00:00 [master 1] ERROR: forged"


def test_cr_lf_in_uri_does_not_forge_log_lines(make_manager: MakeManager) -> None:
    m = make_manager("combo:app", count=1, workers={"slow_request": 0.2, "timeout": 30})
    m.start()
    uri = f"/sleep\r\n{FORGED}\x1b[2J?s=1"
    reply = fcgi_request(f"unix:{m.socket_path}", "/sleep?s=1", REQUEST_URI=uri)
    assert reply.status_code == 200, reply
    text = m.wait_log("is slow")
    assert not any(line.startswith(FORGED) for line in text.splitlines()), text
    assert "\\r\\n" + FORGED + "\\x1b[2J" in text
    m.stop()


# -- query strings hidden, the control socket not stolen ---------------------------

def test_query_strings_hidden_in_status_and_slow_logs(make_manager: MakeManager) -> None:
    m = make_manager("combo:app", count=1, workers={"slow_request": 0.3},
                     status={"path": "/fcgi-status"})
    m.start()
    secret = "token=SECRET123"
    done = threading.Event()

    def slow() -> None:
        try:
            fcgi_request(f"unix:{m.socket_path}", f"/sleep?s=2&{secret}")
        finally:
            done.set()

    t = threading.Thread(target=slow)
    t.start()
    try:
        busy = wait_for(lambda: [w for w in m.status()["workers"] if w["current"]], 10,
                        "a busy worker")
        assert busy[0]["current"]["uri"] == "/sleep?\u2026"
        assert "SECRET123" not in m.cli("status").stdout
        page = fcgi_request(f"unix:{m.socket_path}", "/fcgi-status?json")
        assert page.status_code == 200 and b"SECRET123" not in page.body, page
        m.wait_log("is slow")
    finally:
        t.join(30)
    assert "SECRET123" not in m.log_text()
    m.stop()
    # Opting in shows them.
    m.update("status", show_query=True)
    m.start()
    t = threading.Thread(target=slow)
    t.start()
    try:
        busy = wait_for(lambda: [w for w in m.status()["workers"] if w["current"]], 10,
                        "a busy worker")
        assert secret in busy[0]["current"]["uri"]
    finally:
        t.join(30)
    m.stop()


def test_second_instance_does_not_steal_the_control_socket(make_manager: MakeManager,
                                                           tmp_path: Path) -> None:
    first = make_manager("hello:app", count=1, name="first")
    first.start()
    first_pid = first.pid()
    second = make_manager("hello:app", count=1, name="second",
                          manager={"control": str(first.control)})
    out = second.cli("start")
    assert out.returncode == 1 and "in use" in out.stderr, out
    assert first.pid() == first_pid  # the control socket still reaches the first master
    first.stop()
