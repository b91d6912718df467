"""The master's signals across the reload's ``execve``.

Between ``execve`` and the moment the new image installs its handlers, a signal with the
default disposition would kill the master (``TERM``, ``HUP``, ``INT``: no graceful stop,
the pidfile and socket left behind) or be dropped (``CHLD``), and a signal the old image
had queued but not yet handled (a ``TERM`` right behind the ``HUP``) would vanish with it.
So the old image blocks them and raises the queued ones again at its own thread (they
stay pending: the mask and the pending set survive ``execve``), and the new image
unblocks them once its handlers are in place, receiving both.
"""

from __future__ import annotations

import signal
import threading
from typing import Iterable, List


def hold(signals: Iterable[int], queued: List[int]) -> None:
    """Before ``execve``: block ``signals`` and make the ``queued`` ones pending again."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    me = threading.get_ident()
    for sig in dict.fromkeys(queued):
        signal.pthread_kill(me, sig)
    queued.clear()


def release(signals: Iterable[int]) -> None:
    """In the new image once its handlers are installed (or after a failed ``execve``):
    deliver whatever arrived meanwhile."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


__all__ = ["hold", "release"]
