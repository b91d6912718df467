"""Creating the manager's own files without being tricked into writing someone else's.

The master often runs as root, in directories (``/run/app``, ``/var/log/app``) that
another user may be able to write to. Such a user could plant a symbolic or hard link at
a path the master is about to open and have root truncate, chmod or append to any file.
So, as OpenSSH's ``StrictModes`` does:

* every directory on the way to the pidfile, the log, the control socket and a unix
  listening socket must be writable only by root, by the user running the master and by
  ``manager.user`` -- or carry the sticky bit (``/tmp``), which stops others from
  replacing entries they do not own. Otherwise it is refused, naming the directory;
* files are created with ``O_EXCL`` (a fresh inode, never an existing link), or opened
  with ``O_NOFOLLOW`` and checked to be a plain file with one link; owner and mode are
  set on the open descriptor, never by path.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Iterable, Optional

from .errors import FcgiManagerError

_SEEN_OK: set = set()


def check_directory(path: str, what: str, trusted_uids: Iterable[Optional[int]] = ()) -> None:
    """Refuse ``path``'s directory (and its ancestors) if other users can replace entries.

    ``what`` names the setting (``manager.pidfile``) for the error message."""
    trusted = {0, os.geteuid()} | {u for u in trusted_uids if u is not None}
    directory = os.path.dirname(os.path.abspath(path)) or "/"
    key = (directory, tuple(sorted(trusted)))
    if key in _SEEN_OK:
        return
    current = directory
    while True:
        try:
            st = os.stat(current)
        except FileNotFoundError:
            raise FcgiManagerError(f"{what}: directory {current} does not exist",
                                   "create it, owned by root or by manager.user") from None
        except OSError as exc:
            raise FcgiManagerError(f"{what}: cannot inspect directory {current}: "
                                   f"{exc.strerror}") from None
        _check_one(current, st, what, trusted)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    _SEEN_OK.add(key)


def _check_one(directory: str, st: os.stat_result, what: str, trusted: set) -> None:
    mode = st.st_mode
    if mode & stat.S_ISVTX:
        return  # sticky: others may add entries but never replace ours
    if st.st_uid not in trusted:
        raise FcgiManagerError(
            f"{what}: directory {directory} belongs to uid {st.st_uid}, who could replace "
            f"the files fcgi-manager creates there",
            "chown it to root or to manager.user, or choose another directory")
    if mode & stat.S_IWOTH:
        raise FcgiManagerError(
            f"{what}: directory {directory} is writable by every user (mode "
            f"{stat.S_IMODE(mode):04o}) and has no sticky bit",
            f"chmod o-w {directory} (or chmod +t), or choose another directory")
    if mode & stat.S_IWGRP and st.st_gid != 0 and not _group_is_trusted(st.st_gid, trusted):
        raise FcgiManagerError(
            f"{what}: directory {directory} is writable by group {st.st_gid} (mode "
            f"{stat.S_IMODE(mode):04o}) and has no sticky bit",
            f"chmod g-w {directory}, or choose another directory")


def _group_is_trusted(gid: int, trusted: set) -> bool:
    """A group-writable directory is fine when every member of the group is trusted."""
    import grp
    import pwd

    try:
        members = set(grp.getgrgid(gid).gr_mem)
    except KeyError:
        return False
    uids = set()
    for name in members:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            return False
    try:
        uids |= {pw.pw_uid for pw in pwd.getpwall() if pw.pw_gid == gid}
    except OSError:
        return False
    return uids <= trusted


def open_append(path: str, mode: int = 0o666, owners: Iterable[Optional[int]] = (),
                create: bool = True) -> int:
    """Open a log file for appending; create it if missing (with ``mode`` and the umask).

    A symbolic link is followed only if root or we made it (``/dev/stdout``, a link an
    administrator set up); one made by anyone else -- the app's user can write some
    directories -- is refused. The open never blocks (``O_NONBLOCK``), and what it found
    is checked on the descriptor (``fstat``), so what is checked is what gets written:

    * a named FIFO is refused (a reader that never reads would freeze the writer); only
      an anonymous pipe, reached through a trusted link like ``/dev/stdout``, is used;
    * a regular file must belong to the writing user (or one of ``owners``: the master
      creates the access log for ``manager.user``) and not be writable by others, so
      another user's planted file never receives our lines; nor may it have other hard
      links.

    Raises OSError naming ``path``, whose ``strerror`` says the reason (FileNotFoundError
    for a missing file without ``create``)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK
    if create:
        flags |= os.O_CREAT
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO without a reader, or a socket
            fifo = stat.S_ISFIFO(os.lstat(path).st_mode)
            raise OSError(errno.ENXIO, "it is a FIFO, which fcgi-manager does not write "
                                       "logs to" if fifo else "it is not a file, a pipe or "
                                       "a terminal", path) from None
        if exc.errno != errno.ELOOP:
            raise
        owner = os.lstat(path).st_uid
        if owner not in (0, os.geteuid()):
            raise OSError(exc.errno, f"it is a symbolic link made by uid {owner}, which "
                                     f"fcgi-manager does not follow", path) from None
        fd = os.open(path, flags, mode)
    try:
        _check_log_file(fd, path, {os.geteuid()} | {u for u in owners if u is not None})
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def log_file_problem(path: str, owners: Iterable[Optional[int]] = ()) -> str:
    """Why :func:`open_append` would refuse the file at ``path`` as it is now ('' if it
    would not, or if there is no file yet): for ``check``, which must fail on what
    ``start`` refuses, without creating anything."""
    try:
        os.close(open_append(path, owners=owners, create=False))
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""


def _check_log_file(fd: int, path: str, owners: set) -> None:
    """Refuse what :func:`open_append` opened unless it is safe to write (see there)."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        if st.st_uid not in owners:
            raise OSError(errno.EPERM, f"it belongs to uid {st.st_uid}, not to the user "
                                       f"writing it (uid {os.geteuid()})", path)
        if st.st_mode & stat.S_IWOTH:
            raise OSError(errno.EPERM, f"every user can write it (mode "
                                       f"{stat.S_IMODE(st.st_mode):04o})", path)
        if st.st_nlink > 1:
            raise OSError(errno.EMLINK, "it has other hard links, which fcgi-manager "
                                        "does not write through", path)
    elif stat.S_ISFIFO(st.st_mode):
        try:
            anonymous = os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
        except OSError:
            anonymous = False
        if not anonymous:
            raise OSError(errno.EPERM, "it is a FIFO, which fcgi-manager does not write "
                                       "logs to", path)
    elif not stat.S_ISCHR(st.st_mode):
        raise OSError(errno.EINVAL, "it is not a file, a pipe or a terminal", path)


def create_exclusive(path: str, content: bytes, mode: int, lock: bool = False) -> int:
    """Write ``content`` to ``path`` atomically: a fresh temporary file (``O_EXCL``, so
    never an existing link), mode set on the descriptor, then renamed over ``path``
    (rename replaces a link itself, never its target). Returns the open descriptor,
    read-only, of the new file; with ``lock``, this process holds a POSIX read lock on it
    from before it appears under its name until the descriptor is closed."""
    import fcntl
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    reader = -1
    try:
        try:
            os.fchmod(fd, mode)
            os.write(fd, content)
            os.fsync(fd)
            reader = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            # Before locking: closing any descriptor of a file drops our POSIX locks on it.
            os.close(fd)
        if lock:
            fcntl.lockf(reader, fcntl.LOCK_SH | fcntl.LOCK_NB)
        os.rename(tmp, path)
    except BaseException:
        if reader >= 0:
            os.close(reader)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return reader
