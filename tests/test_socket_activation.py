"""Socket activation without a second edit: under ``LISTEN_FDS``, a passed socket that is
the address ``listen.bind`` names is used as if ``bind = "systemd"`` (the shipped .socket
unit and a config naming its path start together); any other passed socket is an error
that names ``bind = "systemd"``. Driven by ``systemd-socket-activate`` (systemd's own
launcher) and by a small launcher that passes fd 3 the way systemd does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, List

import pytest
from support import (
    Manager,
    ProcessTracker,
    _child_env,
    fcgi_manager,
    fcgi_request,
    require_program,
    wait_for,
)

MakeManager = Callable[..., Manager]

LAUNCHER = '''
import os, socket, sys
path, args = sys.argv[1], sys.argv[2:]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(path)
sock.listen(16)
if sock.fileno() != 3:
    os.dup2(sock.fileno(), 3)  # sd_listen_fds(3): the first passed socket is fd 3
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "fcgi_manager", *args])
'''


def activate_env() -> List[str]:
    """systemd-socket-activate passes on only the variables named with -E, as systemd
    passes only the unit's Environment=: the tests' PYTHONPATH and registry among them."""
    env = _child_env()
    return [f"-E{name}={value}" for name, value in sorted(env.items())
            if name.startswith(("PYTHON", "FCGI_MANAGER_")) or name in ("PATH", "HOME")]


@pytest.mark.needs("systemd-socket-activate")
def test_the_passed_socket_that_is_listen_bind_is_used(make_manager: MakeManager,
                                                       tmp_path: Path) -> None:
    activate = require_program("systemd-socket-activate")
    m = make_manager("hello:app", count=1)
    assert m.socket_path is not None
    tracker = ProcessTracker()
    log = open(tmp_path / "activate.log", "wb")
    proc = subprocess.Popen([activate, "-l", str(m.socket_path), *activate_env(), sys.executable,
                             "-m",
                             "fcgi_manager", "-c", str(m.config), "start", "--foreground"],
                            env=_child_env(), stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, cwd=str(tmp_path))
    tracker.add(proc.pid)
    try:
        wait_for(lambda: m.socket_path.exists(), 20, "systemd-socket-activate's socket")
        # The first connection makes systemd-socket-activate exec fcgi-manager.
        reply = fcgi_request(m.bind, "/", timeout=60)
        assert reply.status_code == 200, (reply, (tmp_path / "activate.log").read_text())
        status = m.status()
        assert status["pid"] == proc.pid, "fcgi-manager runs in the activated process"
        tracker.add_all(m.worker_pids(status))
        m.stop()
        assert proc.wait(20) == 0, (tmp_path / "activate.log").read_text()
        assert m.socket_path.exists(), "the socket is systemd's: it stays for the next start"
    finally:
        tracker.kill_all()
        log.close()


def test_another_passed_socket_names_bind_systemd(make_manager: MakeManager,
                                                  tmp_path: Path) -> None:
    m = make_manager("hello:app", count=1)
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    other = tmp_path / "other.sock"
    tracker = ProcessTracker()
    proc = subprocess.Popen([sys.executable, str(launcher), str(other), "-c", str(m.config),
                             "start", "--foreground"], env=_child_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=str(tmp_path))
    tracker.add(proc.pid)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        tracker.kill_all()
    text = err.decode()
    assert proc.returncode == 1, text
    assert 'bind = "systemd"' in text and str(other) in text, text
    assert m.socket_path is not None and not m.socket_path.exists()


def test_with_the_same_address_in_a_launcher(make_manager: MakeManager, tmp_path: Path) -> None:
    """The same without systemd-socket-activate: fd 3 is the configured path."""
    m = make_manager("hello:app", count=1)
    assert m.socket_path is not None
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    tracker = ProcessTracker()
    proc = subprocess.Popen([sys.executable, str(launcher), str(m.socket_path), "-c",
                             str(m.config), "start", "--foreground"], env=_child_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=str(tmp_path))
    tracker.add(proc.pid)
    try:
        wait_for(lambda: proc.poll() is not None or m.read_pidfile(), 30, "the master")
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert fcgi_request(m.bind, "/").status_code == 200
        tracker.add_all(m.worker_pids())
        stop = fcgi_manager(["-c", str(m.config), "stop"], cwd=tmp_path)
        assert stop.returncode == 0, stop
        assert proc.wait(20) == 0
    finally:
        tracker.kill_all()
    assert isinstance(socket.AF_UNIX, int) and os.path.exists(m.socket_path)
