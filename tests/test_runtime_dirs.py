"""Runtime directories that survive a reboot: ``start`` creates the missing last directory
of its pidfile, control socket and unix socket (``/run/NAME``, emptied at boot) when the
parent is safe, owned by the user that writes in it, 0755 or 0750 with the socket's group;
never in a parent others can write to, never through someone else's link. ``check`` says
what ``start`` will do and refuses what ``start`` refuses."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path
from typing import Any, Callable, Dict

from support import Manager, fcgi_request, need_root

MakeManager = Callable[..., Manager]


def _in_run_dir(tmp_path: Path, **listen: Any) -> Dict[str, Dict[str, Any]]:
    run = tmp_path / "run" / "app"
    return {
        "bind": f"unix:{run / 'fcgi.sock'}",
        "listen": {"bind": f"unix:{run / 'fcgi.sock'}", **listen},
        "manager": {"pidfile": str(run / "app.pid"), "control": str(run / "app.ctl"),
                    "log": str(tmp_path / "app.log")},
    }


def _make(make_manager: MakeManager, tmp_path: Path, **listen: Any) -> Manager:
    (tmp_path / "run").mkdir(mode=0o755)
    sections = _in_run_dir(tmp_path, **listen)
    bind = sections.pop("bind")
    return make_manager("hello:app", bind=bind, **sections)


def test_start_creates_the_missing_runtime_directory(make_manager: MakeManager,
                                                     tmp_path: Path) -> None:
    m = _make(make_manager, tmp_path)
    run = tmp_path / "run" / "app"
    assert not run.exists()
    r = m.cli("check")
    assert r.returncode == 0, r
    assert f"{run} (mode 0755" in r.stdout and "start creates it" in r.stdout, r
    assert not run.exists(), "check changes nothing"

    m.start()
    st = os.lstat(run)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755, oct(st.st_mode)
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    assert fcgi_request(m.bind, "/").status_code == 200
    m.stop()

    # The reboot: /run is emptied; the next start needs nobody to recreate the directory.
    for entry in run.iterdir():
        entry.unlink()
    run.rmdir()
    m.start()
    assert fcgi_request(m.bind, "/").status_code == 200
    m.stop()


def test_with_a_socket_group_the_directory_is_0750_with_that_group(
        make_manager: MakeManager, tmp_path: Path) -> None:
    group = "www-data" if os.geteuid() == 0 and _group_exists("www-data") else \
        grp.getgrgid(os.getegid()).gr_name
    m = _make(make_manager, tmp_path, group=group)
    m.start()
    st = os.lstat(tmp_path / "run" / "app")
    assert stat.S_IMODE(st.st_mode) == 0o750, oct(st.st_mode)
    assert st.st_gid == grp.getgrnam(group).gr_gid
    assert st.st_uid == os.geteuid()
    m.stop()


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def test_not_created_in_a_parent_others_can_write(make_manager: MakeManager,
                                                   tmp_path: Path) -> None:
    m = _make(make_manager, tmp_path)
    parent = tmp_path / "run"
    os.chmod(parent, 0o777)  # anyone could have prepared run/app: no sticky bit
    for command in ("check", "start"):
        r = m.cli(command)
        assert r.returncode == 1, r
        assert str(parent) in r.stderr and "writable by every user" in r.stderr, r
    assert not (parent / "app").exists()


def test_never_through_another_users_link(make_manager: MakeManager, tmp_path: Path) -> None:
    """``run`` is a symbolic link another user made: nothing is created through it."""
    need_root("making a link owned by another user needs root")
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    m = make_manager("hello:app", bind=f"unix:{tmp_path / 'run' / 'app' / 'fcgi.sock'}",
                     manager={"pidfile": str(tmp_path / "run" / "app" / "app.pid"),
                              "control": str(tmp_path / "run" / "app" / "app.ctl"),
                              "log": str(tmp_path / "app.log")})
    os.symlink(target, tmp_path / "run")
    nobody = pwd.getpwnam("nobody")
    os.lchown(tmp_path / "run", nobody.pw_uid, nobody.pw_gid)
    r = m.start(check=False)
    assert r.returncode == 1, r
    assert "symbolic link" in r.stderr, r
    assert not (target / "app").exists()
