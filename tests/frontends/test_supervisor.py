"""Supervisor running fcgi-manager (examples/supervisord.conf): [program:x] with
fcgi-manager owning its socket, and [fcgi-program:x] with Supervisor's socket on fd 0.
supervisorctl status/stop/start/signal, and no process left behind after a stop."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path
from typing import Dict, List

import psutil
import pytest

from .support import (
    Manager,
    Procs,
    Site,
    check_app,
    child_env,
    fcgi,
    is_root,
    me,
    pid_alive,
    require_program,
    stop_process,
    unix_listening,
    wait_for,
)

pytestmark = pytest.mark.needs("supervisord", "supervisorctl")

PROGRAMS = ("yourapplication", "yourapplication-fd0")


class Supervisor:
    def __init__(self, site: Site, procs: Procs) -> None:
        self.supervisord = require_program("supervisord")
        self.supervisorctl = require_program("supervisorctl")
        self.site = site
        replace = []
        if not is_root():
            user, group = me()
            replace.append(("socket_owner = www-data:www-data", f"socket_owner = {user}:{group}"))
        self.conf = site.render("supervisord.conf", replace=replace)
        self.managers = {
            "yourapplication": Manager(site, procs, site.render_toml(
                "flask_app/fcgi-manager.toml", override=site.test_overrides())),
            PROGRAMS[1]: Manager(site, procs, site.render_toml(
                "flask_app/fcgi-manager-fd0.toml", override=site.test_overrides())),
        }
        self.sockets = {"yourapplication": site.run / "fcgi.sock",
                        PROGRAMS[1]: Path(f"{site.run}-fcgi-fd0.sock")}
        self.proc = procs.spawn([self.supervisord, "-n", "-c", str(self.conf)],
                                site.log / "supervisord.stderr")
        procs.on_cleanup(self.shutdown)

    def ctl(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run([self.supervisorctl, "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=timeout,
                              env=child_env())

    def states(self) -> Dict[str, str]:
        out = self.ctl("status").stdout
        return dict(re.findall(r"^(\S+)\s+([A-Z]+)", out, re.MULTILINE))

    def wait_running(self, *names: str) -> None:
        def running() -> bool:
            states = self.states()
            return all(states.get(n) == "RUNNING" for n in names) and all(
                unix_listening(self.sockets[n]) for n in names)
        try:
            wait_for(running, 60, f"{names} RUNNING")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.ctl('status').stdout}\n{self.logs()}") from None

    def pid(self, name: str) -> int:
        r = self.ctl("pid", name)
        return int(r.stdout.strip())

    def family(self, name: str) -> List[int]:
        master = psutil.Process(self.pid(name))
        return [master.pid, *(c.pid for c in master.children(recursive=True))]

    def get(self, name: str, path: str):
        return fcgi(f"unix:{self.sockets[name]}", path)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:]
                         for p in sorted(Path(self.site.log).glob("*supervisor*")))

    def shutdown(self) -> None:
        if self.proc.poll() is None:
            stop_process(self.proc, signal.SIGTERM, 60)


@pytest.fixture(scope="module")
def supervisor(site: Site, procs: Procs) -> Supervisor:
    sup = Supervisor(site, procs)
    sup.wait_running(*PROGRAMS)
    return sup


@pytest.mark.parametrize("name", PROGRAMS)
def test_serves(supervisor: Supervisor, name: str) -> None:
    check_app(lambda path: supervisor.get(name, path), "")
    status = supervisor.managers[name].status()
    assert status["pid"] == supervisor.pid(name), "Supervisor watches the master itself"
    assert len(status["workers"]) == 2


def test_signal_hup_reloads(supervisor: Supervisor) -> None:
    name = "yourapplication"
    pid = supervisor.pid(name)
    before = supervisor.managers[name].worker_pids()
    r = supervisor.ctl("signal", "HUP", name)
    assert r.returncode == 0, r
    manager = supervisor.managers[name]
    wait_for(lambda: manager.status()["generation"] == 2 and not set(manager.worker_pids()) &
             set(before) and len(manager.worker_pids()) == 2, 60, "the reload")
    assert supervisor.pid(name) == pid, "same master pid: Supervisor sees no restart"
    assert supervisor.states()[name] == "RUNNING"
    check_app(lambda path: supervisor.get(name, path), "")


@pytest.mark.parametrize("name", PROGRAMS)
def test_stop_leaves_nothing_and_start_serves_again(supervisor: Supervisor, name: str) -> None:
    family = supervisor.family(name)
    # the master and 2 workers; after a preloading reload also the zygote that imported
    # the new generation (the re-executed master never imports the app itself)
    zygotes = [pid for pid in family if psutil.Process(pid).name() == "fcgi-mgr zygote"]
    assert len(family) - len(zygotes) == 3 and len(zygotes) <= 1, family
    r = supervisor.ctl("stop", name)
    assert r.returncode == 0 and "stopped" in r.stdout, r
    assert supervisor.states()[name] == "STOPPED"
    left = [pid for pid in family if pid_alive(pid)]
    assert not left, f"processes left after `supervisorctl stop`: {left}"
    if name == "yourapplication":  # fcgi-manager's own socket goes with it
        assert not supervisor.sockets[name].exists()
    r = supervisor.ctl("start", name)
    assert r.returncode == 0 and "started" in r.stdout, r
    supervisor.wait_running(name)
    assert supervisor.pid(name) not in family
    check_app(lambda path: supervisor.get(name, path), "")


def test_shutdown_leaves_nothing(supervisor: Supervisor) -> None:
    supervisor.wait_running(*PROGRAMS)  # an earlier test may have just restarted one
    family = [pid for name in PROGRAMS for pid in supervisor.family(name)]
    r = supervisor.ctl("shutdown")
    assert r.returncode == 0, r
    wait_for(lambda: supervisor.proc.poll() is not None, 60, "supervisord to exit")
    left = [pid for pid in family if pid_alive(pid)]
    assert not left, f"processes left after supervisord shut down: {left}"
