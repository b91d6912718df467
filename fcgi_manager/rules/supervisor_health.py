"""The workers' health: whether each worker still does its job, judged from what the
scoreboard shows at each tick and from the memory samples.

A request past ``workers.timeout`` gets its stack dumped, then its worker killed and
replaced; a slow one (``workers.slow_request``) gets its stack dumped once; an idle worker
whose heartbeat stopped is ``stuck``, killed and replaced; an idle one over
``workers.max_memory`` is recycled; one that does not exit in time is killed, and killed
again until it is reaped. A healthy worker ends the restart backoff.
"""

from __future__ import annotations

import logging
import signal
from typing import Mapping

from ..wire.codes import STACK_SIGNAL
from ..wire.states import WorkerState
from .supervisor_actions import MarkSlowDumped, MarkStuck, Signal
from .supervisor_book import KILL_RETRY, STACK_GRACE, Book, Phase, SlotView, WorkerRecord


class HealthChecks:
    """The checks a tick and a memory sample run over the worker table (``Book.slots``
    holds what the last tick showed). They judge workers one by one and only stop or
    replace them; the pool's size and the phase are the other parts' business, so these
    rules, the most numerous, read alone."""

    def __init__(self, book: Book) -> None:
        self.book = book
        self.warned_fresh_over_limit = False

    def check_recovered(self, now: float) -> None:
        """End the backoff once a worker started after the last quick failure is healthy:
        it served a request, or stayed up a while. Otherwise "failures in a row" would never
        reset: after a burst of deaths (workers killed under load) the pool would refill one
        worker at a time, up to 30 s apart, and stay that way for good."""
        book = self.book
        for w in book.current():
            s = book.slots.get(w.pid)
            if w.ready and book.restarts.is_healthy(w.started, now, s.requests if s else 0):
                book.log(logging.INFO, f"{w.name()} is healthy: no more backoff "
                                       f"({book.restarts.failures} quick failure(s) before it)")
                book.restarts.reset()
                return

    # -- requests: timeouts and slow ones --------------------------------------------------

    def check_timeouts(self, now: float) -> None:
        book = self.book
        cfg = book.cfg
        active = 0
        for w in list(book.workers.values()):
            s = book.slots.get(w.pid)
            if s is None or not s.busy:
                continue
            active += 1
            elapsed = now - s.busy_since
            if w.stop_reason == "timeout" and s.threads > 1:
                self._kill_when_only_hung_left(w, s, now)
            if w.stop_reason is None and elapsed > cfg.timeout:
                book.log(logging.ERROR, f"{w.name()} has run {s.what} for {elapsed:.0f} s, "
                                        f"past workers.timeout ({cfg.timeout:.0f} s): its stack "
                                        "follows, then it is killed and replaced")
                book.totals["timeouts"] += 1
                book.pending_respawns += 1  # its replacement starts at once
                book.stop_worker(w, "timeout", STACK_SIGNAL, STACK_GRACE, now)
                if s.threads > 1:
                    self._stop_hung_threaded(w, s)
            elif cfg.slow_request and elapsed > cfg.slow_request:
                request_no = (s.requests + 1) & 0xFFFFFFFF
                if s.threads > 1:
                    request_no = int(s.busy_since * 1000) & 0xFFFFFFFF  # the oldest request
                if s.slow_dumped != request_no:
                    book.emit(MarkSlowDumped(w.slot, request_no))
                    book.totals["slow"] += 1
                    book.log(logging.WARNING, f"{w.name()}: {s.what} is slow ({elapsed:.1f} s, "
                                              f"workers.slow_request = {cfg.slow_request:.1f} s);"
                                              " its stack follows")
                    book.emit(Signal(w.pid, STACK_SIGNAL))
        book.totals["max_active"] = max(book.totals["max_active"], active)

    def _stop_hung_threaded(self, w: WorkerRecord, s: SlotView) -> None:
        """A threaded worker with a hung request: its other threads get graceful_timeout to
        finish their requests (it stops accepting at once), then it is killed."""
        grace = self.book.cfg.graceful_timeout
        self.book.log(logging.WARNING, f"{w.name()}: {s.in_flight - 1} other request(s) in "
                                       f"flight get workers.graceful_timeout ({grace:.0f} s) "
                                       "to finish before it is killed")
        self.book.emit(Signal(w.pid, signal.SIGTERM))
        w.kill_at += grace

    def _kill_when_only_hung_left(self, w: WorkerRecord, s: SlotView, now: float) -> None:
        """Once the other requests of a timed-out threaded worker are done (and its stacks
        had STACK_GRACE to be written), waiting longer serves no one."""
        grace_left = w.kill_at - self.book.cfg.graceful_timeout
        if s.in_flight <= 1 and now >= grace_left and w.kill_at > now:
            self.book.log(logging.INFO, f"{w.name()}: its other requests are done")
            w.kill_at = now

    # -- idle workers: heartbeats and memory -----------------------------------------------

    def check_heartbeats(self, now: float) -> None:
        """An idle worker proves it is alive: its loop writes a heartbeat when it wakes up
        idle (at least once a second), and serving changes its request count. One whose
        slot has not changed for ``workers.timeout`` -- SIGSTOPped, or hung outside a
        request -- is ``stuck``: killed and replaced. Measured on the master's clock from
        the last change it saw, so a master that was itself stopped never blames them:
        their beats moved meanwhile."""
        book = self.book
        limit = book.cfg.timeout
        for w in list(book.workers.values()):
            s = book.slots.get(w.pid)
            if s is None or w.stop_reason is not None or not w.ready:
                continue
            beat = s.heartbeat + s.requests + (0.5 if s.busy else 0.0)
            if beat != w.beat or s.busy:  # busy: workers.timeout is the judge
                w.beat, w.alive_at = beat, now
                continue
            silent = now - w.alive_at
            if not limit or silent <= limit:
                continue
            book.log(logging.ERROR, f"{w.name()} is idle and missed its heartbeat for "
                                    f"{silent:.0f} s (workers.timeout = {limit:.0f} s): "
                                    "stopped (SIGSTOP?) or hung outside a request; killing "
                                    "and replacing it")
            book.totals["stuck"] += 1
            book.pending_respawns += 1
            w.stop_reason = "stuck"
            book.set_state(w, WorkerState.STUCK, "missed its heartbeat")
            book.emit(MarkStuck(w.slot))
            book.emit(Signal(w.pid, signal.SIGKILL))
            w.kill_at = now + KILL_RETRY
        if book.totals["stuck"]:
            book.spawn_missing(now)

    def check_memory(self, rss: Mapping[int, int], now: float) -> None:
        """Record each worker's memory (bytes, by pid) and recycle the idle ones over
        ``workers.max_memory``."""
        book = self.book
        for pid, size in rss.items():
            w = book.workers.get(pid)
            if w is not None:
                w.rss = size
        limit = book.cfg.max_memory
        if not limit or book.phase is Phase.STOPPING:
            return
        for w in book.current():
            if w.state is not WorkerState.IDLE or w.rss <= limit:
                continue
            s = book.slots.get(w.pid)
            if s is None or not s.requests:
                # Over the limit before serving anything: recycling would only loop.
                if not self.warned_fresh_over_limit:
                    self.warned_fresh_over_limit = True
                    book.log(logging.WARNING, f"a fresh worker uses {w.rss >> 20} MiB, over "
                                              f"workers.max_memory ({limit >> 20} MiB): each "
                                              "worker is recycled after its first request; "
                                              "raise max_memory")
                continue
            # The worker checks itself after a request; one that grew and then went quiet
            # would otherwise stay over the limit for as long as no request comes.
            book.log(logging.INFO, f"{w.name()} is idle at {w.rss >> 20} MiB, over "
                                   f"workers.max_memory ({limit >> 20} MiB): recycling it")
            book.stop_worker(w, "max_memory", signal.SIGTERM, book.cfg.graceful_timeout, now)
        book.spawn_missing(now)

    # -- workers that do not exit ----------------------------------------------------------

    def escalate(self, now: float) -> None:
        """SIGKILL each worker whose time to exit is over (and again after KILL_RETRY)."""
        book = self.book
        for w in list(book.workers.values()):
            if w.kill_at and now >= w.kill_at:
                if w.stop_reason == "timeout":
                    book.log(logging.WARNING, f"{w.name()}: killing it now that its stack is "
                                              "logged")
                else:
                    book.log(logging.WARNING, f"{w.name()} did not exit within "
                                              f"graceful_timeout ({w.stop_reason}): killing it")
                book.emit(Signal(w.pid, signal.SIGKILL))
                w.kill_at = now + KILL_RETRY
