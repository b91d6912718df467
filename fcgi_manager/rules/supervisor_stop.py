"""The stop: DRAINING (a graceful stop's ``manager.shutdown_delay``) and STOPPING.

A graceful stop with a delay first drains: the ping path answers 503 ``draining`` while
every other request is served, so that load balancers take the instance out; then every
worker gets SIGTERM and ``workers.graceful_timeout`` to finish. A stop now (SIGINT) cuts
either short. The master exits once no worker is left (``Supervisor.handle``).
"""

from __future__ import annotations

import logging
import signal

from .supervisor_actions import CloseListener, NotifySystemd, SetDraining
from .supervisor_book import Book, Phase
from .supervisor_reload import Reloads


class Stopping:
    """Takes the master through DRAINING and STOPPING, and holds what only a stop needs
    (the delay, when the drain ends, whether the stop is one now). Stops come from a
    command, a signal, the end of the drain, a failed start or pidfile; one place decides
    how each of them ends the reload in progress, and the workers."""

    def __init__(self, book: Book, reloads: Reloads, shutdown_delay: float) -> None:
        self.book = book
        self.reloads = reloads
        self.shutdown_delay = shutdown_delay
        self.draining_until = 0.0
        self.stop_now = False

    def request(self, now: bool, at: float) -> None:
        """A stop as asked for: a graceful one drains first with manager.shutdown_delay."""
        if not now and self.shutdown_delay > 0 and self.book.phase in (
                Phase.RUNNING, Phase.RELOADING, Phase.DRAINING):
            self._drain(at)
        else:
            self.stop(now, at)

    def drain_left(self, at: float) -> float:
        """Seconds before the graceful stop begins (0 when not draining)."""
        if self.book.phase is not Phase.DRAINING:
            return 0.0
        return max(0.0, self.draining_until - at)

    def _drain(self, at: float) -> None:
        """The first part of a graceful stop with ``manager.shutdown_delay``: the ping path
        answers 503 "draining" while every other request is served as before, so that load
        balancers (a Kubernetes readiness probe, an nginx health check) take this instance
        out before it stops accepting. A tick begins the stop when the delay is over."""
        book = self.book
        if book.phase is Phase.DRAINING:
            book.log(logging.INFO, f"already draining: the graceful stop begins in "
                                   f"{self.drain_left(at):.1f} s")
            return
        self.reloads.end_for_stop()
        self.draining_until = at + self.shutdown_delay
        book.set_phase(Phase.DRAINING, "graceful stop with manager.shutdown_delay")
        book.emit(SetDraining())
        book.emit(NotifySystemd("STOPPING=1"))
        book.log(logging.INFO, f"draining: the ping path answers 503 for "
                               f"{self.shutdown_delay:.1f} s (manager.shutdown_delay) while "
                               "requests are still served; then the graceful stop")

    def check_drain(self, now: float) -> None:
        """At a tick: the graceful stop begins once the drain is over."""
        if self.book.phase is Phase.DRAINING and now >= self.draining_until:
            self.book.log(logging.INFO, "shutdown_delay is over: stopping gracefully")
            self.stop(False, now)

    def stop(self, now: bool, at: float) -> None:
        """Stop every worker: gracefully (SIGTERM, ``workers.graceful_timeout``), or now
        (SIGINT), which also cuts a graceful stop short."""
        book = self.book
        if book.phase is Phase.STOPPING and (self.stop_now or not now):
            return
        first = book.phase is not Phase.STOPPING
        self.stop_now = now
        grace = 0.0 if now else book.cfg.graceful_timeout
        if first:
            drained = book.phase is Phase.DRAINING
            book.set_phase(Phase.STOPPING, "stop now" if now else "graceful stop")
            book.emit(SetDraining())  # pings on kept connections say so too
            if not drained:
                book.emit(NotifySystemd("STOPPING=1"))
            # Our copy of the listening socket goes first, so that it closes for good as
            # soon as the workers have taken what is queued and closed theirs.
            book.emit(CloseListener())
            self.reloads.end_for_stop()
        for w in list(book.workers.values()):
            book.stop_worker(w, "stop", signal.SIGINT if now else signal.SIGTERM, grace, at)
