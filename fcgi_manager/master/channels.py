"""The master's hand-off channels: idle kept connections passed worker to worker, one
channel per generation (``worker/handoff.py``)."""

from __future__ import annotations

import logging
import signal
import time
from typing import Dict, List, Optional, Tuple

from ..privileges import RunAs
from ..rules import supervisor as sv
from ..worker.handoff import HandoffChannel
from .context import worker_uid

log = logging.getLogger("fcgi_manager.master")

CHANNEL_DRAIN_AFTER = 1.0  # seconds the new workers have to take the old generation's last


class HandoffChannels:
    """Each generation's hand-off channel, from before its first worker forks until after
    its last one exited.

    A reload's new generation also takes from the old generation's channel, so that the
    old workers hand their idle kept connections on instead of closing them under nginx;
    when and how a channel is shut, drained and closed follows from which generations
    still have workers (the supervisor's records), which is what this part tracks.
    """

    def __init__(self, sup: sv.Supervisor, user: RunAs) -> None:
        self.sup = sup
        self.user = user
        self.by_generation: Dict[int, HandoffChannel] = {}
        self.taken_generation = 0  # the older generation whose channel new workers take from
        self.retire_at = 0.0  # when that channel, shut, is drained and closed

    def adopt(self, generation: int, fds: List[int], uid: int) -> None:
        """The old generation's channel, carried across a reload's exec: it is shut and
        closed when that generation ends."""
        old = HandoffChannel.from_fds(fds)
        old.uid = uid
        if old.uid < 0:
            old.shut()  # the new workers take nothing: the old ones close theirs
        self.by_generation[generation] = old

    def channel(self, generation: int) -> HandoffChannel:
        """The hand-off channel of ``generation``, made before its first worker forks."""
        channel = self.by_generation.get(generation)
        if channel is None:
            channel = self.by_generation[generation] = HandoffChannel.create()
            channel.uid = worker_uid(self.user)
        return channel

    def take_previous(self, generation: int) -> Optional[Tuple[int, HandoffChannel]]:
        """The channel of the generation a reload replaces, while it has workers:
        ``generation``'s workers take from it too (its receive end only), so that the
        old workers hand their idle kept connections on instead of closing them under
        nginx. Its gate admits only the old generation's own workers."""
        alive = {w.generation for w in self.sup.workers.values()}
        channels = self.by_generation
        older = [g for g in channels if g < generation and g in alive
                 and not channels[g].closed and channels[g].uid >= 0]
        if not older:
            return None
        g = max(older)
        self.taken_generation = g
        return g, channels[g]

    def retire(self) -> None:
        """A generation's channel ends with its last worker: drain what is queued (nobody
        would take it) and close it, so that nothing left behind can use it.

        The channel the current generation's workers also take from (a reload's old one)
        is shut at once -- nothing can be sent on it any more -- but drained a moment
        later: what its last worker handed on just before it exited is taken first."""
        alive = {w.generation for w in self.sup.workers.values()}
        alive |= {gen for gen, _ in self.sup.pending.values()}
        now = time.monotonic()
        for generation in [g for g in self.by_generation
                           if g != self.sup.generation and g not in alive]:
            channel = self.by_generation[generation]
            if generation == self.taken_generation and channel.uid >= 0:
                if not channel.closed:
                    channel.shut()
                    self.retire_at = now + CHANNEL_DRAIN_AFTER
                if now < self.retire_at:
                    continue
            del self.by_generation[generation]
            channel.shut()
            dropped = channel.drain()
            if dropped:
                log.info("closed %d kept connection(s) left in generation %d's hand-off "
                         "channel", dropped, generation)
            channel.close()

    def before_signal(self, pid: int, sig: int) -> None:
        """Before an older generation's worker is told to stop, its channel is shut: its
        siblings stop too, so a connection handed on there would wait for nobody; they
        close them instead."""
        w = self.sup.workers.get(pid)
        if w is not None and w.generation != self.sup.generation \
                and w.generation != self.taken_generation \
                and sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGKILL):
            channel = self.by_generation.get(w.generation)
            if channel is not None:
                channel.shut()

    def shut_all(self) -> None:
        for channel in self.by_generation.values():
            channel.shut()  # nobody is left to take a kept connection

    def fds(self) -> List[int]:
        fds: List[int] = []
        for channel in self.by_generation.values():
            fds += channel.fds()
        return fds

    def current(self) -> Optional[HandoffChannel]:
        """The current generation's channel, if it has one (a reload's exec carries it)."""
        return self.by_generation.get(self.sup.generation)
