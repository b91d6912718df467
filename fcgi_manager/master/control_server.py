"""The master's side of the control socket: connections that never block its loop.

Every accepted connection is non-blocking and lives in the master's own selector. Its
request is framed by ``control.MessageReader`` from whatever pieces arrive; a connection
has ``READ_DEADLINE`` seconds in all to deliver it (not per byte: a client sending one
byte a second is closed when its time is up, and meanwhile costs the loop one wakeup a
second). A reply is written as far as the socket takes it, the rest when it is writable,
within ``WRITE_DEADLINE``. A connection waiting for a reload's outcome has no deadline:
the reload's own deadline answers it. At most ``MAX_CONNECTIONS`` are open at once; past
that the newest is closed at once, so a flood of idle connections costs a bounded number
of descriptors (accepting, the cap, deadlines and closing: :mod:`.selector_conns`).

The peer's uid is checked at accept (``SO_PEERCRED``): only the master's uid and root.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
from typing import Any, Callable, Dict, Optional

from ..errors import ProtocolError
from ..wire import control
from .selector_conns import SelectorConn, SelectorServer

log = logging.getLogger("fcgi_manager.master")

READ_DEADLINE = 2.0
WRITE_DEADLINE = 5.0

# (connection, request id, command, args) -> None; replies go through ControlServer.reply
RequestHandler = Callable[["ControlConnection", Any, str, Dict[str, Any]], None]


class ControlConnection(SelectorConn):
    """One client: reading its request, waiting for its answer, or writing it."""

    __slots__ = ("reader", "req_id", "out", "state")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__(sock, deadline)  # deadline 0 = none (waiting for a reload)
        self.reader = control.MessageReader()
        self.req_id: Any = 1
        self.out = b""
        self.state = "reading"  # reading -> waiting -> writing -> closed


class ControlServer(SelectorServer[ControlConnection]):
    name = "control socket"
    accept_deadline = READ_DEADLINE
    warn_when_full = True

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector,
                 handler: RequestHandler, clock: Callable[[], float],
                 decode: Callable[[bytes], Any] = control.decode_request) -> None:
        self.decode = decode  # (id, command, args) from a body; the pool parent has its own
        self.handler = handler
        super().__init__(sock, selector, "control", clock)

    # -- events from the selector ------------------------------------------------------

    def on_event(self, conn: Optional[ControlConnection], mask: int) -> None:
        if conn is None:
            self._accept()
        elif conn.state == "reading":
            self._read(conn)
        elif conn.state == "writing":
            self._write(conn)

    def new_conn(self, sock: socket.socket, deadline: float) -> ControlConnection:
        return ControlConnection(sock, deadline)

    def accepted(self, conn: ControlConnection) -> None:
        client = conn.sock
        if not control.peer_allowed(client):
            log.warning("refused a control connection from uid %s (only uid %d and root "
                        "may control this master)", control.peer_uid(client), os.geteuid())
            self.reply(conn, ok=False, error="permission denied")

    def _read(self, conn: ControlConnection) -> None:
        data = self._recv(conn, max(conn.reader.wants(), 4096))
        if data is None:
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
        sent = self._send(conn, conn.out)
        if sent is None:
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
        conn.state = "closed"
        super().close(conn)

    def adopt(self, fd: int) -> ControlConnection:
        """A connection handed over across a reload's re-exec, waiting for its answer."""
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        conn = ControlConnection(sock, 0.0)
        conn.state = "waiting"
        self.conns[fd] = conn
        return conn
