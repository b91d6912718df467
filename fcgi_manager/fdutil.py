"""Descriptor hygiene: nothing the manager owns reaches a program the app starts.

Python opens descriptors close-on-exec (PEP 446), so the rule here is simply never to
undo that outside the one place that needs it (the master re-executing itself on
reload), and to redo it for descriptors we receive already inheritable (a re-executed
master's state, an inherited ``fd:N`` or systemd socket). A forked child that runs app
code without exec'ing (the reload's validation import, the privilege-dropped zygote)
gets the stronger treatment: every descriptor it does not need is closed, because a
process the app forks there keeps whatever its parent held, exec or not.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

_FALLBACK_MAX_FD = 65536


def max_fd() -> int:
    try:
        soft = os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        soft = -1
    return soft if soft > 0 else _FALLBACK_MAX_FD


def set_cloexec(fds: Iterable[int]) -> None:
    """Mark descriptors close-on-exec (ignoring ones already closed)."""
    for fd in fds:
        if fd is None or fd < 0:
            continue
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass


def close_all_but(keep: Iterable[int], lowest: int = 3) -> None:
    """Close every descriptor from ``lowest`` up, except ``keep``.

    Used where app code is about to run in a fork of the master and must not hold the
    master's listening socket, pipes or control socket (a background child the import
    leaves would keep them for its whole life)."""
    kept = sorted({fd for fd in keep if fd is not None and fd >= lowest})
    start = lowest
    for fd in kept + [max_fd()]:
        if fd > start:
            os.closerange(start, fd)
        start = fd + 1


def read_pipe(fd: int, final: bool) -> Optional[bytes]:
    """One read of a child's pipe: its bytes, ``b""`` at its end (EOF or an error), or
    None when nothing is waiting now. ``final`` (the worker exited, its writer is gone):
    an empty pipe counts as the end, so the caller drains what is left and stops."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b"" if final else None
    except OSError:
        return b""
