"""The master's end of each worker's pipes: its output (logged line by line) and its
notify frames (ready, its boot error, leaving), and what the master samples of it."""

from __future__ import annotations

import os
import selectors
import time
from typing import Dict, List, Optional

import psutil

from .. import fdutil, logs
from ..escaping import escape
from ..rules import supervisor as sv
from ..wire import notify
from ..wire.states import WorkerState
from .children import close_quietly
from .context import MasterContext
from .resume import ResumedWorker

MAX_LINE = 16384  # a worker's output line longer than this is logged in pieces


class WorkerIO:
    """The master's end of one worker's pipes."""

    __slots__ = ("pid", "slot", "out_fd", "notify_fd", "out_buf", "notes", "proc")

    def __init__(self, pid: int, slot: int, out_fd: int, notify_fd: int) -> None:
        self.pid = pid
        self.slot = slot
        self.out_fd = out_fd
        self.notify_fd = notify_fd
        self.out_buf = b""
        self.notes = notify.Decoder()
        self.proc: Optional[psutil.Process] = None


def unwatch_fd(selector: selectors.BaseSelector, fd: int) -> None:
    """Take a pipe's read end out of the selector and close it (nothing if ``fd`` < 0)."""
    if fd < 0:
        return
    try:
        selector.unregister(fd)
    except (KeyError, ValueError):
        pass
    close_quietly(fd)


class WorkerPipes:
    """Every worker the master watches, by pid, and what it reads from each.

    The supervisor decides on what a worker says; this part only turns bytes into log
    lines and events, reads the last of both pipes once the worker exited, and reads
    the worker's slot and its memory and CPU for the supervisor's timers and limits.
    """

    def __init__(self, ctx: MasterContext) -> None:
        self.ctx = ctx
        self.io: Dict[int, WorkerIO] = {}

    def watch(self, io: WorkerIO) -> None:
        self.io[io.pid] = io
        self.ctx.selector.register(io.out_fd, selectors.EVENT_READ, ("out", io))
        self.ctx.selector.register(io.notify_fd, selectors.EVENT_READ, ("notify", io))

    def spawned(self, slot: int, pid: int, out_fd: int, notify_fd: int) -> sv.Spawned:
        """A new worker ``pid`` in ``slot``: watch its pipes (the event to feed)."""
        os.set_blocking(out_fd, False)
        os.set_blocking(notify_fd, False)
        self.ctx.board.set_pid(slot, pid)
        self.watch(WorkerIO(pid, slot, out_fd, notify_fd))
        return sv.Spawned(slot, pid, time.monotonic())

    def read_output(self, io: WorkerIO, final: bool = False) -> None:
        """Log what the worker wrote, a line at a time; ``final``: all of it, it exited."""
        while io.out_fd >= 0:
            data = fdutil.read_pipe(io.out_fd, final)
            if data is None:
                return
            if not data:
                unwatch_fd(self.ctx.selector, io.out_fd)
                io.out_fd = -1
                break
            *lines, rest = (io.out_buf + data).split(b"\n")
            for line in lines:
                self._log_line(io, line)
            if len(rest) > MAX_LINE:
                self._log_line(io, rest)
                rest = b""
            io.out_buf = rest
            if not final:
                return
        if io.out_buf:
            self._log_line(io, io.out_buf)
            io.out_buf = b""

    def _log_line(self, io: WorkerIO, line: bytes) -> None:
        logs.worker_line(self.ctx.log_handler, self.ctx.board.worker_id(io.slot), io.pid,
                         line.rstrip(b"\r").decode("utf-8", "replace"))

    def read_notify(self, io: WorkerIO, final: bool = False) -> None:
        """Frames from the notify pipe; ``final``: all of them, the worker exited."""
        feed = self.ctx.feed
        while io.notify_fd >= 0:
            data = fdutil.read_pipe(io.notify_fd, final)
            if data is None:
                return
            if not data:
                unwatch_fd(self.ctx.selector, io.notify_fd)
                io.notify_fd = -1
                return
            for kind, payload in io.notes.feed(data):
                if kind == notify.READY:
                    feed(sv.WorkerReady(io.pid, time.monotonic()))
                elif kind == notify.BOOT_ERROR:
                    feed(sv.WorkerBootError(io.pid, payload.decode("utf-8", "replace")))
                elif kind == notify.LEAVING:
                    feed(sv.WorkerLeaving(io.pid, payload.decode("ascii", "replace"),
                                          time.monotonic()))
            if not final:
                return

    def finish(self, pid: int) -> Optional[List[int]]:
        """Worker ``pid`` exited: read what it said last (its last lines, a boot error),
        free its slot; its slot's counters (requests, shed, accept backoffs, log lines
        lost), or None if it is not a worker watched here."""
        io = self.io.pop(pid, None)
        if io is None:
            return None
        self.read_output(io, final=True)
        self.read_notify(io, final=True)
        board = self.ctx.board
        slot = board.read_slot(io.slot)
        counts = [slot.requests, slot.shed, slot.accept_backoffs, slot.log_lines_lost]
        board.clear(io.slot)
        return counts

    def fds(self) -> List[int]:
        """Every pipe end held (a child closes them)."""
        fds: List[int] = []
        for io in self.io.values():
            fds += [io.out_fd, io.notify_fd]
        return fds

    def resumed(self, workers: Dict[int, sv.WorkerRecord]) -> List[ResumedWorker]:
        """The workers watched here, as a reload's exec hands them to the new image."""
        return [ResumedWorker(w.slot, w.pid, w.generation, w.started, self.io[pid].out_fd,
                              self.io[pid].notify_fd, w.stop_reason, w.kill_at, w.ready)
                for pid, w in workers.items() if pid in self.io]

    # -- what the supervisor's timers and limits read -----------------------------------------

    def slot_views(self) -> Dict[int, sv.SlotView]:
        board, show_query = self.ctx.board, self.ctx.cfg.status.show_query
        views = {}
        for pid, io in self.io.items():
            s = board.read_slot(io.slot)
            what = escape(f"{s.method} {logs.shown_uri(s.uri, show_query)}")
            views[pid] = sv.SlotView(
                busy=s.state is WorkerState.BUSY, busy_since=s.busy_since,
                requests=s.requests, what=what, slow_dumped=s.slow_dumped, threads=s.threads,
                in_flight=len(s.in_flight), heartbeat=s.heartbeat)
        return views

    def sample(self, now: float) -> None:
        """RSS and CPU of every worker into the scoreboard (the master's psutil, not the
        workers': the request path stays free of it); the supervisor checks max_memory."""
        rss: Dict[int, int] = {}
        for io in self.io.values():
            try:
                if io.proc is None:
                    io.proc = psutil.Process(io.pid)
                    io.proc.cpu_percent(None)
                with io.proc.oneshot():
                    rss[io.pid] = io.proc.memory_info().rss
                    cpu = io.proc.cpu_percent(None)
                self.ctx.board.write_sample(io.slot, rss[io.pid], cpu)
            except (psutil.Error, OSError):
                pass
        self.ctx.feed(sv.Sample(now, rss))
