"""Every example deployed exactly as shipped, only its paths moved into a temporary tree,
after a reboot emptied ``/run``: the init script and Supervisor with no
``/run/yourapplication``, the systemd service, socket and config together (the unit's own
ExecStart under ``systemd-socket-activate``), a stock nginx running as ``www-data`` in
front of ``examples/app.toml``, and the README's logrotate stanza."""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from tests.support import skip_or_fail

from .support import (
    EXAMPLES,
    ROOT,
    Lighttpd,
    Manager,
    Nginx,
    Procs,
    Site,
    check_app,
    child_env,
    fcgi,
    http_request,
    is_root,
    python_for,
    require_program,
    stop_process,
    tail,
    unix_listening,
    wait_for,
    web_user,
)
from .test_initd import SCRIPT, _defaults, initd
from .test_supervisor import PROGRAMS, Supervisor
from .test_systemd_units import parse_unit


def reboot(site: Site) -> None:
    """What a reboot does to /run/yourapplication (a tmpfs directory): it is gone."""
    shutil.rmtree(site.run)
    assert not site.run.exists()


def test_initd_after_a_reboot(site: Site, procs: Procs) -> None:
    config = site.render_toml("flask_app/fcgi-manager.toml", override=site.test_overrides())
    manager = Manager(site, procs, config)
    procs.on_cleanup(manager.stop)
    defaults = _defaults(site, DAEMON=site.fcgi_manager, CONFIG=str(config))
    assert SCRIPT.is_file()
    reboot(site)
    r = initd("start", defaults)
    assert r.returncode == 0, f"{r}\n{tail(manager.log)}"
    procs.add(manager.pid())
    check_app(manager.get, "")
    assert initd("status", defaults).returncode == 0
    assert initd("stop", defaults).returncode == 0
    assert initd("status", defaults).returncode == 3


@pytest.mark.needs("supervisord", "supervisorctl")
def test_supervisord_after_a_reboot(site: Site, procs: Procs) -> None:
    reboot(site)
    supervisor = Supervisor(site, procs)
    supervisor.wait_running(*PROGRAMS)
    for name in PROGRAMS:
        check_app(lambda path, n=name: supervisor.get(n, path), "")
    r = supervisor.ctl("shutdown")
    assert r.returncode == 0, r
    wait_for(lambda: supervisor.proc.poll() is not None, 60, "supervisord to exit")


def _activate_env() -> List[str]:
    """systemd-socket-activate passes on only the variables named with -E."""
    return [f"-E{k}={v}" for k, v in sorted(child_env().items())
            if k.startswith(("PYTHON", "FCGI_MANAGER_")) or k in ("PATH", "HOME", "LANG")]


@pytest.mark.needs("systemd-socket-activate")
def test_systemd_service_socket_and_config_start_together(site: Site, procs: Procs) -> None:
    activate = require_program("systemd-socket-activate")
    service = parse_unit(site.render("systemd/fcgi-manager.service").read_text())
    sock_unit = parse_unit(site.render("systemd/fcgi-manager.socket").read_text())
    assert "fcgi-manager.socket" in service["Unit"]["Requires"]
    config = site.render_toml("flask_app/fcgi-manager.toml", override=site.test_overrides())
    manager = Manager(site, procs, config)
    path = sock_unit["Socket"]["ListenStream"]
    assert manager.bind == f"unix:{path}", "shipped: the config's bind is the unit's socket"
    reboot(site)
    site.run.mkdir()  # systemd makes a ListenStream='s directory (and RuntimeDirectory=)
    argv = shlex.split(service["Service"]["ExecStart"])
    assert argv[0] == site.fcgi_manager
    proc = procs.spawn([activate, "-l", path, *_activate_env(), *argv],
                       site.log / "socket-activate.log")
    procs.on_cleanup(lambda: stop_process(proc, signal.SIGTERM))
    wait_for(lambda: unix_listening(Path(path)), 30, "systemd-socket-activate's socket")
    # The first connection execs the service (systemd starts it at boot: the same).
    check_app(lambda p: fcgi(f"unix:{path}", p), "")
    assert manager.pid() == proc.pid, "the service runs in the activated process"
    stop = float(service["Service"]["TimeoutStopSec"])
    assert stop_process(proc, getattr(signal, service["Service"]["KillSignal"]), stop) == 0, \
        tail(site.log / "socket-activate.log")
    assert Path(path).exists(), "the socket is systemd's: it stays"


@pytest.mark.needs("nginx")
def test_stock_nginx_as_www_data_in_front_of_app_toml(site: Site, procs: Procs) -> None:
    """examples/app.toml as shipped, started by root, and nginx as Debian runs it."""
    require_program("nginx")
    if not is_root():
        skip_or_fail("nginx runs as www-data only when started by root")
    examples = site.work / "examples"
    examples.mkdir(mode=0o755)
    for name in ("app.toml", "hello.py"):
        shutil.copy(EXAMPLES / name, examples / name)
    text = (examples / "app.toml").read_text()
    socket_path = examples / re.search(r'bind = "unix:([^"]+)"', text).group(1)
    program = site.fcgi_manager
    start = subprocess.run([program, "-c", str(examples / "app.toml"), "start"],
                           capture_output=True, text=True, timeout=120, env=child_env())
    assert start.returncode == 0, start
    assert "cannot connect" not in start.stdout, start

    def stop() -> None:
        subprocess.run([program, "-c", str(examples / "app.toml"), "stop"],
                       capture_output=True, timeout=120, env=child_env())

    procs.on_cleanup(stop)
    procs.add(int((examples / "run" / "hello.pid").read_text().split()[0]))
    nginx = Nginx(site, procs, "nginx-app-toml")
    port = nginx.add("nginx/root.conf", [("unix:/run/yourapplication/fcgi.sock",
                                          f"unix:{socket_path}")])
    nginx.start()
    reply = http_request(port, "/")
    assert (reply.status, reply.body) == (200, b"Hello, World!\n"), (reply, nginx.logs())
    stop()


def test_readme_logrotate_stanza_reopens_the_logs(site: Site, procs: Procs) -> None:
    """The postrotate command, as the README writes it, against the shipped config."""
    readme = (ROOT / "README.md").read_text()
    stanza = re.search(r"```\n(/var/log/yourapplication/\S+ \{.*?\n\})\n```", readme,
                       re.DOTALL)
    assert stanza, "the README's logrotate stanza"
    command = re.search(r"postrotate\n\s*(.*?)\n\s*endscript", stanza.group(1)).group(1)
    config = site.render_toml("flask_app/fcgi-manager.toml", override=site.test_overrides())
    assert "/etc/yourapplication/fcgi-manager.toml" in command, command
    manager = Manager(site, procs, config).start()
    log_name = stanza.group(1).split()[0]
    assert log_name.replace("/var/log/yourapplication", str(site.log)) == str(manager.log)
    for old, new in site.paths:
        command = command.replace(old, new)
    command = command.replace("fcgi-manager ", f"{site.fcgi_manager} ", 1)
    rotated = manager.log.with_suffix(".log.1")
    manager.log.rename(rotated)
    r = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True,
                       timeout=60, env=child_env())
    assert r.returncode == 0, r
    wait_for(lambda: manager.log.exists(), 10, "the log reopened under its name")
    manager.stop()
    assert sys.executable  # the interpreter running the tests ran every command above


class LighttpdAsWebUser(Lighttpd):
    """lighttpd as Debian runs it: started by root, serving as www-data."""

    def start(self) -> Lighttpd:
        user, group = web_user()
        web = pwd.getpwnam(user)
        os.chown(self.dir, web.pw_uid, web.pw_gid)  # lighttpd opens its logs as www-data
        self.include.write_text(f'server.username = "{user}"\nserver.groupname = "{group}"\n'
                                + self.include.read_text())
        return super().start()


@pytest.mark.needs("lighttpd")
def test_lighttpd_bin_path_socket_in_a_directory_its_user_can_write(site: Site,
                                                                     procs: Procs) -> None:
    """examples/lighttpd/bin-path.conf as shipped, lighttpd running as www-data: it creates
    its socket itself, so the socket's directory must be its user's."""
    require_program("lighttpd")
    if not is_root():
        skip_or_fail("lighttpd changes to www-data only when started by root")
    user = web_user()[0]
    python, env = python_for(user, site.work)
    # The .fcgi file as shipped; only the interpreter www-data can run is chosen for it.
    wrapper = site.app / "run-fcgi"
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    wrapper.write_text(f"#!/bin/sh\n{exports}cd {site.app}\n"
                       f"exec {python} {site.app / 'yourapplication.fcgi'}\n")
    os.chmod(wrapper, 0o755)
    server = LighttpdAsWebUser(site, procs, "lighttpd/bin-path.conf", [
        ("/var/www/yourapplication/yourapplication.fcgi", "/var/www/yourapplication/run-fcgi"),
    ], name="lighttpd-as-www-data")
    assert str(site.lighttpd_run) in server.include.read_text(), \
        "the socket is in lighttpd's runtime directory"
    server.start()
    check_app(lambda path: http_request(server.port, path), "")
    server.stop()


def readme_shell_blocks() -> List[str]:
    return re.findall(r"```(?:sh|bash|shell)\n(.*?)```", (ROOT / "README.md").read_text(),
                      re.DOTALL)


def _substituted(site: Site, text: str) -> str:
    for old, new in site.paths:
        text = text.replace(old, new)
    return re.sub(r"(?m)^fcgi-manager ", f"{site.fcgi_manager} ", text)


@pytest.mark.needs("cgi-fcgi")
def test_readme_shell_blocks_run_as_written(site: Site, procs: Procs) -> None:
    """Each shell block of the README is run here (paths substituted), or is run by the
    test named for it, or only names files that must exist: a new block fails this test
    until it is given one of these."""
    elsewhere = {
        "fcgi-manager run fcgi_manager.demo:app": "test_readme_quickstart.py (the demo)",
        "cd /srv/yourapplication": "test_readme_quickstart.py",
        "exec spawn-fcgi": "test_spawn_fcgi.py",
        "docker build": "tests/containers (no Docker engine here: read as data)",
        "/etc/fcgi-manager/pools.d": "test_pooldir.py and frontends/test_pool_units.py",
        "python3 -m pytest": "test_ci.py (the same command as .ci/run, which CI runs)",
        "apt-get install": "test_ci.py (the same packages as .ci/run installs)",
    }
    config = site.render_toml("flask_app/fcgi-manager.toml", override=site.test_overrides())
    manager = Manager(site, procs, config)
    procs.on_cleanup(manager.stop)
    for block in readme_shell_blocks():
        if any(key in block for key in elsewhere):
            continue
        if block.startswith("systemctl "):
            for unit in re.findall(r"fcgi-manager\.(?:socket|service)", block):
                assert (EXAMPLES / "systemd" / unit).is_file(), unit
            continue
        if block.startswith("DAEMON="):  # /etc/default/fcgi-manager: the script's defaults
            for line in block.splitlines():
                assert line in SCRIPT.read_text(), line
            continue
        if block.startswith("cp examples/init.d/fcgi-manager"):
            assert (ROOT / "examples" / "init.d" / "fcgi-manager").is_file()
            continue
        if "cgi-fcgi" in block:
            require_program("cgi-fcgi")
            if manager.pid() is None:
                manager.start()
        else:
            assert "/etc/yourapplication/fcgi-manager.toml" in block, block
            if manager.pid() is not None:
                manager.stop()
            reboot(site)  # each block runs as after a boot: no /run/yourapplication
        script = _substituted(site, block).replace(
            "/etc/yourapplication/fcgi-manager.toml", str(config))
        r = subprocess.run(["/bin/sh", "-ec", script], capture_output=True, text=True,
                           timeout=180, env=child_env(), cwd=str(site.work))
        assert r.returncode == 0, f"{block}\n{r}\n{tail(manager.log)}"
        if "start" in block:
            procs.add(manager.pid())
            check_app(manager.get, "")
        if "cgi-fcgi" in block:
            assert "/where" in r.stdout or "script_root" in r.stdout, r.stdout
    if manager.pid() is not None:
        manager.stop()
