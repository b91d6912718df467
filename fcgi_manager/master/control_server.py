"""The master's side of the control socket: connections that never block its loop.

Every accepted connection is non-blocking and lives in the master's own selector. Its
request is framed by ``control.MessageReader`` from whatever pieces arrive; a connection
has ``READ_DEADLINE`` seconds in all to deliver it (not per byte: a client sending one
byte a second is closed when its time is up, and meanwhile costs the loop one wakeup a
second). A reply is written as far as the socket takes it, the rest when it is writable,
within ``WRITE_DEADLINE``. A connection waiting for a reload's outcome has no deadline:
the reload's own deadline answers it. At most ``MAX_CONNECTIONS`` are open at once; past
that the newest is closed at once, so a flood of idle connections costs a bounded number
of descriptors.

The peer's uid is checked at accept (``SO_PEERCRED``): only the master's uid and root.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
from typing import Any, Callable, Dict, List, Optional

from ..errors import ProtocolError
from ..wire import control

log = logging.getLogger("fcgi_manager.master")

READ_DEADLINE = 2.0
WRITE_DEADLINE = 5.0
MAX_CONNECTIONS = 64

# (connection, request id, command, args) -> None; replies go through ControlServer.reply
RequestHandler = Callable[["ControlConnection", Any, str, Dict[str, Any]], None]


class ControlConnection:
    """One client: reading its request, waiting for its answer, or writing it."""

    __slots__ = ("sock", "reader", "req_id", "deadline", "out", "state")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.reader = control.MessageReader()
        self.req_id: Any = 1
        self.deadline = deadline  # 0 = none (waiting for a reload)
        self.out = b""
        self.state = "reading"  # reading -> waiting -> writing -> closed


class ControlServer:
    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector,
                 handler: RequestHandler, clock: Callable[[], float],
                 decode: Callable[[bytes], Any] = control.decode_request) -> None:
        self.sock = sock
        self.decode = decode  # (id, command, args) from a body; the pool parent has its own
        self.selector = selector
        self.handler = handler
        self.clock = clock
        self.conns: Dict[int, ControlConnection] = {}
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, ("control", None))

    # -- events from the selector ------------------------------------------------------

    def on_event(self, conn: Optional[ControlConnection], mask: int) -> None:
        if conn is None:
            self._accept()
        elif conn.state == "reading":
            self._read(conn)
        elif conn.state == "writing":
            self._write(conn)

    def _accept(self) -> None:
        for _ in range(16):
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("control socket: accept failed: %s", exc)
                return
            client.setblocking(False)
            conn = ControlConnection(client, self.clock() + READ_DEADLINE)
            if len(self.conns) >= MAX_CONNECTIONS:
                log.warning("control socket: %d connections open already; closed a new one "
                            "(a client that connects and sends nothing?)", MAX_CONNECTIONS)
                client.close()
                continue
            self.conns[client.fileno()] = conn
            self.selector.register(client, selectors.EVENT_READ, ("control", conn))
            if not control.peer_allowed(client):
                log.warning("refused a control connection from uid %s (only uid %d and root "
                            "may control this master)", control.peer_uid(client), os.geteuid())
                self.reply(conn, ok=False, error="permission denied")

    def _read(self, conn: ControlConnection) -> None:
        try:
            data = conn.sock.recv(max(conn.reader.wants(), 4096))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        try:
            body = conn.reader.feed(data)
            if body is None:
                return
            conn.req_id, name, args = self.decode(body)
        except ProtocolError as exc:
            self.reply(conn, ok=False, error=str(exc))
            return
        # Waiting for its answer: out of the selector (a peer that sends more, or closes,
        # would make its descriptor readable at every turn of the loop).
        conn.state = "waiting"
        conn.deadline = 0.0
        self.selector.unregister(conn.sock)
        self.handler(conn, conn.req_id, name, args)

    def _write(self, conn: ControlConnection) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            self.close(conn)

    # -- replies and the end of a connection --------------------------------------------

    def reply(self, conn: ControlConnection, ok: bool, result: Any = None,
              error: str = "") -> None:
        """Answer ``conn`` (once); the connection closes when the answer is written."""
        if conn.state in ("writing", "closed"):
            return
        msg: Dict[str, Any] = {"id": conn.req_id, "ok": ok}
        if ok:
            msg["result"] = result
        else:
            msg["error"] = error
        conn.out = control.encode_message(msg)
        conn.state = "writing"
        conn.deadline = self.clock() + WRITE_DEADLINE
        self._write(conn)
        if conn.state == "writing":
            try:
                self.selector.modify(conn.sock, selectors.EVENT_WRITE, ("control", conn))
            except KeyError:
                self.selector.register(conn.sock, selectors.EVENT_WRITE, ("control", conn))

    def close(self, conn: ControlConnection) -> None:
        if conn.state == "closed":
            return
        conn.state = "closed"
        self.conns.pop(conn.sock.fileno(), None)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def sweep(self, now: float) -> None:
        """Close every connection past its deadline (a slow or silent client)."""
        for conn in list(self.conns.values()):
            if conn.deadline and now >= conn.deadline:
                self.close(conn)

    def adopt(self, fd: int) -> ControlConnection:
        """A connection handed over across a reload's re-exec, waiting for its answer."""
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        conn = ControlConnection(sock, 0.0)
        conn.state = "waiting"
        self.conns[fd] = conn
        return conn

    def close_all(self) -> None:
        for conn in list(self.conns.values()):
            self.close(conn)
        try:
            self.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass

    def child_fds(self) -> List[int]:
        """Descriptors a forked child must close."""
        return [self.sock.fileno()] + [c.sock.fileno() for c in self.conns.values()]
