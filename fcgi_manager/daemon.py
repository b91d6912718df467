"""Pidfiles and going to the background with a readiness handshake.

``start`` forks; the child calls ``setsid`` and forks again, and the grandchild becomes
the master. A pipe runs from it back to the waiting ``start`` command, which reads one
message and exits accordingly::

    OK <pid>\\n          every worker is ready and the pidfile is written
    ERR <text>          why the master could not start (import traceback, bind error)

EOF without a message means the master died before it could say (the log tells why).
The pidfile is written only when ready (atomically, by rename) and removed on every exit
path, only if it still holds our pid.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Iterable, Optional, Tuple

import psutil


def read_pidfile(path: str) -> Optional[int]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
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


def is_our_master(pid: int) -> bool:
    """Guard against pid reuse: the process must look like fcgi-manager (or a Python)."""
    try:
        cmd = " ".join(psutil.Process(pid).cmdline())
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False
    return "fcgi" in cmd or "python" in cmd.lower() or not cmd


def write_pidfile(path: str, pid: int) -> None:
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{pid}.tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{pid}\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def remove_pidfile(path: str, pid: int) -> None:
    if read_pidfile(path) == pid:
        try:
            os.unlink(path)
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


def stderr_is_tty() -> bool:
    try:
        return os.isatty(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
