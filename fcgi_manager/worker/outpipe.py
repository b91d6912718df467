"""A worker's stdout and stderr: complete lines to the master's pipe, never blocking.

Why: the master reads each worker's output pipe and logs it. A master that stops reading
for a while (SIGSTOPped, swapped out, its log disk slow) fills the pipe (64 KiB), and a
worker writing a traceback to a blocking pipe then waits -- inside ``logging``, in the
middle of a request -- until the master reads again; the master, once it runs, finds the
request past ``workers.timeout`` and kills a worker whose app did nothing wrong.

So the worker writes through its own non-blocking open of the pipe (opened again through
``/proc/self/fd``, a description of its own: fd 1 and 2 stay blocking for child processes
and faulthandler's stack dumps). Lines wait in a bounded queue while the pipe is full;
past ``MAX_QUEUED`` bytes the newest whole lines are dropped and counted, never a part of
one (a line begun is always finished), and the first line that gets through after a loss
says how many were lost. The count goes to the worker's scoreboard slot (status shows
``log_lines_lost``). The worker's loop calls :meth:`LineWriter.retry` when it wakes up idle,
so that queued lines do not wait for the next one.
"""

from __future__ import annotations

import io
import os
import threading
from typing import Callable, List, Optional

from ..logs import append_whole

MAX_QUEUED = 256 * 1024  # bytes of complete lines kept while the master does not read
CHUNK = 65536


class LineWriter(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of a worker (one object for both: one pipe)."""

    def __init__(self, fd: int, blocking_fd: int = 2) -> None:
        super().__init__()
        self.fd = fd
        self.blocking_fd = blocking_fd  # what fileno() answers (faulthandler, subprocess)
        self._partial = ""
        self._out = bytearray()  # complete lines, maybe the rest of one begun
        self.lost = 0  # lines dropped, in all
        self._unsaid = 0  # lines dropped since the last notice
        self._lock = threading.Lock()
        self.on_lost: Optional[Callable[[int], None]] = None

    @property
    def encoding(self) -> str:  # type: ignore[override]  # a property where TextIO has an attribute
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]  # the same: read-only, always "replace"
        return "replace"

    def fileno(self) -> int:
        return self.blocking_fd

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def pending(self) -> bool:
        return bool(self._out or self._unsaid)

    def write(self, text: str) -> int:
        with self._lock:
            if "\n" not in text:
                self._partial += text
                if len(self._partial) > CHUNK:  # a line without end: send it in pieces
                    self._queue(self._partial + "\n")
                    self._partial = ""
                return len(text)
            head, _, tail = text.rpartition("\n")
            lines, self._partial = self._partial + head + "\n", tail
            self._queue(lines)
            self._drain()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._drain()

    def retry(self) -> None:
        """From the worker's loop: write what waits, if the pipe has room now."""
        if self._out or self._unsaid:
            self.flush()

    def _queue(self, lines: str) -> None:
        data = lines.encode("utf-8", "replace")
        notice = self._notice() if self._unsaid else b""
        if len(self._out) + len(notice) + len(data) > MAX_QUEUED:
            dropped = data.count(b"\n")  # the newest whole lines: never a part of one
            self.lost += dropped
            self._unsaid += dropped
            if self.on_lost is not None:
                self.on_lost(self.lost)
            return
        self._out += notice + data
        self._unsaid = 0

    def _notice(self) -> bytes:
        return (f"fcgi-manager: {self._unsaid} line(s) of this worker's output were lost "
                "(the master did not read them in time)\n").encode()

    def _drain(self) -> None:
        out = self._out
        while True:
            if not out:
                if not self._unsaid:
                    return
                out += self._notice()  # through again: say what was lost first
                self._unsaid = 0
            try:
                n = os.write(self.fd, out[:CHUNK])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the master is gone: nobody will read these
                out.clear()
                self._unsaid = 0
                return
            del out[:n]


class FileLineWriter(LineWriter):
    """``sys.stdout``/``sys.stderr`` of a worker when the log is a regular file: complete
    lines go to the file itself, tagged and escaped as the master would write them, one
    ``write`` per call on the worker's own ``O_APPEND`` descriptor.

    Why: relaying costs the master a read, a split, a format and a write per line; under
    an error flood (a traceback per request) that was a fifth of a core, and a master
    stopped or slow held up every worker's log. An ``O_APPEND`` write of whole lines is
    placed whole at the end of the file whoever else appends, so the workers and the
    master share the file without a relay. fd 1 and 2 still lead to the master's pipe (for
    child processes and faulthandler), and so do the lines written while the file cannot
    be opened (the worker's user may not open the master's file again after a rotation):
    then this is a :class:`LineWriter` again.

    Reopening follows the master's log epoch (scoreboard), read before every write, and
    :meth:`follow_epoch` from the worker's loop when the master's ``SIGUSR1`` wakes it.
    Lines the file does not take (disk full) go to the master's pipe instead: the master
    writes them when it can, counts the ones it cannot and shows why in ``status``, for
    the workers' lines as for its own."""

    def __init__(self, pipe_fd: int, open_log: Callable[[], int], epoch: Callable[[], int],
                 tag: Callable[[List[str]], str]) -> None:
        super().__init__(pipe_fd)
        self._open_log = open_log
        self._epoch = epoch
        self._tag = tag  # complete lines -> the text the log shows for them
        self.epoch = epoch()
        self.log_fd = self._try_open()

    def _try_open(self) -> int:
        try:
            return self._open_log()
        except OSError:  # the master relays our lines instead (fd -1: the pipe)
            return -1

    def follow_epoch(self) -> None:
        """Reopen the log file if the master reopened its own (``reopen-logs``)."""
        if self._epoch() != self.epoch:
            with self._lock:
                if self._epoch() != self.epoch:  # not done by another thread meanwhile
                    self._reopen()

    def _reopen(self) -> None:
        self.epoch = self._epoch()
        old, self.log_fd = self.log_fd, self._try_open()
        if old >= 0:
            os.close(old)

    def write(self, text: str) -> int:
        if self._epoch() != self.epoch:
            self.follow_epoch()
        with self._lock:
            if self.log_fd >= 0:
                if "\n" not in text:
                    self._partial += text
                    if len(self._partial) > CHUNK:  # a line without end: in pieces
                        self._append([self._partial])
                        self._partial = ""
                    return len(text)
                head, _, tail = text.rpartition("\n")
                lines, self._partial = (self._partial + head).split("\n"), tail
                self._append(lines)
                return len(text)
        return super().write(text)  # no file: through the master, as a LineWriter

    def _append(self, lines: List[str]) -> None:
        text = self._tag([line[:-1] if line.endswith("\r") else line for line in lines])
        try:
            append_whole(self.log_fd, text.encode("utf-8", "replace"))
        except OSError:  # disk full: the master tries them, counts them and says so
            self._queue("\n".join(lines) + "\n")
            self._drain()


def install(out_fd: int, open_log: Optional[Callable[[], int]] = None,
            epoch: Optional[Callable[[], int]] = None,
            tag: Optional[Callable[[List[str]], str]] = None) -> LineWriter:
    """Point ``sys.stdout`` and ``sys.stderr`` at a :class:`LineWriter` on the pipe that fd
    ``out_fd`` (already dup'ed to 1 and 2) writes to; with ``open_log`` (which opens the log
    file, OSError if it cannot), ``epoch`` and ``tag``, at a :class:`FileLineWriter`."""
    import sys

    try:
        fd = os.open(f"/proc/self/fd/{out_fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # no /proc: the shared description goes non-blocking instead
        fd = os.dup(out_fd)
        os.set_blocking(fd, False)
    writer = (LineWriter(fd) if open_log is None or epoch is None or tag is None
              else FileLineWriter(fd, open_log, epoch, tag))
    sys.stdout = sys.stderr = writer
    return writer
