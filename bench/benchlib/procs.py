"""Start, watch and stop the processes of a benchmark run.

Every process is started in a session of its own, so a Ctrl-C typed in the terminal reaches
only the harness, which then stops everything in order from its ``finally`` block instead of
leaving servers half-killed. Processes are stopped by PID: SIGTERM, then SIGKILL once a
deadline passes. The processes a server forked (its workers) are stopped the same way, found
both as its descendants and as members of the session it was started in, so that workers
orphaned by a crashed master are not left behind either.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import psutil

POLL_INTERVAL_S = 0.05


class StartError(RuntimeError):
    """A process exited or did not become ready before its deadline."""


@dataclass
class Child:
    """One process started by the harness, with the file its output goes to."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        """The end of the process's output, to explain why it failed."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _session_members(sid: int) -> List[psutil.Process]:
    """Processes still in session ``sid``: a server's workers even after its master died."""
    members = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != sid and os.getsid(proc.pid) == sid:
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


def family(pid: int) -> List[psutil.Process]:
    """The descendants of ``pid`` plus the rest of its session, without ``pid`` itself."""
    found: Dict[int, psutil.Process] = {}
    try:
        for proc in psutil.Process(pid).children(recursive=True):
            found[proc.pid] = proc
    except psutil.Error:
        pass
    for proc in _session_members(pid):
        found.setdefault(proc.pid, proc)
    return list(found.values())


def _terminate(procs: Sequence[psutil.Process], deadline_s: float) -> None:
    """SIGTERM each process, then SIGKILL whatever is still alive after the deadline."""
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=deadline_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=deadline_s)


class ProcessRegistry:
    """Every process the harness started, so one ``finally`` can stop them all."""

    def __init__(self) -> None:
        self._children: List[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[Path] = None,
    ) -> Child:
        """Start ``argv`` in a new session with stdout and stderr appended to ``log_path``."""
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(cwd) if cwd else None,
                start_new_session=True,
            )
        child = Child(name=name, popen=popen, log_path=log_path)
        self._children.append(child)
        return child

    def stop(self, child: Child, deadline_s: float = 10.0) -> Optional[int]:
        """Stop ``child`` and everything it forked; return its exit status."""
        workers = family(child.pid)
        if child.running():
            try:
                os.kill(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                child.popen.wait(timeout=deadline_s)
            except subprocess.TimeoutExpired:
                child.popen.kill()
                child.popen.wait(timeout=deadline_s)
        leftovers = [p for p in workers if _alive(p)] + family(child.pid)
        if leftovers:
            _terminate(leftovers, deadline_s)
        if child in self._children:
            self._children.remove(child)
        return child.popen.returncode

    def stop_all(self, deadline_s: float = 10.0) -> None:
        """Stop every process still registered, the most recently started first."""
        for child in reversed(list(self._children)):
            self.stop(child, deadline_s)


def _alive(proc: psutil.Process) -> bool:
    """True while ``proc`` (the same process, not a reused PID) has not exited."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_until(
    check: Callable[[], bool], deadline_s: float, what: str, child: Optional[Child] = None
) -> None:
    """Poll ``check`` until it is true; fail early if ``child`` exits, or at the deadline."""
    end = time.monotonic() + deadline_s
    while not check():
        if child is not None and not child.running():
            raise StartError(
                f"{what}: {child.name} exited with status {child.popen.returncode}\n"
                f"{child.log_tail()}"
            )
        if time.monotonic() > end:
            tail = f"\n{child.log_tail()}" if child is not None else ""
            raise StartError(f"{what}: not ready after {deadline_s:.0f} s{tail}")
        time.sleep(POLL_INTERVAL_S)


def unix_socket_accepts(path: Path) -> bool:
    """True once something listens on the unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
