"""The pool directory as the parent reads it and applies it: each ``*.toml`` parsed as an
app (or refused), and a reload -- ``HUP``, ``--watch``, the ``reload`` command -- turned
from :func:`rules.pooldir.plan_reload`'s plan into starts, stops and reloads of masters.
"""

from __future__ import annotations

import glob
import hashlib
import os
import signal
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .. import config as config_mod
from ..errors import FcgiManagerError
from ..rules.pooldir import (
    App,
    AppFile,
    AppState,
    FileError,
    ReloadPlan,
    plan_reload,
    refuse_conflicts,
)
from .pooldir_masters import Masters, Say

# -- reading the directory -------------------------------------------------------------------


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def read_app(path: str) -> Union[AppFile, FileError]:
    """One file as an app, or its config error (which names the file and the key)."""
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        cfg = config_mod.load(path)
    except FcgiManagerError as exc:
        text = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
        return FileError(path, _stem(path), text)
    except OSError as exc:
        return FileError(path, _stem(path), f"{path}: cannot read it: {exc.strerror}")
    claims: List[Tuple[str, str]] = []
    for bind in (cfg.listen.bind, getattr(cfg.status, "listen", "")):
        if bind and not bind.startswith("fd:") and bind != "systemd":
            claims.append(("socket", bind))
    claims += [("pidfile", cfg.manager.pidfile), ("control socket", cfg.manager.control)]
    return AppFile(name=cfg.manager.name or _stem(path), path=path, digest=digest,
                   claims=tuple(claims),
                   graceful_timeout=cfg.workers.graceful_timeout + cfg.manager.shutdown_delay,
                   control=cfg.manager.control)


def scan(directory: str) -> Tuple[List[AppFile], List[FileError]]:
    """Every ``*.toml`` of the directory: the usable apps, and the files refused."""
    if not os.access(directory, os.R_OK | os.X_OK):
        raise FcgiManagerError(f"cannot read the pool directory {directory}",
                               "check its permissions")
    paths = sorted(glob.glob(os.path.join(glob.escape(os.path.abspath(directory)), "*.toml")))
    parsed = [read_app(p) for p in paths]
    files = [p for p in parsed if isinstance(p, AppFile)]
    errors = [p for p in parsed if isinstance(p, FileError)]
    usable, refused = refuse_conflicts(files)
    return usable, errors + refused


def directory_signature(directory: str) -> Tuple[Tuple[Any, ...], ...]:
    """What ``--watch`` compares: each ``*.toml``'s name, inode, size and mtime."""
    out = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return ()
    for name in names:
        if not name.endswith(".toml"):
            continue
        try:
            st = os.stat(os.path.join(directory, name))
        except OSError:
            continue
        out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


# -- applying it --------------------------------------------------------------------------


class Reloader:
    """The directory applied to the pool's apps: a reload, a refused file, a file added
    since, and ``--watch``'s look at the directory.

    It exists because a reload is the one place where the files and the running apps
    meet: the rules say what changed (:func:`rules.pooldir.plan_reload`), and this class
    keeps the bookkeeping around the plan (refused files that keep a running generation,
    the names asked for, the result a ``reload`` command answers) apart from the loop that
    runs the processes (:class:`pooldir_masters.Masters`, which it asks to stop and signal).

    ``apps`` is the pool's own table, shared: a reload adds and removes its entries.
    """

    def __init__(self, directory: str, watch: float, apps: Dict[str, App], masters: Masters,
                 say: Say) -> None:
        self.directory = os.path.abspath(directory)
        self.watch = watch  # seconds between looks at the directory (0 = only on reload)
        self.next_look = 0.0
        self.seen: Tuple[Tuple[Any, ...], ...] = ()  # the directory as last applied
        self.pending: Optional[Tuple[Tuple[Any, ...], ...]] = None  # changed, settling
        self.apps = apps
        self.masters = masters
        self.say = say

    def remember(self) -> None:
        """The directory as it is now is the one applied."""
        self.seen = directory_signature(self.directory)

    def look(self, now: float) -> None:
        """``--watch``: a changed directory is reloaded once it has looked the same for
        one interval (an editor or a deploy writes a file in several steps)."""
        self.next_look = now + self.watch
        current = directory_signature(self.directory)
        if current == self.seen:
            self.pending = None
        elif current == self.pending:
            self.say("the directory changed: reloading it")
            self.seen, self.pending = current, None
            self.reload_dir(signal_masters=True)
        else:
            self.pending = current

    def refused(self, error: FileError) -> None:
        """A file that cannot run now: a running app of it keeps its generation."""
        self.say(f"refused: {error.error}")
        owner = next((a for a in self.apps.values() if a.file.path == error.path), None)
        if owner is None:
            owner = self.apps.get(error.name)
            if owner is not None and owner.file.path != error.path:
                return  # another file's app by that name: untouched
        if owner is not None and owner.pid:
            owner.error = f"{error.error} (the running master keeps its configuration)"
            return
        if owner is None:
            owner = App(AppFile(name=error.name, path=error.path, digest=""))
            self.apps[error.name] = owner
        owner.wanted = False
        owner.error = error.error
        owner.change_state(AppState.FATAL)  # -> fatal: its file is refused

    def learn_new_files(self, names: Sequence[str]) -> None:
        """``start NAME`` and ``reload NAME`` of a file added since: the parent learns it
        (without touching the other new files)."""
        if all(n in self.apps for n in names):
            return
        files, errors = scan(self.directory)
        for f in files:
            if f.name in names and f.name not in self.apps:
                self.apps[f.name] = App(f)
        for e in errors:
            if e.name in names and e.name not in self.apps:
                self.refused(e)

    def reload_dir(self, names: Sequence[str] = (), signal_masters: bool = False
                   ) -> Dict[str, Any]:
        """Apply the directory as it is now (only to ``names``, if given). Masters to
        reload are signalled (``signal_masters``) or returned for the caller to reload
        through their control sockets (to learn each outcome)."""
        self.seen, self.pending = directory_signature(self.directory), None
        files, errors = scan(self.directory)
        by_name = {f.name: f for f in files}
        error_paths = {e.path for e in errors}
        for name, app in list(self.apps.items()):
            if not app.file.digest and not app.pid and app.file.path not in error_paths \
                    and (not names or name in names):
                del self.apps[name]  # a refused file, gone or fixed: forget its refusal
        known = {n: a.file for n, a in self.apps.items() if a.file.digest}
        broken = [e.name for e in errors] + [n for n, f in known.items()
                                             if f.path in {e.path for e in errors}]
        plan = plan_reload(known, files, broken)
        if names:
            start, stop, reload, restart, keep = (tuple(n for n in group if n in names)
                                                  for group in (plan.start, plan.stop,
                                                                plan.reload, plan.restart,
                                                                plan.keep))
            plan = ReloadPlan(start=start, stop=stop, reload=reload, restart=restart,
                              keep=keep)
        result: Dict[str, Any] = {"started": [], "stopped": [], "reload": [],
                                  "restarted": [], "unchanged": [], "errors": {}}
        named_paths = {self.apps[n].file.path for n in names if n in self.apps}
        for e in errors:
            if not names or e.name in names or e.path in named_paths:
                self.refused(e)
                result["errors"][e.name] = e.error
        for name in plan.start:
            self.apps[name] = App(by_name[name])
            self.apps[name].start()
            result["started"].append(name)
        for name in plan.stop:
            self.masters.stop(self.apps[name])
            result["stopped"].append(name)
        for name in plan.restart:
            app = self.apps[name]
            app.file = by_name[name]
            if app.pid:
                self.masters.stop(app)
                app.restart_after_stop = True  # stop, then start from the renamed file
            else:
                app.start()
            result["restarted"].append(name)
        for name in plan.reload + plan.keep:
            if name not in by_name:
                continue  # its file is broken now: it keeps what it runs
            app = self.apps[name]
            app.file = by_name[name]
            if name in plan.keep and name not in names:
                result["unchanged"].append(name)  # not touched
            elif app.pid and app.state is not AppState.STOPPING:
                app.error = ""
                if signal_masters:
                    self.say(f"{name}: reloading (SIGHUP to pid {app.pid})")
                    self.masters.signal_app(app, signal.SIGHUP)
                result["reload"].append({"name": name, "control": app.file.control,
                                         "pid": app.pid})
            elif app.wanted or app.state is AppState.FATAL or name in names:
                app.start()  # fixed (or asked for by name): start it again
                result["started"].append(name)
        for name in names:
            if name not in by_name and name not in result["errors"] \
                    and name not in plan.stop:
                result["errors"][name] = f"no file for {name} in {self.directory}"
        return result
