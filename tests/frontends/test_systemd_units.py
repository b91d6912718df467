"""The systemd units (examples/systemd/): fcgi-manager.socket and fcgi-manager.service
(Type=notify), run the way systemd runs them, without systemd: the test creates the
socket from the .socket unit, starts ExecStart with it on fd 3 (LISTEN_FDS, LISTEN_PID)
and a NOTIFY_SOCKET, runs ExecReload, stops with KillSignal, and starts again on the same
socket."""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import signal
import socket
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from .support import (
    Manager,
    Procs,
    Site,
    check_app,
    child_env,
    fcgi,
    is_root,
    stop_process,
    wait_for,
)


def parse_unit(text: str) -> Dict[str, Dict[str, str]]:
    sections: Dict[str, Dict[str, str]] = {}
    current: Optional[Dict[str, str]] = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif current is not None and "=" in line:
            key, _, value = line.partition("=")
            current[key.strip()] = value.strip()
    return sections


class Notify:
    """The NOTIFY_SOCKET a Type=notify unit gets: collects sd_notify datagrams."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: List[str] = []

    def wait(self, state: str, timeout: float = 60) -> None:
        def seen() -> bool:
            try:
                while True:
                    self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                pass
            return any(state in m.split("\n") for m in self.messages)

        wait_for(seen, timeout, lambda: f"sd_notify {state}; got {self.messages}")
        self.messages = [m for m in self.messages if state not in m.split("\n")]


@pytest.fixture(scope="module")
def units(site: Site) -> Dict[str, Dict[str, Dict[str, str]]]:
    return {name: parse_unit(site.render(f"systemd/{name}").read_text())
            for name in ("fcgi-manager.socket", "fcgi-manager.service")}


def test_service_unit_is_what_fcgi_manager_needs(units: Dict) -> None:
    service = units["fcgi-manager.service"]["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"].endswith("start --foreground")
    assert service["ExecReload"].endswith(" reload")
    assert service["KillSignal"] == "SIGTERM"
    unit = units["fcgi-manager.service"]["Unit"]
    assert "fcgi-manager.socket" in unit["Requires"]


def _listen(site: Site, socket_unit: Dict[str, str]) -> socket.socket:
    """What systemd does for the .socket unit."""
    path = socket_unit["ListenStream"]
    assert path.startswith(str(site.run)), path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, int(socket_unit["SocketMode"], 8))
    if is_root():
        os.chown(path, pwd.getpwnam(socket_unit["SocketUser"]).pw_uid,
                 grp.getgrnam(socket_unit["SocketGroup"]).gr_gid)
    sock.listen(int(socket_unit.get("Backlog", "128")))
    return sock


def _exec_start(procs: Procs, site: Site, command: str, listener: socket.socket,
                notify: Notify, log: Path) -> subprocess.Popen:
    """ExecStart with the socket on fd 3 and LISTEN_PID set to the pid that execs it."""
    argv = shlex.split(command)
    env = child_env({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "fcgi-manager.socket",
                     "NOTIFY_SOCKET": str(notify.path)})
    fd = listener.fileno()
    return procs.spawn(["/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh",
                        *argv], log, env=env, pass_fds=(3,),
                       preexec_fn=lambda: os.dup2(fd, 3))


def test_socket_activation_notify_reload_stop(site: Site, procs: Procs, units: Dict) -> None:
    # The config example shows the bind to use with the .socket unit; the test sets it.
    assert '# bind = "systemd"' in site.example("flask_app/fcgi-manager.toml")
    override = site.test_overrides()
    override["listen"] = {"bind": "systemd"}
    config = site.render_toml("flask_app/fcgi-manager.toml", override=override)
    manager = Manager(site, procs, config)
    socket_unit = units["fcgi-manager.socket"]["Socket"]
    service = units["fcgi-manager.service"]["Service"]
    listener = _listen(site, socket_unit)
    notify = Notify(site.work / "notify.sock")
    path = socket_unit["ListenStream"]

    main = _exec_start(procs, site, service["ExecStart"], listener, notify,
                       site.log / "systemd-1.log")
    notify.wait("READY=1")
    assert manager.pid() == main.pid, "MAINPID is the process systemd started"
    check_app(lambda p: fcgi(f"unix:{path}", p), "")

    env = child_env({"MAINPID": str(main.pid)})
    reload = subprocess.run(shlex.split(service["ExecReload"]), env=env, capture_output=True,
                            text=True, timeout=120)
    assert reload.returncode == 0, reload
    notify.wait("RELOADING=1")
    notify.wait("READY=1")
    assert manager.status()["generation"] == 2 and manager.pid() == main.pid

    family = procs.family()
    assert stop_process(main, getattr(signal, service["KillSignal"]),
                        float(service["TimeoutStopSec"])) == 0
    notify.wait("STOPPING=1", 5)
    assert not procs.wait_gone(family, 10), "KillMode=mixed would SIGKILL what is left"
    assert os.path.exists(path), "the socket belongs to systemd: it stays for the next start"

    # systemd starts the service again on the same socket (Restart=, or the next
    # connection with socket activation); connections queued meanwhile are served.
    queued = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    queued.connect(path)
    queued.close()
    again = _exec_start(procs, site, service["ExecStart"], listener, notify,
                        site.log / "systemd-2.log")
    notify.wait("READY=1")
    check_app(lambda p: fcgi(f"unix:{path}", p), "")
    assert stop_process(again, signal.SIGTERM) == 0
    listener.close()
