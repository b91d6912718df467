"""A worker process's life, whichever loop it runs: signals, the notes to the master, the
access log's flushes and reopens, the heartbeat, and when to leave.

Exit codes tell the master why the worker ended (``EXIT_*``); the master logs them.
Stacks: ``STACK_SIGNAL`` makes faulthandler write every thread's stack to stderr (which
the master captures into the log), even while the app is stuck in a C call.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import resource
import signal
import sys
import time
from types import FrameType
from typing import Any, Optional

from .. import accesslog
from ..wire import notify
from ..wire.codes import EXIT_BOOT_ERROR as EXIT_BOOT_ERROR
from ..wire.codes import EXIT_OK as EXIT_OK
from ..wire.codes import EXIT_RECYCLE_MEMORY as EXIT_RECYCLE_MEMORY
from ..wire.codes import EXIT_RECYCLE_REQUESTS as EXIT_RECYCLE_REQUESTS
from ..wire.codes import STACK_SIGNAL as STACK_SIGNAL
from . import outpipe

HEARTBEAT_EVERY = 1.0  # seconds at most between two heartbeats of an idle worker

log = logging.getLogger("fcgi_manager.worker")
_getrusage = resource.getrusage
_RUSAGE_SELF = resource.RUSAGE_SELF


class WorkerLife:
    """What a worker process owes the master and itself besides serving requests.

    ``stopping`` is set by a stop signal, by the master's death, or by the worker itself
    when it recycles (:meth:`leave`); the loops watch it."""

    def __init__(self, config: Any, slot: Any, notify_fd: int, max_requests: int,
                 worker_id: int) -> None:
        w = config.workers
        self.slot = slot  # scoreboard.SlotWriter
        self.notify_fd = notify_fd
        self.max_requests = max_requests
        self.max_memory = w.max_memory
        self.stopping = False
        self.master_gone = False
        self.exit_code = EXIT_OK
        self.served = 0
        self.wakeup_r = -1
        # Often enough that the master sees an idle worker alive well within
        # workers.timeout; an idle worker waking once a second costs nothing measurable.
        self.heartbeat_every = max(0.05, min(HEARTBEAT_EVERY, w.timeout / 4 if w.timeout
                                             else HEARTBEAT_EVERY))
        self.access = accesslog.for_worker(config, worker_id, slot.log_epoch)

    # -- signals --------------------------------------------------------------------------

    def install_signals(self) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self.wakeup_r = r
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGQUIT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGINT, lambda *_: os._exit(EXIT_OK))
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)
        # The master's "reopen your logs": the handler does nothing, the wakeup pipe wakes
        # the loop, which looks at the scoreboard's log epoch (reopen_if_asked).
        signal.signal(signal.SIGUSR1, lambda *_: None)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        # The stack dump comes first (C level, even inside a stuck C call); then, chained,
        # a Python handler writes the access-log lines of the requests already finished:
        # this signal is the master's last word before a kill for workers.timeout.
        signal.signal(STACK_SIGNAL, self._on_stack_signal)
        faulthandler.register(STACK_SIGNAL, file=sys.stderr, all_threads=True, chain=True)

    def _on_stop_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self.stopping = True
        self.flush_access(frame)  # a kill may follow graceful_timeout

    def _on_stack_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self.flush_access(frame)

    def on_wakeup(self) -> None:
        """The signal pipe woke the loop: empty it, and reopen the logs if asked."""
        try:
            os.read(self.wakeup_r, 512)
        except OSError:
            pass
        self.reopen_if_asked()

    def on_master_gone(self) -> None:
        log.warning("the master process is gone: finishing and exiting")
        self.master_gone = True
        self.stopping = True

    # -- the access log and the heartbeat --------------------------------------------------

    def flush_access(self, frame: Optional[FrameType]) -> None:
        """Write the finished requests' access-log lines now, from a signal handler (in
        the main thread, between two bytecodes: a sleeping app is interrupted and resumes).
        Not when the signal interrupted the access log itself: it is writing already."""
        access = self.access
        if access is None or not access.pending:
            return
        while frame is not None:
            if frame.f_code.co_filename == accesslog.__file__:
                return
            frame = frame.f_back
        lock = access.lock
        if lock is None:
            access.flush()
        elif lock.acquire(timeout=0.5):  # app threads hold it only to add a line
            try:
                access.flush()
            finally:
                lock.release()

    def idle_beat(self) -> None:
        """The loop woke up with nothing to do: say it is alive (the master replaces an
        idle worker whose heartbeat stops: SIGSTOPped, or hung outside a request), write
        output the master could not take earlier, reopen the logs if asked."""
        self.slot.beat(time.monotonic())
        output = sys.stderr
        if getattr(output, "pending", False):
            output.retry()  # type: ignore[union-attr]  # outpipe's stream, not a TextIO
        self.reopen_if_asked()

    def reopen_if_asked(self) -> None:
        """Reopen the log files now if the master asked (its log epoch moved): an idle
        worker must not keep a rotated file open (its space is not freed)."""
        output = sys.stderr
        if isinstance(output, outpipe.FileLineWriter):
            output.follow_epoch()
        access = self.access
        if access is None or access.epoch == self.slot.log_epoch():
            return
        if access.lock is None:
            access.flush()  # reopens first (and writes what waits, if anything)
        else:
            with access.lock:
                access.flush()

    # -- notes to the master, and leaving --------------------------------------------------

    def notify(self, kind: bytes, payload: bytes = b"") -> None:
        try:
            os.write(self.notify_fd, notify.encode(kind, payload))
        except OSError:
            pass

    def check_recycle(self) -> None:
        """After each request: recycle after max_requests, or past max_memory.

        Memory is the peak RSS (``getrusage``: one system call, ~2 us, cheaper than a
        ``pread`` of ``/proc/self/statm``): a peak over the limit is reason enough, since the
        limit exists to beat the OOM killer. Checked after every request, not now and then:
        a burst of requests inside one second must not blow through it.
        """
        if self.stopping:
            return
        if self.max_requests and self.served >= self.max_requests:
            log.info("served %d requests (workers.max_requests): recycling", self.served)
            self.leave(EXIT_RECYCLE_REQUESTS, "max_requests")
        elif self.max_memory:
            self.check_memory()

    def check_memory(self) -> None:
        peak = _getrusage(_RUSAGE_SELF).ru_maxrss * 1024
        if peak > self.max_memory and not self.stopping:
            log.info("memory %d MiB is over workers.max_memory (%d MiB): recycling",
                     peak >> 20, self.max_memory >> 20)
            self.leave(EXIT_RECYCLE_MEMORY, "max_memory")

    def leave(self, exit_code: int, reason: str) -> None:
        """Stop accepting on our own, and say so at once: the master starts the replacement
        now, while this worker finishes what it serves (status shows it ``stopping``)."""
        self.exit_code = exit_code
        self.stopping = True
        self.slot.leaving()
        self.notify(notify.LEAVING, reason.encode())


def freeze_setup() -> None:
    """Hide what the worker allocated to get here from the garbage collector.

    The master froze the preloaded app before forking; what the worker built since (its
    own objects, the app when it is imported after the fork, ``post_fork``'s work) lives as
    long as the worker too. Frozen, a collection neither walks it (CPU per collection) nor
    writes its headers (pages that stay shared or clean).
    """
    gc.collect()
    if hasattr(gc, "freeze"):
        gc.freeze()


def current_rss() -> int:
    """This process's resident set size, from /proc (no psutil on the request path)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _getrusage(_RUSAGE_SELF).ru_maxrss * 1024
