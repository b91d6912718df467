"""systemd integration without systemd: socket activation (LISTEN_FDS) and sd_notify.

The test plays systemd's part: it binds the listening socket, passes it as fd 3 with
``LISTEN_FDS=1``/``LISTEN_PID`` set to the pid that will exec ``fcgi-manager start
--foreground``, and listens on a ``NOTIFY_SOCKET`` datagram socket for READY=1,
RELOADING=1 and STOPPING=1, as a ``Type=notify`` unit with a ``.socket`` unit would.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

from tests.support import APPS, fcgi_request, wait_for


def _spawn_activated(cfg: Path, listener: socket.socket, notify_path: str) -> int:
    """fork + exec fcgi-manager with the socket on fd 3, as systemd does."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.dup2(listener.fileno(), 3)
            os.set_inheritable(3, True)
            env = dict(os.environ)
            env.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), NOTIFY_SOCKET=notify_path,
                       PYTHONPATH=str(APPS) + os.pathsep + env.get("PYTHONPATH", ""))
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.execve(sys.executable, [sys.executable, "-m", "fcgi_manager", "-c", str(cfg),
                                       "start", "--foreground"], env)
        finally:
            os._exit(127)
    return pid


def _messages(sock: socket.socket, want: str, timeout: float) -> str:
    got = []

    def seen() -> bool:
        try:
            while True:
                got.append(sock.recv(4096).decode())
        except BlockingIOError:
            pass
        return any(want in m for m in got)

    wait_for(seen, timeout, f"sd_notify {want}")
    return "\n".join(got)


def test_socket_activation_and_notify(tmp_path: Path) -> None:
    sock_path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(64)
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.setblocking(False)
    cfg = tmp_path / "sd.toml"
    cfg.write_text(textwrap.dedent(f"""
        [app]
        module = "hello:app"
        [listen]
        bind = "systemd"
        [workers]
        count = 2
        [manager]
        log = "{tmp_path / 'sd.log'}"
    """))
    pid = _spawn_activated(cfg, listener, notify_path)
    try:
        text = _messages(notify, "READY=1", 30)
        assert f"MAINPID={pid}" in text
        reply = fcgi_request(f"unix:{sock_path}", "/")
        assert reply.status_code == 200, reply
        os.kill(pid, signal.SIGHUP)  # systemctl reload
        _messages(notify, "RELOADING=1", 30)
        _messages(notify, "READY=1", 30)
        reply = fcgi_request(f"unix:{sock_path}", "/")
        assert reply.status_code == 200, reply
        os.kill(pid, signal.SIGTERM)  # systemctl stop
        _messages(notify, "STOPPING=1", 30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
                pid = 0
                break
            time.sleep(0.02)
        assert pid == 0, "fcgi-manager did not exit after SIGTERM"
        # The socket belongs to systemd: stopping must not remove it.
        assert sock_path.exists()
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        listener.close()
        notify.close()


def test_systemd_bind_without_socket_says_what_to_do(tmp_path: Path) -> None:
    cfg = tmp_path / "sd.toml"
    cfg.write_text('[app]\nmodule = "hello:app"\n[listen]\nbind = "systemd"\n')
    env = dict(os.environ)
    env.pop("LISTEN_FDS", None)
    env["PYTHONPATH"] = str(APPS)
    import subprocess

    out = subprocess.run([sys.executable, "-m", "fcgi_manager", "-c", str(cfg), "start",
                          "--foreground"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1
    assert "LISTEN_FDS" in out.stderr and "socket" in out.stderr
    assert "Traceback" not in out.stderr
