"""The LSB init script (examples/init.d/fcgi-manager), run unmodified with its defaults file
pointed at a temporary one: start, status, reload, restart, stop, and LSB exit codes."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from .support import EXAMPLES, Manager, Procs, Site, child_env, pid_alive

SCRIPT = EXAMPLES / "init.d" / "fcgi-manager"


@pytest.fixture(scope="module")
def manager(site: Site, procs: Procs) -> Manager:
    config = site.render_toml("flask_app/fcgi-manager.toml", override=site.test_overrides())
    m = Manager(site, procs, config)
    procs.on_cleanup(m.stop)
    return m


def _defaults(site: Site, **values: str) -> Path:
    path = site.etc / f"default-{len(list(site.etc.glob('default-*')))}"
    path.write_text("".join(f'{k}="{v}"\n' for k, v in values.items()))
    return path


def initd(action: str, defaults: Path) -> subprocess.CompletedProcess:
    env = child_env({"FCGI_MANAGER_DEFAULTS": str(defaults), "SYSTEMCTL_SKIP_REDIRECT": "1"})
    return subprocess.run([str(SCRIPT), action], capture_output=True, text=True, timeout=120,
                          env=env, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def defaults(site: Site, manager: Manager) -> Path:
    return _defaults(site, DAEMON=site.fcgi_manager, CONFIG=str(manager.config))


def _family(manager: Manager) -> Dict[int, None]:
    return dict.fromkeys([manager.pid(), *manager.worker_pids()])  # type: ignore[list-item]


def test_lifecycle(site: Site, procs: Procs, manager: Manager, defaults: Path) -> None:
    seen: List[int] = []
    r = initd("status", defaults)
    assert r.returncode == 3, r  # LSB: not running
    r = initd("start", defaults)
    assert r.returncode == 0, r
    procs.add(manager.pid())
    first = _family(manager)
    seen += first
    assert manager.get("/hello/initd").text == "Hello, initd!\n"
    assert initd("status", defaults).returncode == 0
    r = initd("start", defaults)  # LSB: starting a running service succeeds
    assert r.returncode == 0, r
    assert manager.pid() == next(iter(first))

    r = initd("reload", defaults)
    assert r.returncode == 0, r
    assert manager.status()["generation"] == 2
    assert manager.pid() == next(iter(first)), "reload keeps the master"
    r = initd("force-reload", defaults)
    assert r.returncode == 0, r
    assert manager.status()["generation"] == 3

    r = initd("restart", defaults)
    assert r.returncode == 0, r
    procs.add(manager.pid())
    second = _family(manager)
    seen += second
    assert not set(first) & set(second), "restart: a new master and new workers"
    assert not [pid for pid in first if pid_alive(pid)], "the old ones are gone"
    assert manager.get("/hello/again").status == 200
    r = initd("try-restart", defaults)
    assert r.returncode == 0, r
    procs.add(manager.pid())
    seen += _family(manager)

    r = initd("stop", defaults)
    assert r.returncode == 0, r
    assert not [pid for pid in seen if pid_alive(pid)], "stop leaves nothing running"
    assert initd("status", defaults).returncode == 3
    assert initd("stop", defaults).returncode == 0  # LSB: stopping a stopped service
    assert initd("reload", defaults).returncode == 7  # LSB: program is not running
    assert initd("try-restart", defaults).returncode == 0


def test_status_with_a_stale_pidfile(manager: Manager, defaults: Path) -> None:
    proc = subprocess.Popen(["true"])  # its pid, once reaped, runs nothing
    proc.wait()
    manager.pidfile.write_text(f"{proc.pid}\n")
    try:
        r = initd("status", defaults)
        assert r.returncode == 1, r  # LSB: dead, but the pidfile exists
    finally:
        manager.pidfile.unlink()


def test_usage_and_configuration_errors(site: Site, manager: Manager, defaults: Path) -> None:
    r = initd("frobnicate", defaults)
    assert r.returncode == 2 and "Usage:" in r.stderr, r
    missing = _defaults(site, DAEMON=site.fcgi_manager, CONFIG=str(site.etc / "missing.toml"))
    assert initd("start", missing).returncode == 6  # not configured
    assert initd("status", missing).returncode == 4  # unknown
    no_daemon = _defaults(site, DAEMON=str(site.etc / "no-such-program"),
                          CONFIG=str(manager.config))
    assert initd("start", no_daemon).returncode == 5  # not installed
    assert initd("stop", no_daemon).returncode == 0


def test_works_without_lsb_init_functions(site: Site, procs: Procs, manager: Manager,
                                          defaults: Path) -> None:
    """On a system without /lib/lsb/init-functions the script's own fallbacks print."""
    script = site.render("init.d/fcgi-manager", site.etc / "fcgi-manager-no-lsb",
                         [("/lib/lsb/init-functions", str(site.etc / "no-init-functions"))],
                         mode=0o755)
    env = child_env({"FCGI_MANAGER_DEFAULTS": str(defaults)})

    def run(action: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(script), action], capture_output=True, text=True,
                              timeout=120, env=env, stdin=subprocess.DEVNULL)

    r = run("start")
    assert r.returncode == 0 and r.stdout.strip().endswith("."), r
    procs.add(manager.pid())
    family = _family(manager)
    assert run("status").returncode == 0
    r = run("stop")
    assert r.returncode == 0 and "Stopping" in r.stdout, r
    assert not [pid for pid in family if pid_alive(pid)]
    assert run("status").returncode == 3
