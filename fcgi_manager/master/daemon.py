"""Pidfiles and going to the background with a readiness handshake.

``start`` forks; the child calls ``setsid`` and forks again, and the grandchild becomes
the master. A pipe runs from it back to the waiting ``start`` command, which reads one
message and exits accordingly::

    OK <pid>\\n          every worker is ready and the pidfile is written
    ERR <text>          why the master could not start (import traceback, bind error)

EOF without a message means the master died before it could say (the log tells why).
The pidfile is written only when ready (atomically, by rename) and removed on every exit
path, only if it still holds our pid.

The pidfile proves who it names. It holds only the pid (what ``kill $(cat FILE)``,
``start-stop-daemon`` and systemd's ``PIDFile=`` read), and the master holds a POSIX lock
on it from before it appears until the master exits (the lock survives the reload's
exec; it does not pass to forked children). Before any command signals the pid it asks
the kernel who holds that lock (``F_GETLK``): only that pid is the master. A pid that is
dead or now another process's makes the pidfile stale: it is never signalled, and the
pidfile never stops a start. A pidfile that belongs to neither root nor the caller
proves nothing either.
"""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import struct
import time
from typing import Iterable, Optional, Tuple

import psutil

from .. import fdutil, fsafe


def read_pidfile(path: str) -> Optional[int]:
    """The pid a pidfile names (its first word), without following a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(fd, 256).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        pid = int(text.split()[0])
    except (ValueError, IndexError):
        return None
    return pid if pid > 0 else None


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def process_start_ticks(pid: int) -> Optional[int]:
    """When ``pid`` started, in clock ticks since boot (field 22 of /proc/PID/stat): with
    the pid, it names one process for the life of the machine (a reused pid has a later
    start)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        # The command name (field 2) may hold spaces and parentheses: skip to the last ')'.
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


_FLOCK = struct.Struct("hhqqi4x")  # struct flock on 64-bit Linux (and LFS builds)


def lock_holder(path: str) -> Optional[int]:
    """The pid holding a POSIX lock on ``path`` (the master holds one on its pidfile for
    its whole life, across reloads), 0 if nobody does, None if the kernel cannot say."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        l_type, _, _, _, pid = _FLOCK.unpack(answer)
    except (OSError, struct.error):
        return None
    finally:
        os.close(fd)
    return 0 if l_type == fcntl.F_UNLCK else pid


class PidfileState:
    """What a pidfile says and whether it is true.

    ``live``: the pid is the master that wrote the file (it holds the file's lock).
    ``stale``: a file is there but its pid is dead or now another process. Neither: no
    pidfile."""

    __slots__ = ("path", "pid", "live", "reason")

    def __init__(self, path: str, pid: Optional[int], live: bool, reason: str) -> None:
        self.path = path
        self.pid = pid
        self.live = live
        self.reason = reason

    @property
    def stale(self) -> bool:
        return not self.live and (self.pid is not None or self.reason == "unreadable")


def inspect_pidfile(path: str) -> PidfileState:
    """Check that the pidfile names a live master before anyone signals that pid."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return PidfileState(path, None, False, "no pidfile")
    except OSError:
        return PidfileState(path, None, False, "unreadable")
    pid = read_pidfile(path)
    if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()):
        # Not written by a master we may command (root's or ours): the app's user, if it
        # can write that directory, must not be able to name a pid for root to signal.
        return PidfileState(path, pid if pid is not None else 0, False,
                            f"the pidfile belongs to uid {st.st_uid}, not to root or to us")
    if pid is None:
        return PidfileState(path, None, False, "unreadable")
    if not pid_alive(pid):
        return PidfileState(path, pid, False, f"pid {pid} is not running")
    if lock_holder(path) == pid:
        return PidfileState(path, pid, True, "holds the pidfile lock")
    return PidfileState(path, pid, False,
                        f"pid {pid} runs but is not the master that wrote the pidfile")


def same_process(pid: int, start: Optional[int]) -> bool:
    """True if ``pid`` is still the process that had start time ``start``."""
    return start is not None and pid_alive(pid) and process_start_ticks(pid) == start


PIDFILE_MODE = 0o600


def write_pidfile(path: str, pid: int) -> int:
    """Write the pidfile, locked; returns the descriptor holding the lock, which the
    master keeps open (and carries across its reload's exec).

    Mode 0600: a POSIX lock needs an open descriptor, so a user who could read the file
    could also lock it, and a locking process whose pid is in the file would read as
    the live master. Root and the master's own user, who read it, are enough."""
    return fsafe.create_exclusive(path, f"{pid}\n".encode("ascii"), PIDFILE_MODE, lock=True)


PIDFILE_FD_ENV = "FCGI_MANAGER_PIDFILE_FD"


def carry_pidfile_fd(fd: int, env: dict) -> None:
    """Before the master re-executes itself: keep the locked pidfile descriptor open
    across exec (its lock goes with it) and tell the new image its number."""
    if fd >= 0:
        os.set_inheritable(fd, True)
        env[PIDFILE_FD_ENV] = str(fd)


def take_carried_pidfile_fd() -> int:
    """In a re-executed master: the pidfile descriptor the old image held, or -1."""
    text = os.environ.pop(PIDFILE_FD_ENV, "")
    if not text.isdigit():
        return -1
    fd = int(text)
    fdutil.set_cloexec([fd])
    return fd


def remove_pidfile(path: str, pid: int) -> None:
    if read_pidfile(path) == pid:
        try:
            os.unlink(path)
        except OSError:
            pass


def remove_stale_pidfile(state: PidfileState) -> None:
    """Remove a pidfile found stale, unless it changed since (a master just started)."""
    if not state.stale:
        return
    if inspect_pidfile(state.path).pid != state.pid:
        return
    try:
        os.unlink(state.path)
    except OSError:
        pass


def daemonize(keep_fds: Iterable[int] = ()) -> Tuple[bool, int]:
    """Fork into the background. Returns ``(False, read_fd)`` in the calling process and
    ``(True, write_fd)`` in the daemon, which must report with :func:`report`."""
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        os.waitpid(pid, 0)  # the intermediate child exits at once
        return False, r
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    keep = set(keep_fds)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd not in keep:
            os.dup2(devnull, fd)
    if devnull not in keep and devnull > 2:
        os.close(devnull)
    # Whatever the shell that ran `start` had open (a terminal, a pipe, a lock) must not
    # live on in a daemon and in every process the app starts.
    fdutil.close_all_but(keep | {w})
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return True, w


def report(fd: int, ok: bool, text: str) -> None:
    message = f"OK {os.getpid()}\n" if ok else f"ERR {text}"
    try:
        os.write(fd, message.encode("utf-8", "replace"))
    except OSError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass


def wait_for_report(fd: int, timeout: float) -> Tuple[Optional[bool], str]:
    """In ``start``: the daemon's verdict, or (None, "") if it died without one."""
    chunks = []
    deadline = time.monotonic() + timeout
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    try:
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                continue
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
        else:
            return None, f"the master did not become ready within {timeout:.0f} s"
    finally:
        sel.close()
        os.close(fd)
    text = b"".join(chunks).decode("utf-8", "replace")
    if text.startswith("OK "):
        return True, text[3:].strip()
    if text.startswith("ERR "):
        return False, text[4:]
    return None, text
