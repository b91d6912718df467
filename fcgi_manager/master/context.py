"""What the parts of the master's shell share (``shell`` and the modules it is made of)."""

from __future__ import annotations

import os
import random
import selectors
import socket
import time
from typing import Callable, Optional

from .. import logs
from ..config import Config, WorkersConfig
from ..privileges import RunAs
from ..rules import supervisor as sv
from ..scoreboard import Scoreboard
from .control_server import ControlServer


class MasterContext:
    """The resources every part of the master's shell uses, owned by :class:`Master`.

    The scoreboard, the listening socket and the control server are made (or adopted
    after a reload's exec) while the master prepares, and the listener is closed when it
    stops: the parts read them here each time rather than keep a copy that goes stale.
    ``feed`` gives the supervisor an event and performs its actions.
    """

    def __init__(self, cfg: Config, log_handler: logs.ReopenableHandler, user: RunAs,
                 sup: sv.Supervisor, feed: Callable[[sv.Event], None]) -> None:
        self.cfg = cfg
        self.log_handler = log_handler
        self.user = user
        self.sup = sup
        self.feed = feed
        self.selector = selectors.DefaultSelector()
        self.board = Scoreboard(0)  # replaced when the master prepares
        self.listener: Optional[socket.socket] = None
        self.control: Optional[ControlServer] = None
        self.started_at = time.time()


def worker_uid(user: RunAs) -> int:
    """The uid the workers run as (the kernel's word on a hand-off's sender)."""
    return user.uid if user.switching and user.uid is not None else os.geteuid()


def max_requests(workers: WorkersConfig) -> int:
    """A new worker's ``max_requests``, with its jitter drawn."""
    if not workers.max_requests:
        return 0
    return workers.max_requests + (random.randint(0, workers.max_requests_jitter)
                                   if workers.max_requests_jitter else 0)
