"""The web server can connect by default, or we say why: ``check`` and ``start`` name each
web-server user that cannot connect to the unix socket, with the fix; ``run`` takes
``--chmod-socket``, ``--chown-socket`` and ``--umask``; ``WSGIServer(umask=N)`` makes the
socket ``0777 & ~N``, as flup does."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
from support import (
    APPS,
    Manager,
    ProcessTracker,
    _child_env,
    fcgi_manager,
    fcgi_request,
    skip_or_fail,
    wait_for,
)

MakeManager = Callable[..., Manager]


def _www_data() -> None:
    try:
        pwd.getpwnam("www-data")
    except KeyError:
        skip_or_fail("no www-data user on this machine")
    if os.geteuid() != 0:
        skip_or_fail("as a plain user the socket is the user's own; root's socket is the case")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the web server's user can enter (pytest's own are private, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="fcgi-webusers-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_check_and_start_name_the_web_server_user(make_manager: MakeManager,
                                                   open_dir: Path) -> None:
    _www_data()
    m = make_manager("hello:app", count=1, tmp=open_dir / "app", listen={"mode": "0660"})
    os.chmod(m.tmp, 0o755)
    check = m.cli("check")
    assert check.returncode == 0, check  # a warning: the app itself is healthy
    line = next((x for x in check.stdout.splitlines() if "cannot connect" in x), "")
    assert "www-data" in line and str(m.socket_path) in line, check
    assert 'listen.group = "www-data"' in line and "--chmod-socket 666" in line, check
    start = m.start()
    assert "www-data" in start.stdout and "cannot connect" in start.stdout, start
    m.stop()

    m.update("listen", group="www-data")
    check = m.cli("check")
    assert check.returncode == 0 and "cannot connect" not in check.stdout, check


def test_check_names_a_directory_the_web_server_cannot_enter(make_manager: MakeManager,
                                                             open_dir: Path) -> None:
    _www_data()
    private = open_dir / "private"
    private.mkdir(mode=0o700)
    m = make_manager("hello:app", count=1, tmp=private, listen={"mode": "0666"})
    check = m.cli("check")
    assert check.returncode == 0, check
    assert f"chmod o+x {private}" in check.stdout and "www-data" in check.stdout, check


def _run(args: List[str], tmp_path: Path, sock: Path, tracker: ProcessTracker) -> os.stat_result:
    proc = subprocess.Popen([sys.executable, "-m", "fcgi_manager", "run", "hello:app",
                             "--bind", f"unix:{sock}", "-w", "1", "--pidfile",
                             str(tmp_path / "run.pid"), *args], env=_child_env(
                                 {"PYTHONPATH": f"{APPS}:{_child_env()['PYTHONPATH']}"}),
                            cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tracker.add(proc.pid)
    try:
        wait_for(lambda: proc.poll() is not None or (tmp_path / "run.pid").exists(), 30,
                 "the run master")
        assert proc.poll() is None, proc.communicate()[1].decode()
        st = os.stat(sock)
        stop = fcgi_manager(["stop", "--pidfile", str(tmp_path / "run.pid")], cwd=tmp_path)
        assert stop.returncode == 0, stop
        assert proc.wait(20) == 0
        return st
    finally:
        tracker.kill_all()


def test_run_takes_the_socket_mode_and_group(tmp_path: Path) -> None:
    tracker = ProcessTracker()
    sock = tmp_path / "app.sock"
    st = _run(["--chmod-socket", "666"], tmp_path, sock, tracker)
    assert stat.S_IMODE(st.st_mode) == 0o666
    group = grp.getgrgid(os.getegid()).gr_name
    st = _run(["--chown-socket", f":{group}", "--chmod-socket", "0660"], tmp_path, sock, tracker)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getegid()
    st = _run(["--umask", "007"], tmp_path, sock, tracker)
    assert stat.S_IMODE(st.st_mode) == 0o770


SCRIPT = '''
import sys
sys.path.insert(0, {apps!r})
from fcgi_manager import WSGIServer
from hello import app

if __name__ == "__main__":
    WSGIServer(app, bindAddress={sock!r}, umask={umask}, count=1).run()
'''


@pytest.mark.parametrize("umask, mode", [(0, 0o777), (0o022, 0o755), (0o007, 0o770)])
def test_wsgiserver_umask_makes_the_socket_mode(tmp_path: Path, umask: int, mode: int) -> None:
    sock = tmp_path / "wsgi.sock"
    script = tmp_path / "app.fcgi"
    script.write_text(SCRIPT.format(apps=str(APPS), sock=str(sock), umask=oct(umask)))
    tracker = ProcessTracker()
    proc = subprocess.Popen([sys.executable, str(script)], cwd=str(tmp_path), env=_child_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    tracker.add(proc.pid)
    try:
        wait_for(lambda: proc.poll() is not None or sock.exists(), 30, "the WSGIServer socket")
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert stat.S_IMODE(os.stat(sock).st_mode) == mode
        assert fcgi_request(f"unix:{sock}", "/").status_code == 200  # ready: TERM is a stop
        os.kill(proc.pid, 15)
        assert proc.wait(20) == 0
    finally:
        tracker.kill_all()
