"""Safe to run as root: regression tests for the attacks on the
config, the registry, log files, escaping and the pidfile (README, Security).

Each test reproduces the attack through the real CLI (or the function that failed) and
checks that it fails now: a reload re-reads the config with the environment the master
started with; a squatted registry or a foreign entry never redirects a command; log files
planted by another user are refused; request data is escaped wherever it is shown; the
environment cannot weaken a security key the file sets; the pidfile is 0600.

Tests that need root skip when run by hand as another user and fail under CI=true.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Callable, List

import psutil
import pytest
from support import (
    Manager,
    ProcessTracker,
    fcgi_manager,
    fcgi_request,
    render_toml,
    wait_for,
)

from fcgi_manager import accesslog
from fcgi_manager import config as config_mod
from fcgi_manager import status as status_mod
from fcgi_manager.cli import watch
from fcgi_manager.errors import ConfigError

MakeManager = Callable[..., Manager]
FORGED = "2026-01-01 00:00:00 [master 1] ERROR: forged"
# Every code point that must never reach a log line or the screen raw.
CONTROLS = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]} | {"\u2028", "\u202e"}





def _nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


def _raw_controls(text: str) -> List[str]:
    """The control characters in ``text`` other than the line breaks between lines."""
    return sorted({c for line in text.splitlines() for c in line if c in CONTROLS})


# -- rows 8, 9, 10: one escape for request data, wherever it is shown ----------------------

def test_escape_shows_every_non_printing_code_point() -> None:
    from fcgi_manager.escaping import escape

    raw = "GET /a\r\nb\x1b[2J\x7f\x9b\u2028\u202e\x00\t é"
    shown = escape(raw)
    assert shown == "GET /a\\r\\nb\\x1b[2J\\x7f\\x9b\\u2028\\u202e\\x00\\t é"
    assert shown.isprintable()
    assert escape('say "hi" \\\r\n', quoted=True) == "say \\x22hi\\x22 \\x5c\\x0d\\x0a"
    plain = "/hello?x=1"
    assert escape(plain) is plain and escape(plain, quoted=True) is plain  # the fast path


def test_cr_lf_in_the_uri_of_a_failing_request_forges_no_log_line(
        make_manager: MakeManager) -> None:
    """The worker's "the app raised ... for GET URI" line escapes the URI."""
    m = make_manager("combo:app", count=1)
    m.start()
    uri = f"/crash\r\n{FORGED}\x1b[2J\x9b"
    reply = fcgi_request(f"unix:{m.socket_path}", "/crash", REQUEST_URI=uri)
    assert reply.status_code == 500, reply
    text = m.wait_log("the app raised")
    forged = [line for line in text.splitlines() if FORGED in line and "\\r\\n" not in line]
    assert not forged, text
    assert f"\\r\\n{FORGED}\\x1b[2J\\x9b" in text, text
    m.stop()


def test_status_table_and_watch_escape_method_and_uri(make_manager: MakeManager) -> None:
    """A CR LF in the method or URI of a request in flight draws no forged row in
    ``status`` or ``status --watch``, and no C1 control reaches the terminal."""
    m = make_manager("combo:app", count=1)
    m.start()
    forged_row = "   9   99999 idle"
    uri = f"/sleep\r\n{forged_row}\x9b2J"
    done = threading.Event()

    def slow() -> None:
        try:
            fcgi_request(f"unix:{m.socket_path}", "/sleep", method=f"GET\r\n{forged_row}",
                         REQUEST_URI=uri, QUERY_STRING="s=2")
        finally:
            done.set()

    t = threading.Thread(target=slow)
    t.start()
    try:
        data = wait_for(lambda: (lambda d: d if any(w["current"] for w in d["workers"])
                                 else None)(m.status()), 10, "a busy worker")
        screens = {
            "status": status_mod.render_text(data),
            "watch": "\n".join(text for text, _ in watch.screen_lines(data, None, "", 300,
                                                                         "12:00:00")),
        }
        for name, text in screens.items():
            assert not [line for line in text.splitlines() if line.startswith(forged_row)], \
                (name, text)
            assert not _raw_controls(text), (name, text)
            assert "\\r\\n" + forged_row in text, (name, text)
    finally:
        t.join(30)
    m.stop()


@pytest.mark.parametrize("json_lines", [True, False], ids=["json", "text"])
def test_access_log_escapes_del_and_c1(tmp_path: Path, json_lines: bool) -> None:
    """DEL and the C1 controls (U+009B CSI) are escaped in the access log, JSON
    lines included (JSON's own escaper lets them through)."""
    path = tmp_path / "access.log"
    log = accesslog.AccessLog(str(path), "", json_lines, 1, lambda: 0)
    params = {"REMOTE_ADDR": "127.0.0.1", "REQUEST_METHOD": "GET\x7f",
              "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_USER_AGENT": "agent\x9b2J\x85",
              "HTTP_REFERER": "ref\u2028x"}
    log.begin()
    log.counting(lambda data: None)(b"x" * 10)
    log.end(params, "/a\x9b31m\x7f\r\nb", 200)
    log.close()
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 1, text
    assert not _raw_controls(text), text
    shown = "\\x9b31m\\x7f" + ("\\r\\nb" if json_lines else "\\x0d\\x0ab")
    assert shown in text.replace("\\\\", "\\"), text
    if json_lines:
        line = json.loads(text)
        assert line["uri"] == "/a\\x9b31m\\x7f\\r\\nb"
        assert line["user_agent"] == "agent\\x9b2J\\x85"


# -- the pidfile is 0600 -----------------------------------------------------------

def _as_nobody(action: Callable[[], int]) -> int:
    """Run ``action`` in a forked child that dropped to ``nobody``; its exit status."""
    nobody = _nobody()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 99
        try:
            os.setgroups([])
            os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
            os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
            code = action()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _lock_for_reading(path: Path) -> int:
    """0 if this process could take a read lock on ``path``, 3 if it may not open it."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:
        return 3
    fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return 0


def test_pidfile_cannot_be_locked_by_another_user(shared_dir: Path,
                                                  make_manager: MakeManager) -> None:
    m = make_manager("hello:app", count=1, tmp=shared_dir)
    m.start()
    assert stat.S_IMODE(m.pidfile.stat().st_mode) == 0o600
    assert _as_nobody(lambda: _lock_for_reading(m.pidfile)) == 3
    assert m.status()["pid"] == m.read_pidfile()
    m.stop()


# -- log files planted by another user ----------------------------------------------

def _plant(path: Path, kind: str) -> int:
    """Make ``path`` what another user (``nobody``) would plant there: a file every user
    can write, or a FIFO it holds open for reading and never reads. Returns the reading
    end (or -1), for the test to close."""
    nobody = _nobody()
    if kind == "fifo":
        os.mkfifo(path, 0o666)
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    path.write_text("planted\n")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    path.chmod(0o666)
    return -1


@pytest.mark.parametrize("kind", ["file", "fifo"])
@pytest.mark.parametrize("key", ["log", "access_log"])
def test_planted_log_file_is_refused_at_start_and_check(shared_dir: Path,
                                                        make_manager: MakeManager,
                                                        key: str, kind: str) -> None:
    """In a sticky world-writable directory, a file of another user (0666) or a
    FIFO nobody reads where the log goes: start and check refuse it, naming the path and
    the reason; the master never appends to it, nor freezes on it."""
    target = shared_dir / f"planted-{key}"
    reader = _plant(target, kind)
    try:
        m = make_manager("hello:app", count=1, tmp=shared_dir,
                         manager={key: str(target)} if key == "access_log" else {})
        if key == "log":
            m.log = target
            m.update("manager", log=str(target))
        out = m.start(check=False)
        assert out.returncode == 1, out
        reason = "FIFO" if kind == "fifo" else "belongs to uid"
        assert str(target) in out.stderr and reason in out.stderr, out
        assert m.read_pidfile() is None, out
        checked = m.cli("check", timeout=60)
        assert checked.returncode == 1, checked
        assert str(target) in checked.stderr and reason in checked.stderr, checked
        if kind == "file":
            assert target.read_text() == "planted\n"
    finally:
        if reader >= 0:
            os.close(reader)


def test_reopen_refuses_a_planted_log_and_keeps_the_old_file(shared_dir: Path,
                                                             make_manager: MakeManager
                                                             ) -> None:
    """Row 6, at reopen: the refusal is logged (to the old file, which stays in use) and
    ``reopen-logs`` fails with the path and the reason."""
    m = make_manager("hello:app", count=1, tmp=shared_dir)
    m.start()
    rotated = shared_dir / "app.log.1"
    os.rename(m.log, rotated)
    _plant(m.log, "file")
    out = m.cli("reopen-logs")
    assert out.returncode == 1, out
    assert str(m.log) in out.stderr and "belongs to uid" in out.stderr, out
    wait_for(lambda: "reopen-logs" in rotated.read_text(), 10, "the refusal in the old log")
    assert m.log.read_text() == "planted\n"
    m.stop()


# -- the environment cannot weaken a security key the file sets --------------------

FILE_KEYS = {"app": {"module": "hello:app", "clear_env": True},
             "listen": {"allowed_clients": ["127.0.0.1", "10.0.0.1"]},
             "manager": {"user": "nobody", "group": "nogroup"}}


@pytest.mark.parametrize("name, value", [
    ("FCGI_MANAGER_MANAGER_USER", '""'),
    ("FCGI_MANAGER_MANAGER_USER", "root"),
    ("FCGI_MANAGER_MANAGER_GROUP", ""),
    ("FCGI_MANAGER_LISTEN_ALLOWED_CLIENTS", "[]"),
    ("FCGI_MANAGER_LISTEN_ALLOWED_CLIENTS", '["127.0.0.1", "0.0.0.0/0"]'),
    ("FCGI_MANAGER_APP_CLEAR_ENV", "false"),
])
def test_environment_weakening_a_security_key_is_a_config_error(name: str,
                                                                 value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_mod.build(FILE_KEYS, source="/srv/app.toml", base="/srv",
                         environ={name: value})
    assert name in caught.value.message and "/srv/app.toml" in caught.value.message
    assert "--allow-env-override" in caught.value.hint
    config_mod.allow_env_override(True)
    try:  # the operator says it is meant
        config_mod.build(FILE_KEYS, source="/srv/app.toml", base="/srv",
                         environ={name: value})
    finally:
        config_mod.allow_env_override(False)


@pytest.mark.parametrize("name, value", [
    ("FCGI_MANAGER_MANAGER_USER", "nobody"),  # the file's own value
    ("FCGI_MANAGER_LISTEN_ALLOWED_CLIENTS", '["10.0.0.1"]'),  # narrower
    ("FCGI_MANAGER_APP_CLEAR_ENV", "true"),
])
def test_environment_may_keep_or_strengthen_a_security_key(name: str, value: str) -> None:
    config_mod.build(FILE_KEYS, source="/srv/app.toml", base="/srv", environ={name: value})


def test_environment_may_set_security_keys_the_file_leaves_out() -> None:
    cfg = config_mod.build({"app": {"module": "hello:app"}}, source="/srv/app.toml",
                           base="/srv", environ={"FCGI_MANAGER_MANAGER_USER": "nobody",
                                                 "FCGI_MANAGER_APP_CLEAR_ENV": "false"})
    assert cfg.manager.user == "nobody"


def test_environment_weakening_is_refused_by_the_cli_unless_allowed(tmp_path: Path) -> None:
    config = tmp_path / "app.toml"
    config.write_text(render_toml(FILE_KEYS))
    env = {"FCGI_MANAGER_MANAGER_USER": '""'}
    out = fcgi_manager(["-c", str(config), "config"], env=env)
    assert out.returncode == 1 and "FCGI_MANAGER_MANAGER_USER" in out.stderr, out
    out = fcgi_manager(["-c", str(config), "config", "--allow-env-override"], env=env)
    assert out.returncode == 0 and 'user = ""' in out.stdout, out


# -- every re-read of the config sees the environment the master started with --------

RECORDING_APP = textwrap.dedent('''
    """Records the uid its import ran as: the start's, the reload's validation, the new
    generation's."""
    import os

    RECORDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "records")
    with open(os.path.join(RECORDS, f"{os.getpid()}-{os.getuid()}"), "w") as f:
        f.write(str(os.getuid()))


    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getuid()).encode()]
''')


def _import_uids(d: Path) -> List[int]:
    return [int(p.name.split("-")[1]) for p in (d / "records").iterdir()]


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_reload_validation_keeps_the_user_given_by_the_environment(
        shared_dir: Path, tracker: ProcessTracker, preload: bool) -> None:
    """Row 1: ``manager.user`` only in the environment, ``app.clear_env = true``: the
    master clears its own environment, and the reload's validation import must still run
    as that user, never as root."""
    (shared_dir / "records").mkdir(mode=0o1777)
    (shared_dir / "records").chmod(0o1777)
    (shared_dir / "recorder.py").write_text(RECORDING_APP)
    config = shared_dir / "rec.toml"
    config.write_text(render_toml({
        "app": {"module": "recorder:app", "path": [str(shared_dir)], "clear_env": True,
                "preload": preload},
        "listen": {"bind": f"unix:{shared_dir / 'rec.sock'}"},
        "workers": {"count": 1, "graceful_timeout": 5},
        "manager": {"pidfile": str(shared_dir / "rec.pid"), "control": str(shared_dir / "rec.ctl"),
                    "log": str(shared_dir / "rec.log")},
    }))
    nobody = _nobody().pw_uid
    cli = ["-c", str(config)]
    env = {"FCGI_MANAGER_MANAGER_USER": "nobody"}
    out = fcgi_manager(cli + ["start"], env=env, tracker=tracker)
    assert out.returncode == 0, out
    try:
        data = json.loads(fcgi_manager(cli + ["status", "--json"], env=env).stdout)
        tracker.add_all([data["pid"]] + [w["pid"] for w in data["workers"]])
        assert set(_import_uids(shared_dir)) == {nobody}
        before = len(_import_uids(shared_dir))
        out = fcgi_manager(cli + ["reload"], env=env, timeout=120)
        assert out.returncode == 0, out
        uids = _import_uids(shared_dir)
        assert len(uids) > before and set(uids) == {nobody}, uids
        data = json.loads(fcgi_manager(cli + ["status", "--json"], env=env).stdout)
        tracker.add_all(w["pid"] for w in data["workers"])
        assert data["generation"] == 2
        reply = fcgi_request(f"unix:{shared_dir / 'rec.sock'}", "/")
        assert reply.body == str(nobody).encode(), reply
    finally:
        out = fcgi_manager(cli + ["stop"], env=env, timeout=60)
        assert out.returncode == 0, out


# -- a squatted registry or a foreign entry never redirects a command ---------------

class Squatter:
    """Another user's control socket: counts the connections a command made to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.connections = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()


def _decoy(tracker: ProcessTracker) -> int:
    """A live process for the forged entry to name (any of the squatter's own)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    tracker.add(proc.pid)
    return proc.pid


@pytest.mark.parametrize("planted", ["squatted directory", "foreign entry"])
def test_registry_of_another_user_is_not_followed(shared_dir: Path, tracker: ProcessTracker,
                                                  make_manager: MakeManager,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  planted: str) -> None:
    """Another user pre-created the registry directory (or planted an entry file
    in ours): ``status --all`` does not list its entry, and ``status``/``stop`` by config
    file or by pidfile talk to the real master, never to the squatter's socket."""
    nobody = _nobody()
    registry = shared_dir / "registry"
    registry.mkdir()
    if planted == "squatted directory":
        os.chown(registry, nobody.pw_uid, nobody.pw_gid)
        registry.chmod(0o755)
    else:
        registry.chmod(0o700)  # ours, and safe
    monkeypatch.setenv("FCGI_MANAGER_REGISTRY", str(registry))
    squatter = Squatter(shared_dir / "squatter.ctl")
    try:
        m = make_manager("hello:app", count=1, tmp=shared_dir / "victim")
        shared_dir.joinpath("victim").chmod(0o700)
        decoy = _decoy(tracker)
        entry = registry / f"{decoy}.json"
        entry.write_text(json.dumps({
            "pid": decoy, "started": psutil.Process(decoy).create_time(),
            "uid": os.geteuid(), "name": "app", "config": str(m.config),
            "pidfile": str(m.pidfile), "control": str(squatter.path),
            "bind": m.bind, "graceful_timeout": 1.0}))
        os.chown(entry, nobody.pw_uid, nobody.pw_gid)
        out = m.start(check=False)
        assert out.returncode == 0, out
        master = m.read_pidfile()
        listed = json.loads(fcgi_manager(["status", "--all", "--json"]).stdout)
        assert decoy not in {row["pid"] for row in listed}, listed
        for how in (["-c", str(m.config)], ["--pidfile", str(m.pidfile)]):
            out = fcgi_manager([how[0], how[1], "status", "--json"]
                               if how[0] == "-c" else ["status", *how, "--json"])
            assert out.returncode == 0, out
            assert json.loads(out.stdout)["pid"] == master, out
        m.stop()
        assert squatter.connections == 0
        assert not psutil.pid_exists(master) or psutil.Process(master).status() == \
            psutil.STATUS_ZOMBIE
    finally:
        squatter.close()
