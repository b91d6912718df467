"""The README's quick start, run as written: its app, its config, its commands one by one,
and its nginx ``server`` block in front, once as root and once as a normal user.

Only what the README tells the reader to adapt is substituted: the directory
(``/srv/yourapplication``) and nginx's ``listen 80``. Everything else (``mkdir -p run``,
the relative socket path, the socket's mode, the status page's ``allow``/``deny``) runs
verbatim, so the quick start cannot drift from what works.
"""

from __future__ import annotations

import http.client
import json
import os
import pwd
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from .support import (
    ROOT,
    Nginx,
    Procs,
    Site,
    child_env,
    fcgi_manager_program,
    free_port,
    http_request,
    is_root,
    python_for,
    require,
    tail,
    wait_for,
)

pytestmark = pytest.mark.needs("nginx")

README = ROOT / "README.md"
APP_DIR = "/srv/yourapplication"


def quick_start() -> Dict[str, str]:
    """The fenced blocks of the README's "Quick start with a config file", by language (up
    to the sentence that says this test runs them)."""
    text = README.read_text()
    section = text.split("## Quick start with a config file", 1)[1].split("\n## ", 1)[0]
    assert "test_readme_quickstart.py` runs these blocks" in section
    section = section.split("test_readme_quickstart.py` runs these blocks", 1)[0]
    blocks: Dict[str, str] = {}
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, re.DOTALL):
        assert lang not in blocks, f"two {lang} blocks in the quick start: which one runs?"
        blocks[lang] = body
    assert set(blocks) == {"python", "toml", "sh", "nginx"}, sorted(blocks)
    return blocks


def commands(sh: str) -> List[str]:
    """The shell block's commands, comments stripped."""
    out = []
    for line in sh.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(" ".join(shlex.quote(w) for w in words))
    return out


class Reader:
    """Who runs the quick start: root, or a normal user (``nobody`` when we are root)."""

    def __init__(self, as_root: bool, home: Path, site: Site) -> None:
        self.as_root = as_root
        self.bin = home / "bin"
        self.bin.mkdir(parents=True)
        os.chmod(self.bin, 0o755)
        self.user: Optional[pwd.struct_passwd] = None
        env = {"PYTHONPATH": str(ROOT), "HOME": str(home)}
        program = fcgi_manager_program()
        if not as_root and is_root():
            self.user = pwd.getpwnam("nobody")
            python, extra = python_for("nobody", site.work)
            env.update(extra)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), extra.get("PYTHONPATH"))
                                                if p)
            # A command `nobody` can run: the console script's Python is not readable.
            shim = self.bin / "fcgi-manager"
            shim.write_text(f'#!/bin/sh\nexec {python} -m fcgi_manager "$@"\n')
            os.chmod(shim, 0o755)
        else:
            os.symlink(program, self.bin / "fcgi-manager")
        env["PATH"] = f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        self.env = child_env(env)
        if self.user is not None:  # its own registry, where it would be without the tests
            self.env.pop("FCGI_MANAGER_REGISTRY", None)

    def run(self, command: str, cwd: Path) -> subprocess.CompletedProcess:
        kwargs: Dict[str, object] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid,
                      "extra_groups": []}
        return subprocess.run(["/bin/sh", "-c", command], cwd=str(cwd), env=self.env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=120, **kwargs)


def get_from(port: int, path: str, source: str) -> Tuple[int, bytes]:
    """GET through nginx from a chosen loopback address (127.0.0.2 is not 127.0.0.1)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15,
                                      source_address=(source, 0))
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("as_root", [True, False], ids=["as root", "as a normal user"])
def test_the_quick_start_works_as_written(site: Site, procs: Procs, as_root: bool) -> None:
    require(is_root() or not as_root, "running the quick start as root needs root")
    blocks = quick_start()
    variant = "root" if as_root else "user"
    home = site.root / variant
    home.mkdir()
    os.chmod(home, 0o755)
    app_dir = Path(str(home) + APP_DIR)
    app_dir.mkdir(parents=True)
    for d in (app_dir, *app_dir.parents):
        if d == home:
            break
        os.chmod(d, 0o755)
    (app_dir / "yourapplication.py").write_text(blocks["python"])
    (app_dir / "app.toml").write_text(blocks["toml"])
    reader = Reader(as_root, home, site)
    if reader.user is not None:
        for path in (app_dir, app_dir / "yourapplication.py", app_dir / "app.toml"):
            os.chown(path, reader.user.pw_uid, reader.user.pw_gid)

    nginx = Nginx(site, procs, name=f"nginx-{variant}")
    port = free_port()
    server = blocks["nginx"].replace("listen 80;", f"listen 127.0.0.1:{port};")
    assert server.count(APP_DIR) == 2, "the nginx block names the app directory"
    server = server.replace(APP_DIR, str(app_dir))
    conf = nginx.dir / "yourapplication.conf"
    conf.write_text(server)
    nginx.includes.append(conf)
    nginx.ports["yourapplication.conf"] = port

    cwd = home
    started = False
    for command in commands(blocks["sh"]):
        if command.startswith("cd "):
            target = command[3:].strip()
            assert target == APP_DIR, command
            cwd = app_dir
            continue
        if command.endswith(" stop"):
            served(nginx, port, procs, started)
        result = reader.run(command, cwd)
        log = tail(app_dir / "app.fcgi-manager.log")
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}\n{log}"
        if command.endswith(" check"):
            assert "healthy" in result.stdout, result.stdout
            assert "Hello from yourapplication" in result.stdout
        if command.endswith(" start"):
            started = True
            pid = int((app_dir / "app.fcgi-manager.pid").read_text().split()[0])
            procs.add(pid)
            if reader.user is not None:
                assert os.stat(f"/proc/{pid}").st_uid == reader.user.pw_uid
                seen_by_root(pid, reader)
        if command.endswith(" status"):
            assert "master pid" in result.stdout
    assert started, "the quick start starts fcgi-manager"
    assert not (app_dir / "app.fcgi-manager.pid").exists(), "stop removed the pidfile"
    assert not (app_dir / "run" / "fcgi.sock").exists(), "stop removed the socket"


def seen_by_root(pid: int, reader: Reader) -> None:
    """A normal user's master is in its own registry, and root's `status --all` (which
    reads every user's) lists it too."""
    mine = reader.run("fcgi-manager status --all --json", Path("/"))
    assert mine.returncode == 0 and pid in {r["pid"] for r in json.loads(mine.stdout)}, mine
    env = {k: v for k, v in reader.env.items() if k != "FCGI_MANAGER_REGISTRY"}
    root = subprocess.run([sys.executable, "-m", "fcgi_manager", "status", "--all", "--json"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert root.returncode == 0, root
    rows = {r["pid"]: r for r in json.loads(root.stdout)}
    assert pid in rows and rows[pid]["answering"], root.stdout


def served(nginx: Nginx, port: int, procs: Procs, started: bool) -> None:
    """Before the quick start's `stop`: nginx in front answers, and the status page is
    shown to 127.0.0.1 only."""
    assert started, "the commands stop before they start"
    nginx.start()
    reply = http_request(port, "/")
    assert reply.status == 200, f"{reply}\n{nginx.logs()}"
    assert reply.text == "Hello from yourapplication\n"
    status, body = get_from(port, "/fcgi-status?json", "127.0.0.1")
    assert status == 200 and b'"generation": 2' in body.replace(b'":2', b'": 2'), body
    status, _ = get_from(port, "/fcgi-status", "127.0.0.2")
    assert status == 403, "the status page is for 127.0.0.1 only"
    nginx.stop()
    wait_for(lambda: nginx.proc is not None and nginx.proc.poll() is not None, 20,
             "nginx to stop")
