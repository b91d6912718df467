"""The master's signals: queued by the handlers, acted on by the loop."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import FcgiManagerError
from .children import HANDLED_SIGNALS

log = logging.getLogger("fcgi_manager.master")

SIGNAL_COMMANDS: Dict[int, Tuple[str, Dict[str, object]]] = {
    signal.SIGTERM: ("stop", {}), signal.SIGQUIT: ("stop", {}),
    signal.SIGINT: ("stop", {"now": True}), signal.SIGHUP: ("reload", {}),
    signal.SIGUSR1: ("reopen-logs", {}), signal.SIGTTIN: ("scale", {"value": "+1"}),
    signal.SIGTTOU: ("scale", {"value": "-1"}),
}

Command = Callable[[str, Dict[str, Any], None], Optional[Dict[str, Any]]]


class SignalQueue:
    """The signals the master got and has not acted on yet, and the wakeup pipe.

    A handler only records the signal (logging there could deadlock) and the wakeup pipe
    ends the selector's wait; the loop then turns each into the command it stands for,
    as the control socket's commands are run. A reload's exec holds the queue across
    (``execsig.py``).
    """

    def __init__(self) -> None:
        self.pending: List[int] = []
        self.wakeup_r = self.wakeup_w = -1

    def install(self) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self.wakeup_r, self.wakeup_w = r, w
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self.queue)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def queue(self, signum: int, frame: Any) -> None:
        # Only record it: the loop acts on it (logging here could deadlock).
        self.pending.append(signum)

    def drain_wakeup(self) -> None:
        try:
            while os.read(self.wakeup_r, 4096):
                pass
        except OSError:
            pass

    def handle(self, command: Command) -> None:
        """Run the command of each queued signal, in the order they came."""
        while self.pending:
            sig = self.pending.pop(0)
            action = SIGNAL_COMMANDS.get(sig)
            if action is None:
                continue  # SIGCHLD: reaping follows in this turn of the loop
            log.info("got %s: %s", signal.Signals(sig).name, action[0])
            try:
                command(action[0], dict(action[1]), None)
            except FcgiManagerError as exc:
                log.error("%s failed: %s", action[0], exc.message)
