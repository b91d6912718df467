"""``listen.acl_users`` / ``listen.acl_groups``: POSIX ACL entries on the unix socket.

php-fpm's ``listen.acl_users``: besides owner, group and mode, named users and groups get
read-write access to the socket (connecting to a unix socket needs write permission), so
two web servers running as different users can reach one pool without sharing a group.
The entries are set with ``setfacl -m u:NAME:rw,g:NAME:rw`` (Debian package ``acl``)
right after bind, before the socket listens; no ACL library is linked.
"""

from __future__ import annotations

import grp
import pwd
import shutil
import subprocess
from typing import Sequence

from .errors import BindError, ConfigError


def entries(users: Sequence[str], groups: Sequence[str]) -> str:
    """The ``setfacl -m`` argument; ConfigError naming the key for a name that does not
    exist here."""
    for name in users:
        try:
            pwd.getpwnam(name)
        except KeyError:
            raise ConfigError(f"listen.acl_users: no user named {name!r} on this system"
                              ) from None
    for name in groups:
        try:
            grp.getgrnam(name)
        except KeyError:
            raise ConfigError(f"listen.acl_groups: no group named {name!r} on this system"
                              ) from None
    return ",".join([f"u:{u}:rw" for u in users] + [f"g:{g}:rw" for g in groups])


def grant(path: str, users: Sequence[str], groups: Sequence[str]) -> None:
    """Add the ACL entries to the socket file ``path`` (nothing when both are empty)."""
    if not users and not groups:
        return
    spec = entries(users, groups)
    key = "listen.acl_users" if users else "listen.acl_groups"
    setfacl = shutil.which("setfacl") or (shutil.which("setfacl", path="/usr/bin:/bin"))
    if setfacl is None:
        raise BindError(f"{key} needs the setfacl program, which is not installed",
                        "install it (Debian/Ubuntu: apt install acl; Fedora: dnf install "
                        "acl), or use listen.owner/group/mode instead")
    try:
        done = subprocess.run([setfacl, "-m", spec, "--", path], capture_output=True,
                              text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BindError(f"{key}: cannot run setfacl on {path}: {exc}") from None
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip()
        raise BindError(f"{key}: setfacl -m {spec} {path} failed: {why}",
                        "the file system of the socket must support POSIX ACLs "
                        "(mount option acl)")
