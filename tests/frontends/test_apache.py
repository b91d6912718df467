"""Apache httpd in front of fcgi-manager (examples/apache/): mod_proxy_fcgi to the socket
fcgi-manager creates (the app under a sub-path), and mod_fcgid starting the guide's
yourapplication.fcgi itself with the guide's .htaccess (the app at the root)."""

from __future__ import annotations

import shutil

import psutil
import pytest

from .support import (
    EXAMPLES,
    Apache,
    Manager,
    Procs,
    Site,
    check_app,
    http_request,
    python_for,
    web_user,
)

pytestmark = pytest.mark.needs("apache2")


@pytest.fixture(scope="module")
def backend(site: Site, procs: Procs) -> Manager:
    # mod_proxy_fcgi sends the whole path as SCRIPT_NAME: the config says where the app is.
    config = site.render_toml(
        "flask_app/fcgi-manager.toml",
        replace=[('# script_name = "/yourapplication"', 'script_name = "/yourapplication"')],
        override=site.test_overrides())
    return Manager(site, procs, config).start()


def test_proxy_fcgi_subpath(site: Site, procs: Procs, backend: Manager) -> None:
    server = Apache(site, procs, "apache/proxy_fcgi.conf", ["proxy", "proxy_fcgi"],
                    name="apache-proxy-fcgi").start()

    def get(path: str):
        return http_request(server.port, path)

    check_app(get, "/yourapplication")
    bare = get("/yourapplication")  # the app redirects to its index
    assert bare.status in (301, 308), bare
    assert bare.headers["location"].endswith("/yourapplication/"), bare
    echo = http_request(server.port, "/yourapplication/echo", "POST", body=b"z" * 200000,
                        headers={"Content-Type": "application/octet-stream"})
    assert (echo.status, echo.body) == (200, b"z" * 200000), echo


def test_fcgid_htaccess_root(site: Site, procs: Procs) -> None:
    """Apache (as www-data when we are root) runs the Apache flavour of the .fcgi file;
    the .htaccess RewriteRule sends everything to it; the app is at the root."""
    user = web_user()[0]
    interpreter, env = python_for(user, site.work)
    fcgi = site.render("apache/yourapplication.fcgi", site.app / "yourapplication.fcgi",
                       [("#!/usr/bin/env python3", f"#!{interpreter}")], mode=0o755)
    shutil.copy(EXAMPLES / "apache" / ".htaccess", site.app / ".htaccess")
    (site.app / ".htaccess").chmod(0o644)
    fcgid_dir = site.work / "fcgid"
    extra = "\n".join([f"FcgidIPCDir {fcgid_dir}",
                       f"FcgidProcessTableFile {fcgid_dir}.shm",
                       *(f"FcgidInitialEnv {k} {v}" for k, v in env.items())])
    server = Apache(site, procs, "apache/fcgid.conf",
                    ["mime", "rewrite", "fcgid"], extra=extra, name="apache-fcgid").start()

    def get(path: str):
        return http_request(server.port, path)

    check_app(get, "")
    # The RewriteRule leaves existing files alone, and the config denies the code.
    assert get("/yourapplication.py").status == 403
    assert get("/fcgi-manager.toml").status == 403
    assert server.proc is not None
    masters = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
               if str(fcgi) in " ".join(p.cmdline()) and p.parent() is not None
               and str(fcgi) not in " ".join(p.parent().cmdline())]
    assert masters, "mod_fcgid started yourapplication.fcgi"
    assert all(m.username() == user for m in masters)
