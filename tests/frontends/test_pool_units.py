"""A pool directory deployed as shipped: examples/pools.d/ (pools.d/yourapplication.toml,
pools.d/admin.toml) run by
examples/systemd/fcgi-manager-pools.service (Type=notify, reload, stop), one app by the
fcgi-manager@.service template, and the directory under Supervisor
(examples/supervisor-pools.conf). Each is run the way its supervisor runs it, without
systemd: ExecStart with a NOTIFY_SOCKET, ExecReload, KillSignal within TimeoutStopSec;
and nothing is left running after a stop.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from .support import (
    Procs,
    Site,
    check_app,
    child_env,
    fcgi,
    require_program,
    stop_process,
    wait_for,
)
from .test_systemd_units import Notify, parse_unit

POOLS = "/etc/fcgi-manager/pools.d"
APPS = ("yourapplication", "admin")


def _pool_dir(site: Site) -> Path:
    """examples/pools.d rendered into the site, with the tests' overrides."""
    d = site.etc / "pools.d"
    if not d.exists():
        d.mkdir()
        for name in APPS:
            site.render_toml(f"pools.d/{name}.toml", d / f"{name}.toml",
                             override=site.test_overrides())
    return d


def _env(site: Site, **extra: str) -> Dict[str, str]:
    # The parent's pidfile is in the runtime directory (/run for root): the site's here.
    return child_env({"XDG_RUNTIME_DIR": str(site.run), **extra})


def _cli(site: Site, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([site.fcgi_manager, "-c", str(_pool_dir(site)), *args],
                          env=_env(site), capture_output=True, text=True, timeout=120)


def _apps(site: Site) -> Dict[str, Dict]:
    out = _cli(site, "status", "--json")
    return {a["name"]: a for a in json.loads(out.stdout)["apps"]}


def _unit(site: Site, name: str) -> Dict[str, Dict[str, str]]:
    return parse_unit(site.render(f"systemd/{name}", site.work / name,
                                  replace=[(POOLS, str(_pool_dir(site)))]).read_text())


def _serves(site: Site) -> None:
    check_app(lambda p: fcgi(f"unix:{site.run / 'fcgi.sock'}", p), "")
    check_app(lambda p: fcgi(f"unix:{site.run / 'admin.sock'}", p), "")


def test_pools_service_notify_reload_stop(site: Site, procs: Procs) -> None:
    unit = _unit(site, "fcgi-manager-pools.service")
    service = unit["Service"]
    assert service["Type"] == "notify" and service["KillMode"] == "mixed"
    notify = Notify(site.work / "notify-pools.sock")
    main = procs.spawn(shlex.split(service["ExecStart"]), site.log / "pools-service.log",
                       env=_env(site, NOTIFY_SOCKET=str(notify.path)))
    notify.wait("READY=1")
    _serves(site)
    assert all(a["state"] == "running" for a in _apps(site).values())
    # The status page the master answers itself (status.listen in the example).
    page = fcgi(f"unix:{site.run / 'status.sock'}", "/fcgi-status?json")
    assert page.status == 200 and "workers" in page.json()
    # systemctl reload: a changed file reloads that app, the other is untouched.
    admin = _pool_dir(site) / "admin.toml"
    admin.write_text(admin.read_text().replace("count = 2", "count = 3"))
    before = _apps(site)
    reload = subprocess.run(shlex.split(service["ExecReload"]), env=_env(site),
                            capture_output=True, text=True, timeout=120)
    assert reload.returncode == 0, reload
    assert "admin: reloaded: generation 2, 3 worker(s)" in reload.stdout, reload
    assert "yourapplication: unchanged" in reload.stdout, reload
    assert _apps(site)["yourapplication"]["pid"] == before["yourapplication"]["pid"]
    _serves(site)
    family = procs.family()
    assert stop_process(main, getattr(signal, service["KillSignal"]),
                        float(service["TimeoutStopSec"])) == 0
    notify.wait("STOPPING=1", 5)
    assert not procs.wait_gone(family, 10), "KillMode=mixed would SIGKILL what is left"
    admin.write_text(admin.read_text().replace("count = 3", "count = 2"))


def test_template_unit_runs_one_app(site: Site, procs: Procs) -> None:
    unit = _unit(site, "fcgi-manager@.service")
    service = {k: v.replace("%i", "admin") for k, v in unit["Service"].items()}
    notify = Notify(site.work / "notify-admin.sock")
    main = procs.spawn(shlex.split(service["ExecStart"]), site.log / "admin-service.log",
                       env=_env(site, NOTIFY_SOCKET=str(notify.path)))
    notify.wait("READY=1")
    check_app(lambda p: fcgi(f"unix:{site.run / 'admin.sock'}", p), "")
    reload = subprocess.run(shlex.split(service["ExecReload"]), env=_env(site),
                            capture_output=True, text=True, timeout=120)
    assert reload.returncode == 0, reload
    notify.wait("RELOADING=1")
    notify.wait("READY=1")
    family = procs.family()
    assert stop_process(main, getattr(signal, service["KillSignal"]),
                        float(service["TimeoutStopSec"])) == 0
    assert not procs.wait_gone(family, 10)


class Supervisor:
    def __init__(self, site: Site, procs: Procs) -> None:
        self.supervisord = require_program("supervisord")
        self.supervisorctl = require_program("supervisorctl")
        self.conf = site.render("supervisor-pools.conf",
                                replace=[(POOLS, str(_pool_dir(site)))])
        self.proc = procs.spawn([self.supervisord, "-n", "-c", str(self.conf)],
                                site.log / "supervisord-pools.stderr", env=_env(site))
        procs.on_cleanup(lambda: stop_process(self.proc, signal.SIGTERM, 60))

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.supervisorctl, "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=90, env=child_env())

    def state(self) -> str:
        found = re.search(r"^fcgi-manager-pools\s+([A-Z]+)", self.ctl("status").stdout,
                          re.MULTILINE)
        return found.group(1) if found else ""


@pytest.mark.needs("supervisord", "supervisorctl")
def test_supervisor_runs_the_directory(site: Site, procs: Procs) -> None:
    sup = Supervisor(site, procs)
    wait_for(lambda: sup.state() == "RUNNING" and all(
        a["state"] == "running" for a in _apps(site).values()) and len(_apps(site)) == 2,
        90, "the pool RUNNING under Supervisor")
    _serves(site)
    parent = int(sup.ctl("pid", "fcgi-manager-pools").stdout.strip())
    assert (site.run / "pools.d.fcgi-manager-pool.pid").read_text().split()[0] == str(parent)
    # A file added, then `supervisorctl signal HUP`: the new app starts.
    extra = _pool_dir(site) / "extra.toml"
    text = (_pool_dir(site) / "admin.toml").read_text()
    extra.write_text(text.replace("admin.sock", "extra.sock").replace("admin.pid", "extra.pid")
                     .replace("admin.log", "extra.log"))
    assert sup.ctl("signal", "HUP", "fcgi-manager-pools").returncode == 0
    wait_for(lambda: (_apps(site).get("extra") or {}).get("state") == "running", 60,
             "the added app running")
    check_app(lambda p: fcgi(f"unix:{site.run / 'extra.sock'}", p), "")
    family = procs.family()
    r = sup.ctl("stop", "fcgi-manager-pools")
    assert r.returncode == 0 and "stopped" in r.stdout, r
    left: List = procs.wait_gone({p: t for p, t in family.items() if p != sup.proc.pid}, 15)
    assert not left, left
    extra.unlink()
