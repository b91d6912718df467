"""Worker states, and which transitions between them are legal.

The master sees a worker's life as::

    STARTING --ready--> IDLE <--request--> BUSY
        \\                 \\ \\                \\
         \\                 \\ `--no heartbeat--> STUCK --killed--> (reaped)
          `-----------------`------------------`--> STOPPING --exit--> (reaped)

``starting``: forked, importing the app (preload=false) or setting up.
``idle``: waiting for a connection or a request on a kept connection.
``busy``: running a request (timed against ``workers.timeout`` and ``slow_request``).
``stopping``: asked to stop (stop, reload, recycle, scale down), or leaving on its own
(max_requests, max_memory: it says so at once); finishing its requests.
``stuck``: idle, but its heartbeat stopped for ``workers.timeout`` (SIGSTOPped, or hung
outside a request): killed and replaced.

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
    STUCK = "stuck"

    def __str__(self) -> str:
        return self.value


STATE_CODES = {WorkerState.STARTING: 1, WorkerState.IDLE: 2, WorkerState.BUSY: 3,
               WorkerState.STOPPING: 4, WorkerState.STUCK: 5}
STATE_NAMES = {code: state for state, code in STATE_CODES.items()}

# Transitions the master itself makes (workers move between idle and busy on their own).
ALLOWED = {
    WorkerState.STARTING: {WorkerState.IDLE, WorkerState.STOPPING},  # ready, or asked to stop
    # a request; stop/recycle; its heartbeat stopped
    WorkerState.IDLE: {WorkerState.BUSY, WorkerState.STOPPING, WorkerState.STUCK},
    WorkerState.BUSY: {WorkerState.IDLE, WorkerState.STOPPING},  # done; stop after request
    WorkerState.STOPPING: set(),  # only reaping ends it
    WorkerState.STUCK: {WorkerState.STOPPING},  # a stop while it is being killed
}


def can_change(old: WorkerState, new: WorkerState) -> bool:
    return new in ALLOWED[old]
