"""Runtime directories: create the missing last directory of the pidfile, the control
socket and a unix listening socket, as systemd's ``RuntimeDirectory=`` does.

Why: ``/run`` is a tmpfs emptied at every boot, so ``/run/yourapplication`` is gone when
an init script or Supervisor starts the master after a reboot. Only the last component is
created, and only when its parent is safe -- a real directory (or a link root made, like
``/var/run``), owned by root or by the running user, and not writable by others -- so
nobody else can have prepared the place. The new directory belongs to the user that
writes in it (the master: the running user), mode 0755; where the unix socket lives and
``listen.group`` is set, 0750 with that group, so the web server can reach the socket and
no one else can list the directory. It is made with ``mkdir`` relative to the parent's
open descriptor and its owner and mode are set on its own descriptor, never by path.
"""

from __future__ import annotations

import grp
import os
import stat
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .config import Config
from .errors import FcgiManagerError
from .sockets import parse_address


@dataclass(frozen=True)
class RuntimeDir:
    """A directory the master needs that does not exist yet."""

    path: str
    what: str  # the setting(s) that need it, for messages
    uid: int
    gid: int
    mode: int

    def describe(self) -> str:
        try:
            group = grp.getgrgid(self.gid).gr_name
        except KeyError:
            group = str(self.gid)
        return f"{self.path} (mode {self.mode:04o}, group {group})"


def _socket_gid(group: str) -> Optional[int]:
    if not group:
        return None
    try:
        return grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
    except KeyError:
        return None  # the bind reports the unknown group


def missing(cfg: Config) -> List[RuntimeDir]:
    """The directories of the pidfile, control socket and unix socket that are missing."""
    needs: Dict[str, List[str]] = {}
    socket_dir = ""
    paths = [("manager.pidfile", cfg.manager.pidfile), ("manager.control", cfg.manager.control)]
    address = parse_address(cfg.listen.bind)
    if address.kind == "unix":
        paths.append(("listen.bind", address.path))
        socket_dir = os.path.dirname(os.path.abspath(address.path))
    for what, path in paths:
        if not path:
            continue
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.lexists(directory):
            needs.setdefault(directory, []).append(what)
    out = []
    gid = _socket_gid(cfg.listen.group)
    for directory, whats in needs.items():
        if directory == socket_dir and gid is not None:
            out.append(RuntimeDir(directory, ", ".join(whats), os.geteuid(), gid, 0o750))
        else:
            out.append(RuntimeDir(directory, ", ".join(whats), os.geteuid(), os.getegid(),
                                  0o755))
    return out


def unsafe_parent(directory: str) -> Optional[str]:
    """Why the parent of ``directory`` is no place to create it in; None when it is."""
    parent = os.path.dirname(directory) or "/"
    try:
        lst = os.lstat(parent)
        st = os.stat(parent)
    except FileNotFoundError:
        return f"its parent {parent} does not exist either"
    except OSError as exc:
        return f"its parent {parent} cannot be inspected: {exc.strerror}"
    trusted = (0, os.geteuid())
    if stat.S_ISLNK(lst.st_mode) and lst.st_uid not in trusted:
        return f"its parent {parent} is a symbolic link made by uid {lst.st_uid}"
    if not stat.S_ISDIR(st.st_mode):
        return f"its parent {parent} is not a directory"
    if st.st_uid not in trusted:
        return f"its parent {parent} belongs to uid {st.st_uid}"
    if st.st_mode & stat.S_IWOTH:
        return f"its parent {parent} is writable by every user"
    return None


def create(rd: RuntimeDir) -> None:
    """Make ``rd`` (the last component only), owner and mode set on its descriptor."""
    reason = unsafe_parent(rd.path)
    if reason:
        raise FcgiManagerError(
            f"{rd.what}: directory {rd.path} does not exist, and fcgi-manager does not "
            f"create it: {reason}",
            f"create it yourself (mkdir -m {rd.mode:04o} {rd.path}), owned by root or by "
            "the user fcgi-manager runs as")
    parent = os.path.dirname(rd.path) or "/"
    name = os.path.basename(rd.path)
    pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            return  # made meanwhile (another instance): the usual checks judge it
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=pfd)
        try:
            os.fchown(fd, rd.uid, rd.gid)
            os.fchmod(fd, rd.mode)
        finally:
            os.close(fd)
    except OSError as exc:
        raise FcgiManagerError(f"{rd.what}: cannot create the directory {rd.path}: "
                               f"{exc.strerror}") from None
    finally:
        os.close(pfd)


def create_missing(cfg: Config) -> List[RuntimeDir]:
    """Create every missing runtime directory; the ones made."""
    made = missing(cfg)
    for rd in made:
        create(rd)
    return made


def managed_paths(cfg: Config, log_path: str) -> List[Tuple[str, str]]:
    """(setting, path) of every file the master creates, for the directory checks."""
    paths = [("manager.pidfile", cfg.manager.pidfile), ("manager.control", cfg.manager.control)]
    if log_path not in ("", "-"):
        paths.append(("manager.log", log_path))
    if cfg.manager.access_log not in ("", "-"):
        paths.append(("manager.access_log", cfg.manager.access_log))
    address = parse_address(cfg.listen.bind)
    if address.kind == "unix":
        paths.append(("listen.bind", address.path))
    return paths


def prepare(cfg: Config, log_path: str, create_dirs: bool = True) -> List[str]:
    """What ``start`` does before it creates a file: create the missing runtime directory
    (or, for ``check``, say it will), then refuse every directory another user could swap
    our files in (fsafe). Returns notes for ``check``; raises FcgiManagerError."""
    from . import fsafe
    from .privileges import resolve_user

    notes = []
    planned = set()
    for rd in missing(cfg):
        if create_dirs:
            create(rd)
        else:
            reason = unsafe_parent(rd.path)
            if reason:
                raise FcgiManagerError(
                    f"{rd.what}: directory {rd.path} does not exist, and fcgi-manager does "
                    f"not create it: {reason}",
                    f"create it yourself (mkdir -m {rd.mode:04o} {rd.path}), owned by root "
                    "or by the user fcgi-manager runs as")
            planned.add(rd.path)
            notes.append(f"{rd.describe()} is missing: start creates it ({rd.what})")
    trusted = [resolve_user(cfg.manager.user, cfg.manager.group).uid]
    for what, path in managed_paths(cfg, log_path):
        directory = os.path.dirname(os.path.abspath(path))
        # A directory start would create is judged by its parent, as start judges it.
        fsafe.check_directory(directory if directory in planned else path, what, trusted)
    return notes
