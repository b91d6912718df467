"""Who the app runs as and with what environment: ``manager.user``/``group``,
``app.env`` and ``app.clear_env``.

The master keeps the privileges it was started with (it may need them to bind again or
to signal workers); workers drop to ``manager.user`` for good right after fork. With
``preload`` the master imports the app with that user as its *effective* uid, so the
import sees the same file permissions the workers will.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
from typing import Any, Iterator, Optional

from .errors import ConfigError


class RunAs:
    """A resolved user/group (or nobody to switch to)."""

    def __init__(self, uid: Optional[int], gid: Optional[int], name: str = "") -> None:
        self.uid = uid
        self.gid = gid
        self.name = name

    @property
    def switching(self) -> bool:
        return os.geteuid() == 0 and (self.uid is not None or self.gid is not None)

    @contextlib.contextmanager
    def effective(self) -> Iterator[None]:
        """Temporarily become the user (effective ids only) when running as root."""
        if not self.switching:
            yield
            return
        old_egid = os.getegid()
        old_groups = os.getgroups()
        try:
            if self.gid is not None:
                if self.name:
                    os.setgroups(os.getgrouplist(self.name, self.gid))
                os.setegid(self.gid)
            if self.uid is not None:
                os.seteuid(self.uid)
            yield
        finally:
            os.seteuid(0)
            os.setegid(old_egid)
            os.setgroups(old_groups)

    def drop(self) -> None:
        """For good (in a worker, after fork)."""
        if not self.switching:
            return
        if self.gid is not None:
            if self.name:
                os.initgroups(self.name, self.gid)
            else:
                os.setgroups([self.gid])
            os.setgid(self.gid)
        if self.uid is not None:
            os.setuid(self.uid)
        if self.uid is not None:
            try:
                home = pwd.getpwuid(self.uid).pw_dir
                os.environ["HOME"] = home
                os.environ["USER"] = os.environ["LOGNAME"] = self.name
            except KeyError:
                pass


def resolve_user(user: str, group: str) -> RunAs:
    uid = gid = None
    name = ""
    if user:
        try:
            pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
        except KeyError:
            raise ConfigError(f"manager.user: no user named {user!r} on this system") from None
        uid, gid, name = pw.pw_uid, pw.pw_gid, pw.pw_name
    if group:
        try:
            gid = (grp.getgrnam(group) if not group.isdigit() else grp.getgrgid(int(group))).gr_gid
        except KeyError:
            raise ConfigError(f"manager.group: no group named {group!r} on this system"
                              ) from None
    if (uid is not None or gid is not None) and os.geteuid() != 0 and uid not in (
            None, os.geteuid()):
        raise ConfigError(f"manager.user = {user!r} needs fcgi-manager to be started as root",
                          "start it as root, or remove manager.user to run as yourself")
    return RunAs(uid, gid, name)


def apply_environment(app: Any) -> None:
    """``app.clear_env`` (keep only a minimal set, as php-fpm does) then ``app.env``."""
    if app.clear_env:
        keep = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TZ", "NOTIFY_SOCKET",
                                           "LISTEN_FDS", "LISTEN_PID", "FCGI_MANAGER_RESUME")
                if k in os.environ}
        os.environ.clear()
        os.environ.update(keep)
    for key, value in app.env:
        os.environ[key] = value
