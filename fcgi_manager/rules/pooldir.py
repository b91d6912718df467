"""The pool directory's rules, as data: which files are apps, what a reload changes, and
what happens to an app whose master dies.

Pure: no processes, no clocks, no files. :mod:`fcgi_manager.pooldir` (the parent's shell)
reads the directory, hands the parsed files here, and performs the answers.

An app is one ``DIR/*.toml``, named by ``[manager] name`` or else the file's stem. Its
*claims* are the things two masters cannot share: the name, the listening socket, the
pidfile, the control socket and the ``status.listen`` socket. Two files claiming one of
them are both refused (neither is started or changed; the rest go on), because which of
the two the operator meant cannot be guessed.

An app's life in the parent (the states ``status`` shows; the README's pool-directory
section tells them)::

    stopped --start--> starting --READY--> running --RELOADING--> reloading --READY--> running
                          ^   \\                \\
                          |    `--exit--> (backoff: still "starting") --too many--> fatal
                          `------------ restart at once <--exit (after READY)

The restart rule is the workers' (:class:`fcgi_manager.restarts.RestartTracker`): a master
that dies before it said READY, or within ``quick`` seconds, is a quick failure; from the
second in a row starts are spaced by the backoff; ``startup_limit`` in a row make the app
``fatal`` with its last error. A master that exits 0 was stopped on purpose (its own
``stop``): it stays stopped, as Supervisor's ``autorestart = unexpected`` does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .restarts import RestartTracker


class AppState(str, enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RELOADING = "reloading"
    STOPPING = "stopping"  # shown as "stopped": asked to stop, its requests finishing
    STOPPED = "stopped"
    FATAL = "fatal"

    def __str__(self) -> str:
        return self.value

    @property
    def shown(self) -> str:
        """The state ``status`` prints: five of them (stopping shows as stopped)."""
        return "stopped" if self is AppState.STOPPING else self.value


@dataclass(frozen=True)
class AppFile:
    """One parsed file: what the rules need to know of it."""

    name: str
    path: str
    digest: str  # of the file's bytes: "changed" means this changed
    claims: Tuple[Tuple[str, str], ...] = ()  # (key, value): ("listen.bind", "unix:/x")
    graceful_timeout: float = 30.0  # how long its stop may take (with shutdown_delay)
    control: str = ""


@dataclass(frozen=True)
class FileError:
    """A file that is not an app now: its config error, or a claim another file shares."""

    path: str
    name: str  # "" when the file could not be read far enough to name it
    error: str


def refuse_conflicts(files: Sequence[AppFile]) -> Tuple[List[AppFile], List[FileError]]:
    """Split files into the usable ones and those refused for sharing a claim."""
    owners: Dict[Tuple[str, str], List[AppFile]] = {}
    for f in files:
        for claim in (("name", f.name),) + f.claims:
            if claim[1]:
                owners.setdefault(claim, []).append(f)
    refused: Dict[str, str] = {}
    for (key, value), holders in sorted(owners.items()):
        if len(holders) < 2:
            continue
        paths = [h.path for h in holders]
        for h in holders:
            others = ", ".join(p for p in paths if p != h.path)
            refused.setdefault(h.path, f"{h.path}: {key} {value!r} is also claimed by "
                                       f"{others}; both are refused")
    ok = [f for f in files if f.path not in refused]
    errors = [FileError(f.path, f.name, refused[f.path]) for f in files if f.path in refused]
    return ok, errors


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload of the whole directory does, app by app (names)."""

    start: Tuple[str, ...] = ()  # new files
    stop: Tuple[str, ...] = ()  # removed files
    reload: Tuple[str, ...] = ()  # changed files, same path: the master re-reads its file
    restart: Tuple[str, ...] = ()  # changed path (a renamed file): stop, then start
    keep: Tuple[str, ...] = ()  # unchanged, or broken now (keeps its running generation)


def plan_reload(known: Dict[str, AppFile], files: Sequence[AppFile],
                broken_names: Sequence[str]) -> ReloadPlan:
    """``known``: the apps the parent has (running or not); ``files``: the usable files
    now; ``broken_names``: apps whose file is there but refused (they are kept as they
    are, never stopped for a typo)."""
    now = {f.name: f for f in files}
    start, reload, restart, keep = [], [], [], []
    for name, f in sorted(now.items()):
        old = known.get(name)
        if old is None:
            start.append(name)
        elif old.path != f.path:
            restart.append(name)
        elif old.digest != f.digest:
            reload.append(name)
        else:
            keep.append(name)
    stop = [n for n in sorted(known) if n not in now and n not in broken_names]
    keep += [n for n in sorted(known) if n not in now and n in broken_names]
    return ReloadPlan(tuple(start), tuple(stop), tuple(reload), tuple(restart), tuple(keep))


@dataclass
class App:
    """One app as the parent sees it; changed only by the methods below."""

    file: AppFile
    state: AppState = AppState.STOPPED
    pid: int = 0
    started_at: float = 0.0
    ready: bool = False
    error: str = ""  # the last failure, shown by status until the app runs again
    wanted: bool = True  # False: stopped on purpose, never restarted
    restart_after_stop: bool = False
    restarts: int = 0
    tracker: RestartTracker = field(default_factory=RestartTracker)

    def change_state(self, new: AppState) -> None:
        self.state = new

    @property
    def next_start_at(self) -> float:
        return self.tracker.next_start_at

    def due(self, now: float) -> bool:
        """Should the shell start this app's master now?"""
        return (self.wanted and self.pid == 0 and self.state is AppState.STARTING
                and self.tracker.may_start(now))

    def spawned(self, pid: int, now: float) -> None:
        self.pid, self.started_at, self.ready = pid, now, False
        self.tracker.next_start_at = 0.0
        self.change_state(AppState.STARTING)

    def notified(self, message: str) -> None:
        """An sd_notify datagram from this app's master."""
        lines = message.splitlines()
        if "READY=1" in lines and self.state is not AppState.STOPPING:
            self.ready = True
            self.error = ""
            self.tracker.reset()  # it came up: the run of failures is over
            self.change_state(AppState.RUNNING)  # starting/reloading -> running: READY
        elif "RELOADING=1" in lines and self.state is AppState.RUNNING:
            self.change_state(AppState.RELOADING)  # running -> reloading: it said so
        elif "STOPPING=1" in lines and self.state is not AppState.STOPPING:
            if self.state in (AppState.RUNNING, AppState.RELOADING):
                self.wanted = False  # stopped by its own `stop`: not a crash
            self.change_state(AppState.STOPPING)

    def start(self) -> None:
        """The operator (or a reload) wants it running: start it at once."""
        self.wanted = True
        self.tracker.reset()
        if self.pid == 0:
            self.change_state(AppState.STARTING)  # stopped/fatal -> starting: asked to

    def stop(self) -> None:
        """The operator (or a reload) wants it stopped."""
        self.wanted = False
        self.restart_after_stop = False
        if self.pid:
            self.change_state(AppState.STOPPING)  # -> stopping: asked to
        else:
            self.change_state(AppState.STOPPED)  # never started, or waiting: just stop

    def exited(self, now: float, code: Optional[int], how: str, last_words: str) -> None:
        """Its master was reaped: ``code`` is the exit code (None for a signal)."""
        lived = now - self.started_at
        self.pid = 0
        if self.restart_after_stop:
            self.restart_after_stop = False
            self.start()
            return
        if not self.wanted or (code == 0 and self.ready):
            self.wanted = False
            self.change_state(AppState.STOPPED)  # stopped on purpose
            return
        self.error = f"master {how}" + (f": {last_words}" if last_words else "")
        self.restarts += 1
        if self.tracker.is_quick(lived, 1 if self.ready else 0):
            self.tracker.failed(now)
            if self.tracker.startup_exhausted():
                self.wanted = False
                self.change_state(AppState.FATAL)  # -> fatal: crash loop
                return
            self.tracker.delay_from(now)
        self.ready = False
        self.change_state(AppState.STARTING)  # -> starting: restart (maybe after backoff)


def stop_deadline(apps: Sequence[App], margin: float = 10.0) -> float:
    """Seconds a graceful stop of ``apps`` may take before their masters are killed: the
    largest graceful_timeout (and drain) of them, plus the masters' own margin."""
    return max([a.file.graceful_timeout for a in apps] or [0.0]) + margin


