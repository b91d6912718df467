"""Configuration: TOML errors name the file and key, sizes and relative paths are read as
documented, and ``run`` serves without any file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from support import (
    APPS,
    GiveUp,
    ProcessTracker,
    _child_env,
    fcgi_manager,
    fcgi_request,
    free_port,
    wait_for,
)

from fcgi_manager import config as config_mod
from fcgi_manager.errors import ConfigError

GOOD = """
[app]
module = "hello:app"
path = ["{apps}"]

[listen]
bind = "unix:app.sock"

[manager]
pidfile = "app.pid"
log = "app.log"
"""


def write(tmp_path: Path, text: str, name: str = "app.toml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("{apps}", str(APPS)))
    return path


def start_fails(tmp_path: Path, cfg: Path) -> str:
    """``start`` on a bad config: exit 1, an ``Error:`` line, no traceback, nothing left."""
    result = fcgi_manager(["-c", str(cfg), "start"], cwd=tmp_path, timeout=60)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result
    assert not (tmp_path / "app.pid").exists()
    assert not (tmp_path / "app.sock").exists()
    return result.stderr


@pytest.mark.parametrize("section, line, expected", [
    ("workers", "cout = 2", "[workers] cout: unknown key"),
    ("workers", 'count = "four"', "[workers] count: expected a whole number"),
    ("workers", "count = true", "[workers] count: expected a whole number"),
    ("workers", 'timeout = "60s"', "[workers] timeout: expected a number of seconds"),
    ("app", 'preload = "yes"', "[app] preload: expected true or false"),
    ("workers", 'max_memory = "lots"', "[workers] max_memory: cannot read 'lots' as a size"),
    ("workers", 'mode = "turbo"', "[workers] mode: must be one of static, dynamic, ondemand"),
    ("listen", 'mode = "rw-rw----"', '[listen] mode: expected an octal mode like "0660"'),
    ("listen", "allowed_clients = [1]", "[listen] allowed_clients: expected an IP address"),
    ("manager", 'log_level = "loud"', "[manager] log_level: must be one of debug"),
    ("status", 'path = "fcgi-status"', "[status] path: must start with '/'"),
])
def test_bad_key_names_file_section_and_key(tmp_path: Path, section: str, line: str,
                                            expected: str) -> None:
    text = GOOD
    if f"[{section}]\n" in text:
        text = text.replace(f"[{section}]\n", f"[{section}]\n{line}\n")
    else:
        text += f"\n[{section}]\n{line}\n"
    cfg = write(tmp_path, text)
    stderr = start_fails(tmp_path, cfg)
    assert f"Error: {cfg}: {expected}" in stderr, stderr


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    cfg = write(tmp_path, GOOD + "\n[workers]\ncout = 2\n")
    stderr = start_fails(tmp_path, cfg)
    assert "hint: did you mean 'count'?" in stderr, stderr


def test_unknown_section(tmp_path: Path) -> None:
    cfg = write(tmp_path, GOOD + "\n[worker]\ncount = 2\n")
    stderr = start_fails(tmp_path, cfg)
    assert f"Error: {cfg}: unknown section [worker]" in stderr, stderr
    assert "[workers]" in stderr  # the hint lists the real sections


def test_missing_module(tmp_path: Path) -> None:
    cfg = write(tmp_path, "[workers]\ncount = 1\n")
    stderr = start_fails(tmp_path, cfg)
    assert f"Error: {cfg}: [app] module: is required" in stderr, stderr


def test_invalid_toml(tmp_path: Path) -> None:
    cfg = write(tmp_path, GOOD + "\n[workers\ncount = 1\n")
    stderr = start_fails(tmp_path, cfg)
    assert f"Error: {cfg}: not valid TOML" in stderr, stderr


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    result = fcgi_manager(["-c", str(missing), "start"], cwd=tmp_path)
    assert result.returncode == 1
    assert f"config file {missing} does not exist" in result.stderr


def test_config_from_environment_variable(tmp_path: Path) -> None:
    cfg = write(tmp_path, GOOD + "\n[workers]\ncout = 2\n")
    result = fcgi_manager(["start"], cwd=tmp_path, env={"FCGI_MANAGER_CONFIG": str(cfg)})
    assert result.returncode == 1
    assert f"Error: {cfg}: [workers] cout: unknown key" in result.stderr


def test_no_config_at_all_says_what_to_do(tmp_path: Path) -> None:
    result = fcgi_manager(["start"], cwd=tmp_path)
    assert result.returncode == 1
    assert "Error: no config file given" in result.stderr
    assert "fcgi-manager run" in result.stderr


def test_status_on_a_bad_config_is_lsb_unknown(tmp_path: Path) -> None:
    cfg = write(tmp_path, GOOD + "\n[workers]\ncout = 2\n")
    result = fcgi_manager(["-c", str(cfg), "status"], cwd=tmp_path)
    assert result.returncode == 4
    assert "[workers] cout" in result.stderr


def test_version_and_help() -> None:
    from fcgi_manager import __version__, compiled

    version = fcgi_manager(["--version"])
    assert version.returncode == 0
    assert version.stdout == f"fcgi-manager {__version__} ({compiled.describe()})\n"
    pure = fcgi_manager(["--version"], env={"FCGI_MANAGER_PURE": "1"})
    assert pure.stdout == f"fcgi-manager {__version__} (pure Python)\n"
    helped = fcgi_manager(["--help"])
    assert helped.returncode == 0
    for command in ("run", "start", "stop", "reload", "status", "scale", "reopen-logs",
                    "check", "request"):
        assert command in helped.stdout


@pytest.mark.parametrize("text, size", [
    ('"512MiB"', 512 * 1024**2),
    ('"64KiB"', 64 * 1024),
    ('"1MB"', 1000**2),
    ('"512M"', 512 * 1024**2),
    ('"64K"', 64 * 1024),
    ('"1G"', 1024**3),
    ('"0.5M"', 512 * 1024),
    ('"2 GiB"', 2 * 1024**3),
    ("1048576", 1048576),
    ('""', 0),
    ("0", 0),
])
def test_sizes(tmp_path: Path, text: str, size: int) -> None:
    cfg = write(tmp_path, GOOD + f"\n[workers]\nmax_memory = {text}\n")
    assert config_mod.load(str(cfg)).workers.max_memory == size


@pytest.mark.parametrize("value", ['"-1MiB"', "-1", "true", '"12 parsecs"'])
def test_bad_sizes(tmp_path: Path, value: str) -> None:
    cfg = write(tmp_path, GOOD + f"\n[workers]\nmax_body_in_memory = {value}\n")
    with pytest.raises(ConfigError) as info:
        config_mod.load(str(cfg))
    assert f"{cfg}: [workers] max_body_in_memory" in info.value.message


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    cfg_path = conf_dir / "site.toml"
    cfg_path.write_text("""
[app]
module = "hello:app"
path = [".", "../lib", "/abs/lib"]
chdir = "www"

[listen]
bind = "unix:run/site.sock"

[manager]
pidfile = "run/site.pid"
log = "logs/site.log"
""")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = config_mod.load("../etc/site.toml")
    assert cfg.source == str(cfg_path)
    assert cfg.app.path == (str(conf_dir), str(tmp_path / "lib"), "/abs/lib")
    assert cfg.app.chdir == str(conf_dir / "www")
    assert cfg.listen.bind == f"unix:{conf_dir / 'run' / 'site.sock'}"
    assert cfg.manager.pidfile == str(conf_dir / "run" / "site.pid")
    assert cfg.manager.control == str(conf_dir / "run" / "site.ctl")  # beside the pidfile
    assert cfg.manager.log == str(conf_dir / "logs" / "site.log")


def test_defaults(tmp_path: Path) -> None:
    cfg = config_mod.load(str(write(tmp_path, '[app]\nmodule = "hello:app"\n')))
    assert cfg.listen.bind == "127.0.0.1:9000" and cfg.listen.backlog == 1024
    assert cfg.workers.effective_count == (os.cpu_count() or 1)
    assert cfg.workers.max_body_in_memory == 1024 * 1024
    assert cfg.app.preload is True and cfg.app.script_name is None
    assert cfg.manager.pidfile == str(tmp_path / "app.fcgi-manager.pid")


def test_too_long_control_socket_path_is_a_clear_error(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    cfg = write(tmp_path, GOOD + f'control = "{deep}/app.ctl"\n')
    stderr = start_fails(tmp_path, cfg)
    assert f"Error: cannot create the control socket {deep}/app.ctl" in stderr, stderr
    assert "107 bytes" in stderr


def test_run_needs_no_config_file(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    tracker = ProcessTracker()
    env = _child_env({"XDG_RUNTIME_DIR": str(tmp_path)})  # keep its pidfile in tmp
    proc = subprocess.Popen(
        [sys.executable, "-m", "fcgi_manager", "run", "combo:app", "--bind", address,
         "--workers", "2", "--chdir", str(APPS)],
        cwd=str(tmp_path), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    tracker.add(proc.pid)
    try:
        def serving() -> object:
            if proc.poll() is not None:
                raise GiveUp(f"`run` exited with {proc.returncode}: "
                                     f"{proc.communicate()[1].decode(errors='replace')}")
            return fcgi_request(address, "/hello", timeout=5)

        reply = wait_for(serving, 30, "`run` to serve")
        assert reply.status == "200 OK"
        assert reply.body.startswith(b'{"hello": "world"')

        def two_workers() -> bool:
            children = psutil.Process(proc.pid).children()
            tracker.add_all(c.pid for c in children)
            return len(children) == 2
        wait_for(two_workers, 10, "two workers")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert b"master stopped" in err  # logs go to stderr in the foreground
        with pytest.raises(OSError):  # the port is closed
            fcgi_request(address, "/hello", timeout=5)
        assert tracker.alive() == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        tracker.kill_all()
