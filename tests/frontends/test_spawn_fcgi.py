"""spawn-fcgi and libfcgi's cgi-fcgi (examples/spawn-fcgi.sh): spawn-fcgi creates the
socket and runs fcgi-manager (bind = "fd:0") or the guide's .fcgi file on it; cgi-fcgi
sends requests straight to the socket."""

from __future__ import annotations

import grp
import os
import pwd
import signal

import pytest

from .support import (
    Manager,
    Procs,
    Site,
    cgi_fcgi,
    check_app,
    check_where,
    free_port,
    is_root,
    read_toml,
    require_program,
    stop_process,
    unix_listening,
    wait_for,
    web_user,
)


def _script(site: Site, name: str, replace: list) -> str:
    if not is_root():  # -U/-G need root; the socket stays ours
        replace = [*replace, (" -U www-data -G www-data", "")]
    return str(site.render("spawn-fcgi.sh", site.etc / name, replace, mode=0o755))


def _get(sock: str, script_name: str):
    return lambda path: cgi_fcgi(sock, path, script_name=script_name)


@pytest.mark.needs("spawn-fcgi", "cgi-fcgi")
def test_spawn_fcgi_runs_fcgi_manager_on_fd0(site: Site, procs: Procs) -> None:
    require_program("spawn-fcgi")
    config = site.render_toml("flask_app/fcgi-manager-fd0.toml",
                              override=site.test_overrides())
    sock = str(site.run / "fcgi.sock")
    script = _script(site, "spawn-fcgi.sh", [])
    proc = procs.spawn(["sh", script], site.log / "spawn-fcgi.log")
    pidfile = read_toml(config)["manager"]["pidfile"]
    wait_for(lambda: proc.poll() is None and os.path.exists(pidfile) and unix_listening(sock),
             30, "fcgi-manager under spawn-fcgi")
    st = os.stat(sock)
    assert st.st_mode & 0o777 == 0o660, oct(st.st_mode)
    if is_root():  # -U/-G: the web server's user owns it
        assert (st.st_uid, st.st_gid) == (pwd.getpwnam(web_user()[0]).pw_uid,
                                          grp.getgrnam(web_user()[1]).gr_gid), st
    # -n and exec: the process spawn-fcgi started is fcgi-manager's master itself
    assert int(open(pidfile).read()) == proc.pid
    check_app(_get(sock, "/yourapplication"), "/yourapplication")
    check_app(_get(sock, ""), "")
    echo = cgi_fcgi(sock, "/echo", method="POST", body=b"spawned" * 1000)
    assert (echo.status, echo.body) == (200, b"spawned" * 1000), echo
    manager = Manager(site, procs, config)
    status = manager.status()
    assert status["listen"]["bind"] == "fd:0" and len(status["workers"]) == 2
    family = procs.family()
    assert stop_process(proc, signal.SIGTERM) == 0
    assert not procs.wait_gone(family, 10), "workers left after the master stopped"


@pytest.mark.needs("spawn-fcgi", "cgi-fcgi")
def test_spawn_fcgi_runs_the_fcgi_file(site: Site, procs: Procs) -> None:
    """The guide's yourapplication.fcgi (WSGIServer(app).run()) under spawn-fcgi, forked
    into the background with a pidfile."""
    require_program("spawn-fcgi")
    sock = str(site.run / "fcgi-file.sock")
    pidfile = site.run / "spawn-fcgi.pid"
    script = _script(site, "spawn-fcgi-file.sh", [
        ("exec spawn-fcgi -n -s /run/yourapplication/fcgi.sock",
         f"exec spawn-fcgi -P {pidfile} -s {sock}"),
        ("/usr/local/bin/fcgi-manager -c /etc/yourapplication/fcgi-manager-fd0.toml "
         "start --foreground", "/var/www/yourapplication/yourapplication.fcgi")])
    launcher = procs.spawn(["sh", script], site.log / "spawn-fcgi-file.log")
    assert launcher.wait(30) == 0, (site.log / "spawn-fcgi-file.log").read_text()
    pid = wait_for(lambda: int(pidfile.read_text()), 10, "spawn-fcgi's pidfile")
    procs.add(pid)
    wait_for(lambda: unix_listening(sock), 30, "the .fcgi on the socket")
    check_where(cgi_fcgi(sock, "/yourapplication/where", script_name="/yourapplication"),
                "/yourapplication")
    check_app(_get(sock, ""), "")
    family = procs.family()
    assert len([p for p in family if p != pid]) >= 1, "the .fcgi runs workers"
    os.kill(pid, signal.SIGTERM)
    assert not procs.wait_gone(family, 30), "left running after SIGTERM"


@pytest.mark.needs("cgi-fcgi")
def test_cgi_fcgi_to_a_tcp_socket(site: Site, procs: Procs) -> None:
    """cgi-fcgi to fcgi-manager on TCP (examples/flask_app/fcgi-manager.toml, 127.0.0.1)."""
    port = free_port()
    override = site.test_overrides()
    override["manager"].update(pidfile=str(site.run / "tcp.pid"), log=str(site.log / "tcp.log"))
    config = site.render_toml(
        "flask_app/fcgi-manager.toml", site.etc / "tcp.toml",
        replace=[('bind = "unix:/run/yourapplication/fcgi.sock"', f'bind = "127.0.0.1:{port}"'),
                 ('# allowed_clients = ["127.0.0.1"]', 'allowed_clients = ["127.0.0.1"]')],
        override=override)
    Manager(site, procs, config).start()
    check_app(_get(f"127.0.0.1:{port}", "/yourapplication"), "/yourapplication")
    ping = cgi_fcgi(f"127.0.0.1:{port}", "/fcgi-ping")
    assert (ping.status, ping.body.strip()) == (200, b"pong"), ping
