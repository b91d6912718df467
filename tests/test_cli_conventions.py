"""What gunicorn, php-fpm and Supervisor users expect of the command line, through the real
CLI: ``config``, flags > environment > file > defaults, gunicorn's flags on ``run``,
``--pidfile``, commands that work with a broken config, ``status --all``, 1024-based
sizes, deterministic suggestions, ``check``, ``request``, progress on a terminal, ``--help``
and ``scale`` across a reload."""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
from support import (
    APPS,
    GiveUp,
    Manager,
    ProcessTracker,
    _child_env,
    fcgi_manager,
    fcgi_request,
    free_port,
    pid_alive,
    wait_for,
)

from fcgi_manager import config as config_mod

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MakeManager = Callable[..., Manager]

ENV_APP = '''
import os


def app(environ, start_response):
    body = ("greeting=%s\\n" % os.environ.get("GREETING", "")).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


def write_config(tmp: Path, text: str, name: str = "app.toml") -> Path:
    path = tmp / name
    path.write_text(text.replace("{apps}", str(APPS)))
    return path


def config_of(tmp: Path, *args: str, env: Optional[Dict[str, str]] = None) -> Dict:
    """``fcgi-manager ... config`` parsed back from its TOML."""
    result = fcgi_manager([*args], cwd=tmp, env=env)
    assert result.returncode == 0, result
    return tomllib.loads(result.stdout)


# -- config, precedence, environment ------------------------------------------------------

def test_config_prints_every_key_after_defaults_file_environment_and_flags(
        tmp_path: Path) -> None:
    cfg = write_config(tmp_path, """
[app]
module = "hello:app"
path = ["{apps}"]
[workers]
count = 2
timeout = 20
graceful_timeout = 9
""")
    env = {"FCGI_MANAGER_WORKERS_TIMEOUT": "15", "FCGI_MANAGER_WORKERS_MAX_REQUESTS": "100",
           "FCGI_MANAGER_WORKERS_GRACEFUL_TIMEOUT": "8", "WEB_CONCURRENCY": "9",
           "FCGI_MANAGER_APP_ENV": '{ A = "from-env" }'}
    result = fcgi_manager(["-c", str(cfg), "config", "-t", "12", "-e", "B=from-flag"],
                          cwd=tmp_path, env=env)
    assert result.returncode == 0, result
    data = tomllib.loads(result.stdout)
    for section, cls in config_mod.SECTIONS.items():
        printed = set(data[section])
        fields = {f for f in cls.__dataclass_fields__ if f != "script_name"}
        assert printed == fields, (section, fields ^ printed)
    assert "# script_name is unset" in result.stdout
    w = data["workers"]
    assert w["count"] == 2  # the file beats WEB_CONCURRENCY
    assert w["timeout"] == 12.0  # the flag beats the environment and the file
    assert w["graceful_timeout"] == 8.0 and w["max_requests"] == 100  # environment > file
    assert data["app"]["env"] == {"A": "from-env", "B": "from-flag"}
    assert data["listen"]["bind"] == "127.0.0.1:9000" and data["workers"]["mode"] == "static"
    assert "# --timeout" in result.stdout and "# FCGI_MANAGER_WORKERS_MAX_REQUESTS" in \
        result.stdout
    # The output is itself a config that loads to the same values.
    again = write_config(tmp_path, result.stdout, "again.toml")
    assert config_of(tmp_path, "-c", str(again), "config")["workers"] == w


def test_web_concurrency_sets_the_worker_count_only_when_nothing_else_does(
        tmp_path: Path) -> None:
    cfg = write_config(tmp_path, '[app]\nmodule = "hello:app"\n')
    conc = {"WEB_CONCURRENCY": "3"}
    assert config_of(tmp_path, "-c", str(cfg), "config", env=conc)["workers"]["count"] == 3
    both = {**conc, "FCGI_MANAGER_WORKERS_COUNT": "4"}
    assert config_of(tmp_path, "-c", str(cfg), "config", env=both)["workers"]["count"] == 4
    flag = config_of(tmp_path, "-c", str(cfg), "config", "-w", "5", env=both)
    assert flag["workers"]["count"] == 5


def test_environment_values_are_toml_or_plain_strings(tmp_path: Path) -> None:
    env = {"FCGI_MANAGER_APP_MODULE": "hello:app", "FCGI_MANAGER_APP_PRELOAD": "false",
           "FCGI_MANAGER_LISTEN_MODE": "660", "FCGI_MANAGER_LISTEN_BIND": "unix:rel.sock",
           "FCGI_MANAGER_LISTEN_ALLOWED_CLIENTS": '["127.0.0.1", "::1"]',
           "FCGI_MANAGER_WORKERS_MAX_MEMORY": "256M"}
    data = config_of(tmp_path, "config", env=env)
    assert data["app"]["module"] == "hello:app" and data["app"]["preload"] is False
    assert data["listen"]["mode"] == "660"
    assert data["listen"]["bind"] == f"unix:{tmp_path / 'rel.sock'}"  # relative to the cwd
    assert data["listen"]["allowed_clients"] == ["127.0.0.1", "::1"]
    assert data["workers"]["max_memory"] == "256M"


def test_environment_errors_name_the_variable(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, '[app]\nmodule = "hello:app"\n')
    bad = fcgi_manager(["-c", str(cfg), "config"], cwd=tmp_path,
                       env={"FCGI_MANAGER_WORKERS_COUNT": "many"})
    assert bad.returncode == 1
    assert "FCGI_MANAGER_WORKERS_COUNT ([workers] count): expected a whole number" in bad.stderr
    typo = fcgi_manager(["-c", str(cfg), "config"], cwd=tmp_path,
                        env={"FCGI_MANAGER_WORKERS_MAX_REQUEST": "5"})
    assert typo.returncode == 1
    assert "did you mean FCGI_MANAGER_WORKERS_MAX_REQUESTS?" in typo.stderr, typo
    flag = fcgi_manager(["-c", str(cfg), "config", "-w", "two"], cwd=tmp_path)
    assert flag.returncode == 1 and "--workers ([workers] count)" in flag.stderr, flag


def test_sizes_are_powers_of_1024(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, '[app]\nmodule = "hello:app"\n[workers]\n'
                                 'max_memory = "0.5M"\nmax_body = "2G"\n'
                                 'max_body_in_memory = "1000000"\n')
    w = config_of(tmp_path, "-c", str(cfg), "config")["workers"]
    assert w["max_memory"] == "512K"  # 0.5 x 1024 x 1024, not 500,000
    assert w["max_body"] == "2G" and w["max_body_in_memory"] == 1000000
    assert config_mod.load(str(cfg)).workers.max_body == 2 * 1024**3


@pytest.mark.parametrize("section, line, hint", [
    ("workers", "max_request = 5", "did you mean 'max_requests'?"),
    ("workers", "max_spares = 5", "did you mean 'max_spare'?"),
    ("app", "count = 2", "count belongs in [workers]"),
    ("listen", 'user = "www-data"', "user belongs in [manager]"),
    ("manager", "max_request = 5", "did you mean 'max_requests'? it belongs in [workers]"),
])
def test_suggestions_are_deterministic_and_name_the_right_section(
        tmp_path: Path, section: str, line: str, hint: str) -> None:
    cfg = write_config(tmp_path, f'[app]\nmodule = "hello:app"\n[{section}]\n{line}\n'
                       .replace("[app]\nmodule = \"hello:app\"\n[app]\n",
                                "[app]\nmodule = \"hello:app\"\n"))
    for seed in ("0", "1", "2", "3"):  # set order used to change with the hash seed
        result = fcgi_manager(["-c", str(cfg), "config"], cwd=tmp_path,
                              env={"PYTHONHASHSEED": seed})
        assert result.returncode == 1
        assert f"hint: {hint}" in result.stderr, result


def test_top_level_key_says_which_section(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, 'module = "hello:app"\n')
    result = fcgi_manager(["-c", str(cfg), "config"], cwd=tmp_path)
    assert result.returncode == 1
    assert "module is outside any section" in result.stderr
    assert "hint: module belongs in [app]" in result.stderr


# -- run with gunicorn's flags, --pidfile, status --all ----------------------------------

def _background(args: List[str], cwd: Path, tracker: ProcessTracker,
                env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "fcgi_manager", *args], cwd=str(cwd),
                            env=_child_env(env), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tracker.add(proc.pid)
    return proc


def _status_json(*args: str, cwd: Path) -> Dict:
    result = fcgi_manager(["status", "--json", *args], cwd=cwd, timeout=20)
    assert result.returncode == 0, result
    return json.loads(result.stdout)


def test_run_takes_gunicorns_flags_and_c_and_is_managed_by_pidfile(tmp_path: Path) -> None:
    (tmp_path / "envapp.py").write_text(ENV_APP)
    sock = tmp_path / "run.sock"
    cfg = write_config(tmp_path, f'[app]\nmodule = "envapp:app"\npath = ["{tmp_path}"]\n'
                                 f'[listen]\nbind = "unix:{sock}"\n[workers]\ncount = 1\n')
    pidfile = tmp_path / "run.pid"
    tracker = ProcessTracker()
    proc = _background(["run", "-c", str(cfg), "-w", "2", "-t", "7", "--max-requests", "50",
                        "--graceful-timeout", "5", "--pidfile", str(pidfile), "-e",
                        "GREETING=hello from -e", "--no-preload", "--log-level", "debug"],
                       tmp_path, tracker)
    try:
        def ready() -> Optional[Dict]:
            if proc.poll() is not None:
                raise GiveUp(f"run exited {proc.returncode}: {proc.communicate()[1].decode()}")
            if not pidfile.exists():
                return None
            data = _status_json("--pidfile", str(pidfile), cwd=tmp_path)
            ws = data["workers"]
            return data if len(ws) == 2 and all(w["state"] == "idle" for w in ws) else None

        data = wait_for(ready, 30, "the run master with 2 idle workers")
        tracker.add_all(w["pid"] for w in data["workers"])
        assert data["pid"] == proc.pid
        assert data["listen"]["bind"] == f"unix:{sock}"  # -c was loaded: its bind
        reply = fcgi_manager(["request", "/", "--pidfile", str(pidfile)], cwd=tmp_path)
        assert reply.returncode == 0 and reply.stdout == "greeting=hello from -e\n", reply
        scaled = fcgi_manager(["scale", "+1", "--pidfile", str(pidfile)], cwd=tmp_path)
        assert scaled.returncode == 0 and "scaled from 2 to 3" in scaled.stdout, scaled
        reopened = fcgi_manager(["reopen-logs", "--pidfile", str(pidfile)], cwd=tmp_path)
        assert reopened.returncode == 0, reopened
        listed = fcgi_manager(["status", "--all"], cwd=tmp_path)
        assert listed.returncode == 0, listed
        line = next(x for x in listed.stdout.splitlines() if str(proc.pid) in x)
        assert f"unix:{sock}" in line and str(cfg) in line
        stop = fcgi_manager(["stop", "--pidfile", str(pidfile)], cwd=tmp_path, timeout=60)
        assert stop.returncode == 0 and "stopped" in stop.stdout, stop
        assert proc.wait(10) == 0
        assert not pidfile.exists()
    finally:
        tracker.kill_all()


WSGI_SCRIPT = '''
import sys
sys.path.insert(0, {apps!r})
from fcgi_manager import WSGIServer
from hello import app

if __name__ == "__main__":
    WSGIServer(app, bindAddress={sock!r}, count=1).run()
'''


def test_status_all_lists_every_master_and_wsgiserver_can_be_stopped(
        make_manager: MakeManager, tmp_path: Path) -> None:
    first = make_manager("hello:app", count=1, name="first", tmp=tmp_path / "a")
    second = make_manager("hello:app", count=2, name="second", tmp=tmp_path / "b",
                          bind="tcp")
    first.start()
    second.start()
    script = tmp_path / "app.fcgi"
    sock = tmp_path / "wsgi.sock"
    script.write_text(WSGI_SCRIPT.format(apps=str(APPS), sock=str(sock)))
    tracker = ProcessTracker()
    proc = subprocess.Popen([sys.executable, str(script)], cwd=str(tmp_path), env=_child_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    tracker.add(proc.pid)
    try:
        def listed() -> List[Dict]:
            result = fcgi_manager(["status", "--all", "--json"], cwd=tmp_path)
            rows = json.loads(result.stdout)
            by_pid = {r["pid"]: r for r in rows}
            if proc.pid in by_pid and by_pid[proc.pid]["workers"] == 1:
                return rows
            return []

        rows = {r["pid"]: r for r in wait_for(listed, 30, "the WSGIServer in status --all")}
        a, b = first.status(), second.status()
        assert rows[a["pid"]]["config"] == str(first.config)
        assert rows[a["pid"]]["bind"] == first.bind and rows[a["pid"]]["workers"] == 1
        assert rows[b["pid"]]["workers"] == 2 and rows[b["pid"]]["generation"] == 1
        assert rows[b["pid"]]["busy"] == 0 and rows[b["pid"]]["name"] == "second"
        wsgi = rows[proc.pid]
        assert wsgi["config"] is None and wsgi["bind"] == f"unix:{sock}"
        table = fcgi_manager(["status", "--all"], cwd=tmp_path).stdout
        assert table.splitlines()[0].split() == ["NAME", "PID", "BIND", "WORKERS", "BUSY",
                                                 "GEN", "CONFIG"]
        assert f"--pidfile {wsgi['pidfile']}" in table
        stop = fcgi_manager(["stop", "--pidfile", wsgi["pidfile"]], cwd=tmp_path, timeout=60)
        assert stop.returncode == 0, stop
        assert proc.wait(15) == 0
        after = json.loads(fcgi_manager(["status", "--all", "--json"], cwd=tmp_path).stdout)
        assert proc.pid not in {r["pid"] for r in after}
    finally:
        tracker.kill_all()


def test_status_all_drops_a_killed_master(make_manager: MakeManager,
                                          private_registry: Path) -> None:
    m = make_manager("hello:app", count=1)
    m.start()
    data = m.status()
    entry = private_registry / f"{data['pid']}.json"
    assert entry.exists()
    os.kill(data["pid"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(data["pid"]), 10, "the master to die")
    rows = json.loads(fcgi_manager(["status", "--all", "--json"]).stdout)
    assert data["pid"] not in {r["pid"] for r in rows}
    assert not entry.exists(), "a stale entry is cleaned by whoever reads the registry"


# -- a broken config on disk ------------------------------------------------------------

@pytest.mark.parametrize("registry", ["entry", "no entry"])
def test_status_and_stop_work_and_reload_refuses_when_the_config_is_broken(
        make_manager: MakeManager, tmp_path: Path, registry: str) -> None:
    m = make_manager("hello:app", count=1)
    m.start()
    pid = m.pid()
    m.write_config(m.config.read_text() + "\n[workers]\nmax_request = 5\n"
                   if "[workers]" not in m.config.read_text() else
                   m.config.read_text().replace("[workers]\n", "[workers]\nmax_request = 5\n"))
    env = {"FCGI_MANAGER_REGISTRY": str(tmp_path / "empty")} if registry == "no entry" else {}
    status = m.cli("status", env=env)
    assert status.returncode == 0, status
    assert f"master pid {pid}" in status.stdout
    assert "warning: the config on disk is invalid" in status.stderr
    assert "max_request" in status.stderr and "did you mean 'max_requests'?" in status.stderr
    reload = m.cli("reload", env=env)
    assert reload.returncode == 1, reload
    assert "reload refused, the config on disk is invalid" in reload.stderr
    assert "[workers] max_request: unknown key" in reload.stderr
    assert m.pid() == pid if registry == "entry" else True
    stop = m.cli("stop", env=env, timeout=60)
    assert stop.returncode == 0, stop
    assert "stopped" in stop.stdout and "the config on disk is invalid" in stop.stderr
    wait_for(lambda: not pid_alive(pid), 10, "the master to exit")
    again = m.cli("status", env=env)
    assert again.returncode == 4 and "no running master found" in again.stderr


# -- check -------------------------------------------------------------------------------

def test_check_prints_the_body_and_no_false_warning(make_manager: MakeManager) -> None:
    m = make_manager("hello:app", count=1)
    result = m.cli("check", "--path", "/some/where?x=1", timeout=60)
    assert result.returncode == 0, result
    assert "GET /some/where?x=1 -> 200 OK" in result.stdout
    assert '"path_info": "/some/where"' in result.stdout  # the body, not only headers
    assert "healthy" in result.stdout
    assert "WARNING" not in result.stderr and "master process is gone" not in result.stderr, \
        result


def test_check_refuses_a_socket_directory_that_does_not_exist(make_manager: MakeManager,
                                                               tmp_path: Path) -> None:
    """Only the last directory is created by start (tests/test_runtime_dirs.py): one
    whose parent is missing too is refused, by check as by start."""
    missing = tmp_path / "run" / "app"
    m = make_manager("hello:app", count=1, bind=f"unix:{missing / 'fcgi.sock'}")
    result = m.cli("check", timeout=60)
    assert result.returncode == 1, result
    assert f"directory {missing} does not exist" in result.stderr
    assert f"its parent {missing.parent} does not exist either" in result.stderr
    assert f"mkdir -m 0755 {missing}" in result.stderr
    assert "healthy" not in result.stdout


def test_check_refuses_an_address_held_by_another_process(make_manager: MakeManager,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "held.sock"
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.bind(str(path))
    holder.listen(1)
    port = free_port()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", port))
    tcp.listen(1)
    try:
        unix = make_manager("hello:app", count=1, bind=f"unix:{path}", name="u").cli("check")
        assert unix.returncode == 1 and "held by another live process" in unix.stderr, unix
        inet = make_manager("hello:app", count=1, bind=f"127.0.0.1:{port}", name="t")
        result = inet.cli("check")
        assert result.returncode == 1 and "in use by another process" in result.stderr, result
    finally:
        holder.close()
        tcp.close()


def test_check_accepts_the_address_of_its_own_running_master(make_manager: MakeManager
                                                             ) -> None:
    m = make_manager("hello:app", count=1)
    m.start()
    result = m.cli("check", timeout=60)
    assert result.returncode == 0, result
    assert f"served by this config's running master (pid {m.pid()})" in result.stdout


# -- request -----------------------------------------------------------------------------

def test_request_takes_curls_habits(make_manager: MakeManager) -> None:
    m = make_manager(count=1)
    m.start()
    literal = m.request("/echo", "-d", "a=1", "-i")
    assert literal.returncode == 0, literal
    assert literal.stdout.endswith("\n\na=1")
    assert "X-Body-Length: 3" in literal.stdout
    joined = m.request("/hello", "-d", "a=1", "-d", "b=2")
    seen = json.loads(joined.stdout)["environ"]
    assert seen["REQUEST_METHOD"] == "POST" and seen["CONTENT_LENGTH"] == "7"
    assert seen["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    stdin = m.cli("request", "/echo", "-d", "@-", "-X", "PUT", input=b"from stdin")
    assert stdin.returncode == 0 and stdin.stdout == "from stdin", stdin
    failed = m.request("/crash", "--fail")
    assert failed.returncode == 22, failed
    assert m.request("/crash").returncode == 0  # a response, as curl without --fail


# -- --help ------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["run", "start", "stop", "restart", "reload", "status",
                                     "scale", "reopen-logs", "config", "check", "request"])
def test_help_of_every_command_has_description_options_and_exit_statuses(
        command: str) -> None:
    result = fcgi_manager([command, "--help"])
    assert result.returncode == 0, result
    text = result.stdout
    usage, _, rest = text.partition("\n\n")
    description = rest.split("\n\n")[0]
    assert len(description.split()) >= 6, text  # a sentence, not just the usage line
    assert "-c CONFIG, --config CONFIG" in text
    assert "exit status:" in text and "\n  0 " in text, text


# -- progress on a terminal ----------------------------------------------------------------

def _run_with_tty_stderr(args: List[str], cwd: Path, timeout: float = 60.0
                         ) -> subprocess.CompletedProcess:
    """Run the CLI with stderr on a pseudo-terminal; return what it wrote there."""
    master_fd, slave_fd = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "fcgi_manager", *args], cwd=str(cwd),
                            env=_child_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave_fd)
    os.close(slave_fd)
    chunks: List[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master_fd, 4096)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        reader.join(5)
        os.close(master_fd)
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(),
                                       b"".join(chunks).decode("utf-8", "replace"))


class SlowRequest:
    """One slow request in a thread; ``wait_busy`` returns once the worker runs it."""

    def __init__(self, m: Manager, seconds: float) -> None:
        self.m = m
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, args=(seconds,), daemon=True)
        self.thread.start()

    def _run(self, seconds: float) -> None:
        try:
            fcgi_request(self.m.bind, f"/sleep?s={seconds}", timeout=30)
        except BaseException as exc:  # noqa: BLE001 - reported by wait_busy
            self.error = exc

    def wait_busy(self) -> None:
        def busy() -> bool:
            if not self.thread.is_alive():
                raise GiveUp(f"the slow request ended before it was seen: {self.error!r}")
            return any(w["state"] == "busy" for w in self.m.status()["workers"])
        wait_for(busy, 20, "the slow request to start")

    def join(self) -> None:
        self.thread.join(30)


def test_stop_shows_what_it_waits_for_on_a_terminal_and_nothing_when_piped(
        make_manager: MakeManager) -> None:
    m = make_manager(count=1)
    m.start()
    m.record()
    # Long enough that the CLI, started on a loaded machine, still finds it running.
    slow = SlowRequest(m, 5)
    slow.wait_busy()
    shown = _run_with_tty_stderr(["-c", str(m.config), "stop"], m.tmp)
    slow.join()
    assert shown.returncode == 0, shown
    assert "waiting for 1 request: GET /sleep" in shown.stderr, shown
    assert shown.stdout == "fcgi-manager stopped\n"
    m.start()
    slow = SlowRequest(m, 1.5)
    slow.wait_busy()
    piped = m.stop()
    slow.join()
    assert piped.stderr == "" and piped.stdout == "fcgi-manager stopped\n", piped


SLOW_IMPORT = '''
import time

time.sleep(1.0)


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\\n"]
'''


def test_reload_shows_what_it_waits_for_on_a_terminal(make_manager: MakeManager,
                                                      tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "slowimport.py").write_text(SLOW_IMPORT)
    m = make_manager("slowimport:app", count=1, path=[str(code)])
    m.start()
    shown = _run_with_tty_stderr(["-c", str(m.config), "reload"], m.tmp)
    assert shown.returncode == 0, shown
    assert "reload: " in shown.stderr, shown
    assert shown.stdout.startswith("reloaded: generation 2")


# -- scale across reload -------------------------------------------------------------------

def test_a_scale_is_kept_across_reload_unless_workers_count_changes(
        make_manager: MakeManager) -> None:
    m = make_manager("hello:app", count=1)
    m.start()
    scaled = m.cli("scale", "3")
    assert scaled.returncode == 0, scaled
    m.wait_workers(3, timeout=20)
    assert m.cli("reload", timeout=90).returncode == 0
    data = m.wait_workers(3, timeout=30, generation=2)
    assert data["target_workers"] == 3
    m.wait_log("keeping the scale to 3 workers")
    m.update("workers", count=2)
    assert m.cli("reload", timeout=90).returncode == 0
    m.wait_workers(2, timeout=30, generation=3)
    m.wait_log("workers.count is now 2 in the config: it replaces the earlier scale to 3")


def test_commands_find_a_master_started_with_other_paths_by_its_config(
        make_manager: MakeManager, tmp_path: Path) -> None:
    m = make_manager("hello:app", count=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"FCGI_MANAGER_MANAGER_PIDFILE": str(elsewhere / "x.pid"),
           "FCGI_MANAGER_MANAGER_CONTROL": str(elsewhere / "x.ctl")}
    started = m.cli("start", env=env, timeout=90)
    assert started.returncode == 0, started
    status = m.cli("status", "--json")  # without the variables: the file alone says app.ctl
    assert status.returncode == 0, status
    pid = json.loads(status.stdout)["pid"]
    m.tracker.add(pid)
    assert (elsewhere / "x.pid").read_text().split()[0] == str(pid)
    stop = m.cli("stop", timeout=60)
    assert stop.returncode == 0 and "stopped" in stop.stdout, stop
    wait_for(lambda: not pid_alive(pid), 10, "the master to exit")
