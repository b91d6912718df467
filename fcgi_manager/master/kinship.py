"""Is this pid really one of our workers? Asked of the kernel, never of a child.

The zygote runs the app's code; whatever it reports (a new worker's pid) is the app's word.
A root master that believed it would list, and later signal (TERM, then KILL), any process
the app named. So a reported pid is accepted only if ``/proc`` says that the process is
the master's own child (the master is ``PR_SET_CHILD_SUBREAPER``: a worker the zygote
forks is reparented to it before the zygote reports it) and runs with exactly the
expected uid (real, effective, saved and filesystem).

Why no pidfd: a child's pid cannot be reused until its parent reaps it, and the master's
one reaper (``waitpid(-1)``) drops a worker from its tables in the same turn it reaps it,
so ``kill(pid)`` on an accepted child can never reach another process. Checking once, at
the report, is enough; a pidfd would buy nothing but a descriptor per worker.
"""

from __future__ import annotations

import os
from typing import Optional


def _field(text: str, name: str) -> Optional[str]:
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return line[len(name) + 1:].strip()
    return None


def parent_of(pid: int) -> Optional[int]:
    """The parent pid the kernel records for ``pid`` (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        # The name in parentheses may hold spaces and ')': fields follow the last ')'.
        return int(stat[stat.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def why_not_our_child(pid: int, uid: int, parent: Optional[int] = None) -> Optional[str]:
    """None if ``pid`` is a child of ``parent`` (this process by default) running as
    ``uid`` for all four of its uids; else why not, for the log."""
    if pid <= 1 or pid == os.getpid():
        return f"pid {pid} cannot be a worker"
    parent = os.getpid() if parent is None else parent
    ppid = parent_of(pid)
    if ppid is None:
        return f"pid {pid} does not exist"
    if ppid != parent:
        return f"pid {pid} is not a child of the master (its parent is {ppid})"
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            uids = _field(f.read().decode("ascii", "replace"), "Uid")
    except OSError:
        return f"pid {pid} does not exist"
    ids = [int(x) for x in (uids or "").split()]
    if len(ids) != 4 or any(i != uid for i in ids):
        return f"pid {pid} runs with uids {uids}, not {uid}"
    return None


__all__ = ["parent_of", "why_not_our_child"]
