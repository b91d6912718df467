"""``check`` runs the checks ``start`` runs and imports the app from where ``start`` will:
a directory start refuses fails check too; an app found only because of the shell's
current directory fails (start works in ``/``), and check says that was the reason; the
import hint tells a permission problem, or a ``.py`` in ``app.module``, from "not on the
path"."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from support import Manager, fcgi_manager, need_root

MakeManager = Callable[..., Manager]

APP = '''
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"found\\n"]
'''


def test_check_refuses_a_world_writable_socket_directory(make_manager: MakeManager,
                                                         tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # no sticky bit: anyone could swap the socket for a link
    m = make_manager("hello:app", count=1, bind=f"unix:{shared / 'fcgi.sock'}")
    check = m.cli("check")
    assert check.returncode == 1 and "healthy" not in check.stdout, check
    assert f"directory {shared} is writable by every user" in check.stderr, check
    start = m.start(check=False)
    assert start.returncode == 1, start
    assert f"directory {shared} is writable by every user" in start.stderr, start


def test_check_imports_from_starts_directory_not_the_shells(make_manager: MakeManager,
                                                            tmp_path: Path) -> None:
    here = tmp_path / "appdir"
    here.mkdir()
    (here / "shellonly.py").write_text(APP)
    m = make_manager("shellonly:app", count=1, tmp=tmp_path / "m", path=[])
    check = fcgi_manager(["-c", str(m.config), "check"], cwd=here)
    assert check.returncode == 1 and "healthy" not in check.stdout, check
    assert f"found in your shell's directory {here}" in check.stderr, check
    assert f'app.chdir = "{here}"' in check.stderr, check
    start = fcgi_manager(["-c", str(m.config), "start"], cwd=here, tracker=m.tracker)
    assert start.returncode == 1, start  # what check predicted

    m.update("app", chdir=str(here))
    check = fcgi_manager(["-c", str(m.config), "check"], cwd=tmp_path)
    assert check.returncode == 0, check
    assert f"import   ok (cwd {here}" in check.stdout, check


def test_a_module_named_with_py_gets_drop_the_py(make_manager: MakeManager) -> None:
    m = make_manager("hello.py:app", count=1)
    check = m.cli("check")
    assert check.returncode == 1, check
    assert "drop the .py" in check.stderr and 'module = "hello:app"' in check.stderr, check
    assert "is not on the path" not in check.stderr, check


def test_permission_denied_is_not_not_on_the_path(make_manager: MakeManager,
                                                  tmp_path: Path) -> None:
    """manager.user cannot enter the app's directory: say that, not "not on the path"."""
    need_root("running the app as another user needs root")
    root = Path(shutil.os.path.realpath("/tmp")) / f"fcgi-perm-{os.getpid()}"
    root.mkdir(mode=0o755)
    try:
        private = root / "private"
        private.mkdir(mode=0o700)  # root's: nobody cannot look in
        (private / "privapp.py").write_text(APP)
        m = make_manager("privapp:app", count=1, path=[str(private)],
                         manager={"user": "nobody", "group": "nogroup"
                                  if _has_group("nogroup") else "nobody"})
        check = m.cli("check")
        assert check.returncode == 1, check
        assert f"permission denied for user nobody on {private}" in check.stderr, check
        assert "is not on the path" not in check.stderr, check
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _has_group(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False

