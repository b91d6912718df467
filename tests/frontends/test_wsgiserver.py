"""The guide's yourapplication.fcgi (``from fcgi_manager import WSGIServer``) run by hand:
without a socket on fd 0 it says what it expects and exits non-zero at once; with
``bindAddress`` it serves its own unix socket until SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from .support import (
    Procs,
    Site,
    cgi_fcgi,
    check_app,
    child_env,
    stop_process,
    unix_listening,
    wait_for,
)


@pytest.mark.parametrize("stdin", ["devnull", "pipe", "connected socket"])
def test_run_by_hand_without_a_socket_exits_with_a_message(site: Site, stdin: str) -> None:
    fcgi = site.app / "yourapplication.fcgi"
    kinds = {"devnull": subprocess.DEVNULL, "pipe": subprocess.PIPE}
    pair = None
    if stdin == "connected socket":
        pair = socket.socketpair()
        kinds[stdin] = pair[0].fileno()
    started = time.monotonic()
    try:
        r = subprocess.run([sys.executable, str(fcgi)], stdin=kinds[stdin], cwd=str(site.app),
                           capture_output=True, text=True, timeout=30, env=child_env())
    finally:
        if pair:
            for s in pair:
                s.close()
    assert time.monotonic() - started < 15
    assert r.returncode != 0, r
    assert "expects a listening FastCGI socket on stdin (fd 0)" in r.stderr, r.stderr
    assert "bindAddress" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.needs("cgi-fcgi")
def test_bind_address_serves_its_own_socket(site: Site, procs: Procs) -> None:
    sock = site.run / "fcgi.sock"
    fcgi = site.render(
        "flask_app/yourapplication.fcgi", site.app / "yourapplication-bind.fcgi",
        [("    WSGIServer(app).run()\n", ""),
         ("    # WSGIServer(app, bindAddress=", "    WSGIServer(app, bindAddress=")],
        mode=0o755)
    proc = procs.spawn([sys.executable, str(fcgi)], site.log / "bind.log", cwd=site.app)
    wait_for(lambda: proc.poll() is None and unix_listening(sock), 30,
             lambda: f"{fcgi.name} on {sock}\n{(site.log / 'bind.log').read_text()}")
    check_app(lambda path: cgi_fcgi(str(sock), path, script_name="/yourapplication"),
              "/yourapplication")
    family = procs.family()
    assert len(family) >= 2, "a master and its workers"
    assert stop_process(proc, signal.SIGTERM) == 0
    assert not procs.wait_gone(family, 10)
    assert not os.path.exists(sock), "the socket file is removed on exit"
