"""Who the app runs as and with what environment: ``manager.user``/``group``,
``app.env`` and ``app.clear_env``.

The master keeps the privileges it was started with (it binds, creates its files, reopens
logs and signals workers); no app code ever runs in it while it is root. Every process
that runs app code drops to ``manager.user`` for good first (:meth:`RunAs.drop`): the
workers, the reload's validation import, ``check``, and, with ``preload``, the zygote
that imports the app once and forks the workers (see ``zygote.py``).
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
from typing import Any, Optional

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

    def drop(self) -> None:
        """For good: supplementary groups, then real, effective and saved gid and uid.

        ``setresuid`` to the target ids leaves no saved uid 0 to return to, so code
        running afterwards (the app's import, threads, ``os.system``) cannot become root
        again: ``os.setuid(0)`` fails with EPERM."""
        if not self.switching:
            return
        if self.gid is not None:
            if self.name:
                os.initgroups(self.name, self.gid)
            else:
                os.setgroups([self.gid])
            os.setresgid(self.gid, self.gid, self.gid)
        if self.uid is not None:
            os.setresuid(self.uid, self.uid, self.uid)
            if self.uid != 0 and 0 in os.getresuid():
                raise OSError(errno.EPERM, "could not drop root for good")
            try:
                home = pwd.getpwuid(self.uid).pw_dir
                os.environ["HOME"] = home
                os.environ["USER"] = os.environ["LOGNAME"] = self.name
            except KeyError:
                pass


def workers_user(cfg: Any) -> str:
    """Who the workers run as, for ``start``, ``check`` and ``status`` to say."""
    if cfg.manager.user:
        return cfg.manager.user
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


ROOT_WARNING = ("workers run as root: the app can do anything on this machine; set "
                "manager.user (and manager.group) to an unprivileged user")


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
