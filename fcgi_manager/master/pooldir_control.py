"""The pool parent's own control socket (``control`` framing, ``control_server``
connections): ``status``, ``start``, ``stop`` and ``reload`` with optional app names, and
``ping``. A command that changes apps is answered once they have settled.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from ..errors import FcgiManagerError, ProtocolError
from ..rules.pooldir import App, AppState, FileError
from ..wire import control
from .control_server import ControlConnection, ControlServer
from .pooldir_masters import Masters
from .pooldir_reload import Reloader, read_app

POOL_COMMANDS = ("status", "start", "stop", "reload", "ping")


def decode_request(body: bytes) -> Tuple[Any, str, Dict[str, Any]]:
    """A request to the parent: ``control``'s framing and shape, the parent's commands,
    ``args.names`` a list of app names."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"control request is not JSON: {exc}") from None
    if not isinstance(obj, dict) or obj.get("command") not in POOL_COMMANDS:
        raise ProtocolError("unknown control command")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError("control request 'args' must be an object")
    names = args.get("names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ProtocolError("control request 'names' must be a list of app names")
    return obj.get("id"), obj["command"], args


class PoolSide(Protocol):
    """What the commands ask of the parent itself (``PoolParent``): written out so
    that the commands depend on these four members, not on the whole parent (whose
    module imports this one)."""

    @property
    def stopping(self) -> bool: ...

    @property
    def kill_at(self) -> float: ...

    def snapshot(self) -> Dict[str, Any]: ...

    def stop_all(self, now: bool) -> None: ...


class Waiter:
    """A control client waiting until ``done()`` is true; then answered with ``result()``."""

    __slots__ = ("conn", "done", "result")

    def __init__(self, conn: ControlConnection, done: Callable[[], bool],
                 result: Callable[[], Tuple[bool, Any, str]]) -> None:
        self.conn, self.done, self.result = conn, done, result


class PoolControl:
    """The commands the parent answers on its control socket, and the clients waiting for
    their outcome.

    It exists so that the parent's loop sees one source of events and one question
    (:meth:`busy`), while the commands' checks (unknown names, a stopping pool, a file
    that changed or clashes before a ``start``) and their answers read in one place. The
    commands act through the pool's parts: :class:`pooldir_reload.Reloader` for reloads
    and new files, :class:`pooldir_masters.Masters` to stop a master, and the parent
    (:class:`PoolSide`) to stop them all and to describe the pool.
    """

    def __init__(self, pool: PoolSide, apps: Dict[str, App], masters: Masters,
                 reloader: Reloader, selector: selectors.BaseSelector) -> None:
        self.pool = pool
        self.apps = apps  # the pool's own table, shared; read here, changed through App
        self.masters = masters
        self.reloader = reloader
        self.selector = selector
        self.server: Optional[ControlServer] = None
        self.waiters: List[Waiter] = []

    # -- the socket ----------------------------------------------------------------------

    def bind(self, path: str) -> None:
        self.server = ControlServer(control.bind_control(path), self.selector,
                                    self.on_command, time.monotonic, decode=decode_request)

    def adopt(self, fd: int) -> None:
        """The socket the parent's previous image bound (see ``PoolParent.reexec``)."""
        self.server = ControlServer(socket.socket(fileno=fd), self.selector, self.on_command,
                                    time.monotonic, decode=decode_request)

    def on_event(self, conn: Optional[ControlConnection]) -> None:
        if self.server is not None:
            self.server.on_event(conn, 0)

    def sweep(self, now: float) -> None:
        if self.server is not None:
            self.server.sweep(now)

    def busy(self) -> bool:
        """A client connected or waiting: the loop looks again soon."""
        return bool(self.waiters or (self.server is not None and self.server.conns))

    def drop_clients(self) -> None:
        """Disconnect every client, answered or not (before an exec)."""
        if self.server is not None:
            for conn in list(self.server.conns.values()):
                self.server.close(conn)
        self.waiters = []

    def close(self, path: str) -> None:
        """The end of the pool: every client closed, the socket and its ``path`` gone."""
        if self.server is not None:
            self.server.close_all()
            try:
                os.unlink(path)
            except OSError:
                pass
            self.server.sock.close()

    # -- the commands -------------------------------------------------------------------

    def _settled_names(self, names: Sequence[str]) -> bool:
        return all(self.apps[n].state in (AppState.RUNNING, AppState.FATAL, AppState.STOPPED)
                   for n in names if n in self.apps)

    def on_command(self, conn: ControlConnection, req_id: Any, name: str,
                   args: Dict[str, Any]) -> None:
        assert self.server is not None
        server = self.server
        names: List[str] = list(dict.fromkeys(args.get("names") or []))
        if name in ("ping", "status"):
            server.reply(conn, True, self.pool.snapshot())
            return
        if self.pool.stopping:
            server.reply(conn, False, error="the pool is stopping")
            return
        if name in ("start", "reload") and names:
            self.reloader.learn_new_files(names)
        unknown = [n for n in names if n not in self.apps]
        if unknown:
            server.reply(conn, False, error=f"no app named {', '.join(unknown)} in "
                                            f"{self.reloader.directory} (apps: "
                                            f"{', '.join(sorted(self.apps)) or 'none'})")
            return
        try:
            if name == "stop":
                self._command_stop(conn, names, bool(args.get("now")))
            elif name == "start":
                self._command_start(conn, names)
            elif name == "reload":
                result = self.reloader.reload_dir(names)
                started = result["started"] + result["restarted"]
                self.waiters.append(Waiter(conn, lambda: self._settled_names(started),
                                           lambda: (True, self._with_states(result), "")))
        except FcgiManagerError as exc:
            server.reply(conn, False, error=exc.message)

    def _with_states(self, result: Dict[str, Any]) -> Dict[str, Any]:
        result["apps"] = self.pool.snapshot()["apps"]
        return result

    def _command_stop(self, conn: ControlConnection, names: List[str], now: bool) -> None:
        assert self.server is not None
        if not names:
            self.pool.stop_all(now)
            self.server.reply(conn, True, {"pid": os.getpid(),
                                           "deadline_s": self.pool.kill_at - time.monotonic()})
            return
        for n in names:
            self.masters.stop(self.apps[n], now)
        self.waiters.append(Waiter(conn, lambda: all(self.apps[n].pid == 0 for n in names),
                                   lambda: (True, self.pool.snapshot(), "")))

    def _command_start(self, conn: ControlConnection, names: List[str]) -> None:
        names = names or sorted(self.apps)
        for n in names:
            app = self.apps[n]
            if app.pid == 0:
                fresh = read_app(app.file.path) if app.file.digest else None
                if isinstance(fresh, FileError) or fresh is None:
                    if fresh is not None:
                        self.reloader.refused(fresh)
                    continue
                clash = [o.file.path for o in self.apps.values()
                         if o is not app and o.pid and set(o.file.claims) & set(fresh.claims)]
                if clash:
                    app.error = (f"{fresh.path}: claims what {', '.join(clash)} "
                                 "holds; not started")
                    app.change_state(AppState.FATAL)
                    continue
                app.file = fresh
                app.start()

        def result() -> Tuple[bool, Any, str]:
            bad = [f"{n}: {self.apps[n].state.shown}: {self.apps[n].error}" for n in names
                   if self.apps[n].state is not AppState.RUNNING]
            return (not bad, self.pool.snapshot(), "; ".join(bad))
        self.waiters.append(Waiter(conn, lambda: self._settled_names(names), result))

    def answer_waiters(self) -> None:
        if not self.waiters or self.server is None:
            return
        still = []
        for w in self.waiters:
            if w.conn.state == "closed":
                continue
            if w.done():
                ok, result, error = w.result()
                self.server.reply(w.conn, ok, result, error)
            else:
                still.append(w)
        self.waiters = still
