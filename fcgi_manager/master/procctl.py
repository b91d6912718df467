"""Linux process controls (``prctl``): parent-death signal, child subreaper, name.

Loaded when the master starts, before anything forks or drops privileges: after the drop
the interpreter's own library directory may not be readable by ``manager.user``, and a
late ``import ctypes`` would fail there. Imported before fork, ctypes is also shared by
every worker instead of costing each ~0.6 MiB of private memory.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterator, Optional, Tuple

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
COMM_MAX = 15  # the kernel's TASK_COMM_LEN (16) minus the NUL


def _load_libc() -> Optional[Any]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return None


_LIBC = _load_libc()


def set_pdeathsig(sig: int) -> bool:
    """Ask the kernel to send ``sig`` when our parent exits. Call it after any uid
    change: the kernel clears it on one. True if set."""
    if _LIBC is None:
        return False
    return _LIBC.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def set_child_subreaper() -> bool:
    """Become the parent of orphaned descendants (workers forked by a zygote), so that
    this process reaps them and sees how they ended. True if set."""
    if _LIBC is None:
        return False
    return _LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def set_name(name: str) -> bool:
    """Set ``/proc/self/comm`` (what ``top`` shows), cut to 15 bytes. True if set."""
    if _LIBC is None:
        return False
    import ctypes  # already loaded by _load_libc

    return _LIBC.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:COMM_MAX]), 0, 0, 0) == 0


def exited_children() -> Iterator[Tuple[int, int]]:
    """Reap every child that has exited, without blocking: ``(pid, wait status)`` each.

    The master, the pool parent and the zygote are all subreapers of something, so each
    reaps with ``waitpid(-1)`` in its loop: one loop, written once."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status
