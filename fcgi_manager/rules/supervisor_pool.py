"""The pool's size: how many workers the current generation should have (``Book.target``),
and getting there.

The mode's rules (``pool.PoolSizer``) decide from what the scoreboard shows; the ``scale``
command sets the number by hand; a static pool's scale survives a reload. Workers beyond
the target are retired, idle ones first, newest first; the missing ones are spawned.
"""

from __future__ import annotations

import logging
import signal
from typing import Any, Dict, Mapping

from ..wire.states import WorkerState
from .pool import PoolSizer, PoolView, threaded_view
from .supervisor_actions import Reply, WatchListener
from .supervisor_book import Book, Phase


class PoolSizing:
    """Sets the target and brings the current generation to it. The one part that turns
    demand into a number of workers: the other parts spawn only what the target lacks and
    never change it, so a pool's size has one author."""

    def __init__(self, book: Book) -> None:
        self.book = book
        self.sizer = PoolSizer(book.cfg)

    def manage(self, now: float, listener_waiting: bool = False) -> None:
        """Bring the current generation to the size its mode wants (see pool.py)."""
        book = self.book
        if book.phase is Phase.STOPPING:
            return
        if book.cfg.mode != "static" and (book.reload is None or book.reload.validating):
            self._resize(now, listener_waiting)
        count = book.current_count()
        if count < book.target:
            book.spawn_missing(now)
        elif count > book.target:
            # Retire idle workers first, newest first.
            extra = count - book.target
            ranked = sorted(book.current(), key=lambda w: (w.state is WorkerState.BUSY,
                                                           -w.started))
            for w in ranked[:max(0, extra)]:
                book.stop_worker(w, "scaled down", signal.SIGTERM, book.cfg.graceful_timeout,
                                 now)

    def _resize(self, now: float, listener_waiting: bool) -> None:
        book = self.book
        cfg = book.cfg
        current = book.current()
        idle = busy = starting = free_threads = with_room = 0
        idle_since: Dict[int, float] = {}
        for w in current:
            if not w.ready:
                starting += 1
                continue
            s = book.slots.get(w.pid)
            free = (s.threads - s.in_flight) if s else 1
            free_threads += free
            with_room += free > 0
            requests = s.requests if s else w.requests
            if w.state is WorkerState.BUSY or requests != w.requests:
                w.requests = requests
                w.idle_since = now
            if w.state is WorkerState.BUSY:
                busy += 1
            else:
                idle += 1
                idle_since[w.pid] = w.idle_since
        starting += sum(1 for gen, _ in book.pending.values() if gen == book.generation)
        waiting = max(book.queue, 0)
        threads = cfg.threads
        if threads > 1:  # demand is busy threads, not busy processes
            idle, busy, waiting = threaded_view(cfg.mode, threads, free_threads, with_room,
                                                idle + busy, waiting)
        if cfg.mode == "ondemand" and not waiting and not idle and listener_waiting:
            waiting = 1
        view = PoolView(total=len(current), idle=idle, busy=busy, starting=starting, now=now,
                        idle_since=idle_since, waiting=waiting)
        decision = self.sizer.decide(view)
        if decision.reached_max:
            book.totals["max_children_reached"] += 1
            book.log(logging.WARNING, f"the pool is at workers.max_workers "
                                      f"({cfg.max_workers}) and requests are waiting: "
                                      "raise max_workers if memory allows")
        for pid in decision.retire:
            idler = book.workers.get(pid)
            if idler is not None:
                book.stop_worker(idler, "idle (pool shrinking)", signal.SIGTERM,
                                 cfg.graceful_timeout, now)
        book.target = len(current) - len(decision.retire) + decision.spawn
        if cfg.mode == "ondemand":
            # Only when no worker can take a new connection: none idle (counting the ones
            # retired now), none starting or about to (watching then would wake the loop
            # without pause until the starting worker accepts).
            book.emit(WatchListener(idle <= len(decision.retire) and not starting
                                    and not decision.spawn
                                    and book.target < cfg.max_workers))

    # -- by hand, and across a reload ------------------------------------------------------

    def scale(self, value: str, client: Any, now: float) -> None:
        """The ``scale`` command: ``N``, ``+N`` or ``-N`` workers."""
        book = self.book
        cfg = book.cfg
        value = value.strip()
        try:
            new = book.target + int(value) if value.startswith(("+", "-")) else int(value)
        except ValueError:
            book.emit(Reply(client, False, error=f"scale: {value!r} is not N, +N or -N"))
            return
        limit = cfg.max_workers if cfg.mode != "static" else book.max_slots
        if new < 0 or new > limit:
            book.emit(Reply(client, False, error=f"scale: {new} workers is outside 0..{limit}"))
            return
        if new == 0 and cfg.mode == "static":
            book.emit(Reply(client, False, error="scale: a static pool needs at least 1 worker"))
            return
        old, book.target = book.target, new
        book.log(logging.INFO, f"scaling from {old} to {new} workers")
        self.manage(now)
        book.emit(Reply(client, True, {"workers": new, "was": old}))

    def carry_scale(self, before: Mapping[str, Any]) -> None:
        """A static pool's ``scale`` survives a reload (a deploy in the middle of a traffic
        peak keeps its extra workers), unless ``workers.count`` changed in the file: the
        edited file then wins. Either way the log says which."""
        book = self.book
        cfg = book.cfg
        if cfg.mode != "static" or before.get("mode") != "static":
            return
        scaled, configured = int(before.get("target", 0)), int(before.get("configured", 0))
        if scaled == configured or not scaled:
            return
        if cfg.effective_count != configured:
            book.log(logging.INFO, f"reload: workers.count is now {cfg.effective_count} "
                                   f"in the config: it replaces the earlier scale to {scaled} "
                                   "workers")
            return
        book.target = scaled
        book.log(logging.INFO, f"reload: keeping the scale to {scaled} workers (workers.count "
                               f"is {configured}; change it in the config, or scale again, "
                               "to change the count)")

    def scale_state(self) -> Dict[str, Any]:
        """What :meth:`carry_scale` needs from the image before a reload."""
        return {"mode": self.book.cfg.mode, "target": self.book.target,
                "configured": self.book.cfg.effective_count}
