"""Worker states, and which transitions between them are legal.

The master sees a worker's life as::

    STARTING --ready--> IDLE <--request--> BUSY
        \\                 \\                  \\
         `-----------------`------------------`--> STOPPING --exit--> (reaped)

``starting``: forked, importing the app (preload=false) or setting up.
``idle``: waiting for a connection or a request on a kept connection.
``busy``: running a request (timed against ``workers.timeout`` and ``slow_request``).
``stopping``: asked to stop (stop, reload, recycle, scale down); finishing its request.

Workers write their own ``idle``/``busy`` to the scoreboard, and the supervisor follows
them at each tick; the supervisor alone moves a worker to ``stopping`` (and the master
marks its slot, so status shows it), through one method that checks ``ALLOWED`` and logs
``old -> new (reason)``.
"""

from __future__ import annotations

import enum


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"

    def __str__(self) -> str:
        return self.value


STATE_CODES = {WorkerState.STARTING: 1, WorkerState.IDLE: 2, WorkerState.BUSY: 3,
               WorkerState.STOPPING: 4}
STATE_NAMES = {code: state for state, code in STATE_CODES.items()}

# Transitions the master itself makes (workers move between idle and busy on their own).
ALLOWED = {
    WorkerState.STARTING: {WorkerState.IDLE, WorkerState.STOPPING},  # ready, or asked to stop
    WorkerState.IDLE: {WorkerState.BUSY, WorkerState.STOPPING},  # a request; stop/recycle
    WorkerState.BUSY: {WorkerState.IDLE, WorkerState.STOPPING},  # done; stop after request
    WorkerState.STOPPING: set(),  # only reaping ends it
}


def can_change(old: WorkerState, new: WorkerState) -> bool:
    return new in ALLOWED[old]
