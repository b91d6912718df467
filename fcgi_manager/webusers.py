"""Can the web server connect? Name each web-server user that cannot reach the unix socket.

The commonest first deployment failure is nginx's ``connect() ... (13: Permission
denied)``: the socket is ``srw-rw---- root root`` and nginx runs as ``www-data``. Nothing
in fcgi-manager's own view is wrong, so ``check`` and ``start`` look from the web server's
side: the users of the nginx, apache2/httpd and lighttpd processes running now (their
workers; root can connect anyway), or, when none runs, the users Debian, Fedora, Arch and
Alpine packages create (``www-data``, ``nginx``, ``http``, ``apache``). For each, the
socket needs write permission and every directory above it search permission -- judged
from owner, group (primary and supplementary) and mode, as the kernel does, for the socket
``listen.mode``/``owner``/``group`` will make and for a runtime directory ``start`` will
create (see rundir).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from typing import Dict, List, Optional, Set, Tuple

from .config import Config
from .sockets import parse_address

SERVER_PROGRAMS = ("nginx", "apache2", "httpd", "lighttpd")
USUAL_USERS = ("www-data", "nginx", "http", "apache")

Owner = Tuple[int, int, int]  # uid, gid, permission bits


def running_server_users() -> Dict[str, str]:
    """{user name: program} of the web servers running now (not root: it can connect)."""
    import psutil

    found: Dict[str, str] = {}
    for proc in psutil.process_iter(["name", "uids"]):
        try:
            name = proc.info["name"] or ""
            uids = proc.info["uids"]
        except (psutil.Error, KeyError):
            continue
        if name not in SERVER_PROGRAMS or uids is None or uids.effective == 0:
            continue
        try:
            found.setdefault(pwd.getpwuid(uids.effective).pw_name, name)
        except KeyError:
            continue
    return found


def server_users() -> Dict[str, str]:
    """{user: what it is}: the running web servers' users, else the usual ones that exist."""
    found = {user: f"{program} (user {user})" for user, program in
             running_server_users().items()}
    if found:
        return found
    for user in USUAL_USERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        found[user] = f"the web-server user {user}"
    return found


def _groups(user: str) -> Tuple[int, Set[int]]:
    pw = pwd.getpwnam(user)
    gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    return pw.pw_uid, gids


def _allows(uid: int, gids: Set[int], owner: Owner, bit: int) -> bool:
    """Whether ``uid`` (in ``gids``) has permission ``bit`` (4, 2 or 1) on ``owner``."""
    f_uid, f_gid, mode = owner
    if uid == 0:
        return True
    if uid == f_uid:
        return bool(mode & (bit << 6))
    if f_gid in gids:
        return bool(mode & (bit << 3))
    return bool(mode & bit)


def _name(uid: int, gid: int) -> str:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"{user}:{group}"


def predicted_socket(cfg: Config) -> Owner:
    """Owner, group and mode of the socket a master started now by this user makes."""
    li = cfg.listen
    uid, gid = os.geteuid(), os.getegid()
    if li.owner:
        try:
            pw = pwd.getpwnam(li.owner) if not li.owner.isdigit() else pwd.getpwuid(
                int(li.owner))
            uid, gid = pw.pw_uid, pw.pw_gid
        except KeyError:
            pass
    if li.group:
        try:
            gid = grp.getgrnam(li.group).gr_gid if not li.group.isdigit() else int(li.group)
        except KeyError:
            pass
    return uid, gid, int(li.mode, 8) & 0o7777


def _directories(path: str, planned: Dict[str, Owner]) -> List[Tuple[str, Owner]]:
    """Every directory above ``path``, root first, with its owner and mode."""
    out = []
    current = os.path.dirname(os.path.abspath(path))
    while True:
        if current in planned:
            out.append((current, planned[current]))
        else:
            try:
                st = os.stat(current)
            except OSError:
                st = None
            if st is not None:
                out.append((current, (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))))
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return list(reversed(out))


def blocked(user: str, path: str, sock: Owner, planned: Dict[str, Owner]) -> Optional[str]:
    """Why ``user`` cannot connect to the socket at ``path``, with the fix; None if it can."""
    try:
        uid, gids = _groups(user)
    except KeyError:
        return None
    for directory, owner in _directories(path, planned):
        if not _allows(uid, gids, owner, 1):
            return (f"the directory {directory} ({_name(owner[0], owner[1])}, mode "
                    f"{owner[2]:04o}) does not let it in; fix: chmod o+x {directory}")
    if _allows(uid, gids, sock, 2):
        return None
    try:
        group = grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    except KeyError:
        group = user
    return (f"the socket is {_name(sock[0], sock[1])} mode {sock[2]:04o}; fix: set "
            f"listen.group = \"{group}\" (run: --chown-socket :{group}), or "
            f"listen.mode = \"0666\" (run: --chmod-socket 666)")


def socket_warnings(cfg: Config, running: bool = False) -> List[str]:
    """One line for each web-server user that cannot connect to ``listen.bind``: the
    socket as it is (``running``: once the master is ready; systemd's socket under
    socket activation), else as a master started now would make it."""
    from . import rundir

    address = parse_address(cfg.listen.bind)
    if address.kind != "unix":
        return []
    planned = {rd.path: (rd.uid, rd.gid, rd.mode) for rd in rundir.missing(cfg)}
    sock = predicted_socket(cfg)
    if running:
        try:
            st = os.stat(address.path)
            sock = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
        except OSError:
            pass
    out = []
    for user, what in sorted(server_users().items()):
        reason = blocked(user, address.path, sock, planned)
        if reason:
            out.append(f"{what} cannot connect to {address.path}: {reason}")
    return out
