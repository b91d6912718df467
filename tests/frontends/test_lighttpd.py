"""lighttpd in front of fcgi-manager (examples/lighttpd/): mod_fastcgi with "socket" (the
app under a sub-path, on the socket fcgi-manager creates) and with "bin-path" (lighttpd
starts the guide's yourapplication.fcgi itself and passes it the socket on fd 0)."""

from __future__ import annotations

import psutil
import pytest

from .support import (
    Lighttpd,
    Manager,
    Procs,
    Site,
    check_app,
    http_request,
    pid_alive,
    wait_for,
)

pytestmark = pytest.mark.needs("lighttpd")


@pytest.fixture(scope="module")
def backend(site: Site, procs: Procs) -> Manager:
    config = site.render_toml("flask_app/fcgi-manager.toml", override=site.test_overrides())
    return Manager(site, procs, config).start()


def test_socket_subpath(site: Site, procs: Procs, backend: Manager) -> None:
    server = Lighttpd(site, procs, "lighttpd/socket.conf", name="lighttpd-socket").start()

    def get(path: str):
        return http_request(server.port, path)

    check_app(get, "/yourapplication")
    bare = get("/yourapplication")
    assert bare.status == 301 and bare.headers["location"].endswith("/yourapplication/"), bare
    echo = http_request(server.port, "/yourapplication/echo", "POST", body=b"y" * 300000,
                        headers={"Content-Type": "application/octet-stream"})
    assert (echo.status, echo.body) == (200, b"y" * 300000), echo


def test_bin_path_root(site: Site, procs: Procs) -> None:
    """lighttpd spawns yourapplication.fcgi (WSGIServer(app).run(), socket on fd 0) and
    stops it with lighttpd; the app is at the root (fix-root-scriptname)."""
    server = Lighttpd(site, procs, "lighttpd/bin-path.conf", name="lighttpd-bin-path").start()
    check_app(lambda path: http_request(server.port, path), "")
    assert server.proc is not None
    family = procs.family()
    spawned = [p for p in psutil.Process(server.proc.pid).children()
               if "yourapplication.fcgi" in " ".join(p.cmdline())]
    assert len(spawned) == 1, spawned  # max-procs 1: one master
    master = spawned[0]
    workers = master.children()
    assert len(workers) >= 1, "the .fcgi is fcgi-manager's master, with its workers"
    # Stopping lighttpd stops the app: no process of it is left behind.
    server.stop()
    left = procs.wait_gone({pid: t for pid, t in family.items()
                            if pid in {master.pid, *(w.pid for w in workers)}}, 30)
    assert not left, f"left running after lighttpd stopped: {left}"
    assert not pid_alive(master.pid)
    wait_for(lambda: server.proc.poll() is not None, 10, "lighttpd to exit")


def test_bin_path_root_with_fix_root_url(site: Site, procs: Procs) -> None:
    """Without lighttpd's fix-root-scriptname, lighttpd splits the path at its first
    segment (/hello/x: SCRIPT_NAME=/hello, PATH_INFO=/x); WSGIServer(app, fix_root_url=True)
    puts it back together, as the guide's LighttpdCGIRootFix did."""
    site.render("flask_app/yourapplication.fcgi", site.app / "yourapplication-fixroot.fcgi",
                [("WSGIServer(app).run()", "WSGIServer(app, fix_root_url=True).run()")],
                mode=0o755)
    server = Lighttpd(site, procs, "lighttpd/bin-path.conf", [
        ('        "fix-root-scriptname" => "enable",\n', ""),
        ("/var/www/yourapplication/yourapplication.fcgi",
         "/var/www/yourapplication/yourapplication-fixroot.fcgi"),
        ("yourapplication-fcgi.sock", "yourapplication-fixroot.sock"),
    ], name="lighttpd-fix-root-url").start()
    check_app(lambda path: http_request(server.port, path), "")
    server.stop()
