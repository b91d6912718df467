"""How a worker ended, and when the next one may start: the restart rules, as data.

Pure: no clocks, no processes. The supervisor asks these questions with the times it was
given.

Exit classification (``classify``) reads the wait status together with why the master
asked the worker to stop, if it did::

    exit code 3 (EXIT_BOOT_ERROR), or a boot error sent   -> BOOT_ERROR
    exit code 10/11 (served max_requests / over max_memory) -> RECYCLED
    asked to stop for max_memory (seen idle by the master) -> RECYCLED
    asked to stop for workers.timeout                     -> TIMED_OUT
    asked to stop for any other reason                    -> STOPPED
    anything else                                         -> CRASHED

Restart intensity (Erlang/OTP's "at most R restarts in T seconds", systemd's
``StartLimitBurst``), stated once in :class:`RestartPolicy`: a worker that dies within
``quick`` seconds without serving a request is a *quick failure*. From the second quick
failure in a row, starts are spaced by an exponential backoff (0.2, 0.4, ... up to
``max_delay`` s) and made one at a time; the run of failures ends when a worker started
after the last one is healthy (served a request, or stayed up ``quick`` seconds). While
the master is starting, ``startup_limit`` quick failures in a row end the start.
"""

from __future__ import annotations

import enum
import os
import signal
from dataclasses import dataclass
from typing import Optional

from ..wire.codes import EXIT_BOOT_ERROR, EXIT_RECYCLE_MEMORY, EXIT_RECYCLE_REQUESTS


class ExitKind(enum.Enum):
    BOOT_ERROR = "boot error"
    RECYCLED = "recycled"
    TIMED_OUT = "timed out"
    STOPPED = "stopped"
    CRASHED = "crashed"


def describe_exit(status: int) -> str:
    """How a child ended, the way an operator wants to read it."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        core = " (core dumped)" if os.WCOREDUMP(status) else ""
        return f"was killed by signal {sig} ({name}){core}"
    return f"exited with code {os.WEXITSTATUS(status)}"


def recycle_reason(status: int, stop_reason: Optional[str]) -> str:
    """Which limit a recycled worker reached."""
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_RECYCLE_REQUESTS:
        return "max_requests"
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_RECYCLE_MEMORY:
        return "max_memory"
    return stop_reason or "recycled"


def classify(status: int, stop_reason: Optional[str], boot_error: bool) -> ExitKind:
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    if code == EXIT_BOOT_ERROR or boot_error:
        return ExitKind.BOOT_ERROR
    if code in (EXIT_RECYCLE_REQUESTS, EXIT_RECYCLE_MEMORY) or stop_reason == "max_memory":
        return ExitKind.RECYCLED
    if stop_reason == "timeout":
        return ExitKind.TIMED_OUT
    if stop_reason is not None:
        return ExitKind.STOPPED
    return ExitKind.CRASHED


@dataclass(frozen=True)
class RestartPolicy:
    """The crash-loop rule, as numbers (see the module docstring)."""

    quick: float = 5.0  # a death sooner than this, before any request, is a quick failure
    base_delay: float = 0.1
    max_delay: float = 30.0
    backoff_from: int = 2  # quick failures in a row before starts are spaced
    startup_limit: int = 5  # quick failures in a row that end a start

    def delay(self, failures: int) -> float:
        """Seconds to wait before the next start, after ``failures`` quick failures."""
        if failures < self.backoff_from:
            return 0.0
        return min(self.max_delay, self.base_delay * 2.0 ** min(failures - 1, 10))


class RestartTracker:
    """The run of quick failures and the time the next start is allowed."""

    def __init__(self, policy: RestartPolicy = RestartPolicy()) -> None:
        self.policy = policy
        self.failures = 0
        self.last_failure_at = 0.0
        self.next_start_at = 0.0  # 0 = no wait

    @property
    def backing_off(self) -> bool:
        return self.failures >= self.policy.backoff_from

    def is_quick(self, lived: float, served: int) -> bool:
        return lived < self.policy.quick and not served

    def failed(self, now: float) -> None:
        """Count a quick failure."""
        self.failures += 1
        self.last_failure_at = now

    def delay_from(self, now: float) -> float:
        """Start the backoff the failures so far call for; its length (0 = none)."""
        delay = self.policy.delay(self.failures)
        if delay:
            self.next_start_at = now + delay
        return delay

    def may_start(self, now: float) -> bool:
        return not self.next_start_at or now >= self.next_start_at

    def is_healthy(self, started: float, now: float, served: int) -> bool:
        """Does a worker started at ``started`` end the run of failures?"""
        return started > self.last_failure_at and (now - started >= self.policy.quick
                                                   or served > 0)

    def reset(self) -> None:
        self.failures = 0
        self.next_start_at = 0.0

    def startup_exhausted(self) -> bool:
        return self.failures >= self.policy.startup_limit
