"""What the supervisor asks of the shell: the :data:`Action` s ``Supervisor.handle`` returns.

Spawn, signal, mark a slot, reply to a client, validate, re-exec, notify, log, exit: frozen
dataclasses the shell (``master/shell.py``) performs in order. Every part of the supervisor
(``supervisor_book``, ``supervisor_reload``, ``supervisor_health``, ``supervisor_pool``,
``supervisor_stop``) emits them, so they live apart from the events, which only
``supervisor.py`` reads; ``supervisor`` re-exports them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True)
class Spawn:
    slot: int
    generation: int
    worker_id: int = 0  # the id it shows: its predecessor's (0: the slot's number + 1)


@dataclass(frozen=True)
class Signal:
    pid: int
    sig: int


@dataclass(frozen=True)
class MarkStopping:
    slot: int


@dataclass(frozen=True)
class MarkStuck:
    slot: int


@dataclass(frozen=True)
class MarkSlowDumped:
    slot: int
    request_no: int


@dataclass(frozen=True)
class Reply:
    client: Any
    ok: bool
    result: Any = None
    error: str = ""


@dataclass(frozen=True)
class Validate:
    """Check the new config and code in a throwaway process; answer with ValidationDone."""


@dataclass(frozen=True)
class CancelValidation:
    pass


@dataclass(frozen=True)
class ReExec:
    """Replace the master's image with fresh code (it resumes from ``resume_workers``)."""


@dataclass(frozen=True)
class NotifySystemd:
    message: str


@dataclass(frozen=True)
class ReportReady:
    """The end of the start: tell whoever waits for it (the start handshake, systemd)."""

    ok: bool
    text: str = ""


@dataclass(frozen=True)
class CloseListener:
    pass


@dataclass(frozen=True)
class SetDraining:
    """Flag the scoreboard: the workers' ping path answers 503 ``draining``."""


@dataclass(frozen=True)
class WatchListener:
    on: bool


@dataclass(frozen=True)
class Log:
    level: int
    message: str


@dataclass(frozen=True)
class Exit:
    code: int


Action = Union[Spawn, Signal, MarkStopping, MarkStuck, MarkSlowDumped, Reply, Validate,
               CancelValidation, ReExec, NotifySystemd, ReportReady, CloseListener,
               SetDraining, WatchListener, Log, Exit]
