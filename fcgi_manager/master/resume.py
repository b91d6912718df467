"""What a reloading master hands to its own re-executed image: :class:`ResumeState`.

A reload with fresh code re-executes the master in place (same pid, so pidfiles and
supervisors stay valid). The old image writes its state as JSON into a memfd and names
that descriptor in ``FCGI_MANAGER_RESUME``; every descriptor listed in the state (the
listening socket, the control socket, the scoreboard's memfd, the death pipe, each old
worker's output and notify pipes, the control connections waiting for the reload's
answer) is made inheritable first. ``FCGI_MANAGER_RESUME_CONFIG`` names the config file
by its absolute path: the command line may have named it relative to a directory the
master has since left. Both variables are removed from the environment when read, so
they never reach a worker or the app.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from ..errors import FcgiManagerError

RESUME_ENV = "FCGI_MANAGER_RESUME"
RESUME_CONFIG_ENV = "FCGI_MANAGER_RESUME_CONFIG"


@dataclass
class ResumedWorker:
    slot: int
    pid: int
    generation: int
    started: float  # monotonic: the clock carries across exec
    out_fd: int
    notify_fd: int
    stop_reason: Optional[str] = None
    kill_at: float = 0.0
    ready: bool = True


@dataclass
class ResumeState:
    listener_fd: int
    sock_inode: int
    control_fd: int
    board_fd: int
    death_r: int
    death_w: int
    started_at: float
    generation: int
    totals: Dict[str, int]
    max_queue: int
    workers: List[ResumedWorker] = field(default_factory=list)
    waiter_fds: List[int] = field(default_factory=list)
    scale: Dict[str, Any] = field(default_factory=dict)  # see Supervisor.scale_state
    zygote_pid: int = 0  # the old image's zygote: it exits when the image goes
    handoff_fds: Optional[List[int]] = None  # the kept-connection hand-off socketpair
    handoff_uid: int = -1  # the uid of its generation's workers (-1: unknown, not taken from)

    def descriptors(self) -> List[int]:
        """Every descriptor the new image must inherit."""
        fds = [self.listener_fd, self.control_fd, self.board_fd, self.death_r, self.death_w]
        for w in self.workers:
            fds += [w.out_fd, w.notify_fd]
        fds += self.handoff_fds or []
        return [fd for fd in fds + self.waiter_fds if fd >= 0]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ResumeState:
        raw = json.loads(data.decode())
        workers = [ResumedWorker(**w) for w in raw.pop("workers")]
        return cls(workers=workers, **raw)

    def to_environment(self, env: Dict[str, str], config_path: str) -> int:
        """Write the state into a memfd named in ``env``; the memfd (to keep open)."""
        fd = os.memfd_create("fcgi-manager-state", 0)  # no MFD_CLOEXEC: read after exec
        os.write(fd, self.to_json())
        os.lseek(fd, 0, os.SEEK_SET)
        env[RESUME_ENV] = str(fd)
        if config_path:
            env[RESUME_CONFIG_ENV] = config_path
        return fd


def resuming() -> bool:
    """Is this process a master re-executed by a reload (state not taken yet)?"""
    return bool(os.environ.get(RESUME_ENV))


def take_config_path() -> str:
    """The config file a reloading master named for its new image ('' if none)."""
    path = os.environ.pop(RESUME_CONFIG_ENV, "")
    return path if resuming() else ""


def take_state() -> Optional[ResumeState]:
    """The state the old image left, or None when this is no reload."""
    fd_text = os.environ.pop(RESUME_ENV, "")
    if not fd_text:
        return None
    try:
        with os.fdopen(int(fd_text), "rb") as f:
            return ResumeState.from_json(f.read())
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise FcgiManagerError(f"cannot read the state passed across reload: {exc}") from None
