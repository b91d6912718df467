"""A listening socket whose connections live in the master's own selector, never blocking it.

The control socket (:mod:`.control_server`) and ``status.listen`` (:mod:`.status_listen`)
serve their clients the same way: accept a few at a time, non-blocking, at most
``MAX_CONNECTIONS`` open (past that the newest is closed at once, so a flood of idle
connections costs a bounded number of descriptors), each with a deadline in all that the
master's sweep enforces, read and written only as far as the socket takes it. That part is
here once; what a connection says and how it is answered stays with each.
"""

from __future__ import annotations

import logging
import selectors
import socket
from typing import Callable, Dict, Generic, List, Optional, TypeVar

log = logging.getLogger("fcgi_manager.master")

MAX_CONNECTIONS = 64


class SelectorConn:
    """What the server holds of one client: its socket and its deadline (0 = none)."""

    __slots__ = ("sock", "deadline")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline


C = TypeVar("C", bound=SelectorConn)


class SelectorServer(Generic[C]):
    """The listening socket and its connections; the selector's data is ``(kind, conn)``,
    ``conn`` None for the listening socket."""

    name = ""  # for log lines
    accept_deadline = 0.0  # seconds a new connection has in all
    warn_when_full = False  # log a connection closed past MAX_CONNECTIONS

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector, kind: str,
                 clock: Callable[[], float]) -> None:
        self.sock = sock
        self.selector = selector
        self.kind = kind
        self.clock = clock
        self.conns: Dict[int, C] = {}
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, (kind, None))

    def new_conn(self, sock: socket.socket, deadline: float) -> C:
        raise NotImplementedError

    def accepted(self, conn: C) -> None:
        """Called for each connection taken in, once it is in the selector."""

    def _accept(self) -> None:
        for _ in range(16):
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("%s: accept failed: %s", self.name, exc)
                return
            if len(self.conns) >= MAX_CONNECTIONS:
                if self.warn_when_full:
                    log.warning("%s: %d connections open already; closed a new one "
                                "(a client that connects and sends nothing?)", self.name,
                                MAX_CONNECTIONS)
                client.close()
                continue
            client.setblocking(False)
            conn = self.new_conn(client, self.clock() + self.accept_deadline)
            self.conns[client.fileno()] = conn
            self.selector.register(client, selectors.EVENT_READ, (self.kind, conn))
            self.accepted(conn)

    def _recv(self, conn: C, size: int) -> Optional[bytes]:
        """What the peer sent (b"" at its EOF); None if nothing came now or the connection
        failed (then it is closed)."""
        try:
            return conn.sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            self.close(conn)
            return None

    def _send(self, conn: C, data: bytes) -> Optional[int]:
        """Bytes of ``data`` the socket took (0 if full); None if the connection failed
        (then it is closed)."""
        try:
            return conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self.close(conn)
            return None

    def close(self, conn: C) -> None:
        if self.conns.pop(conn.sock.fileno(), None) is None:
            return
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

    def close_all(self) -> None:
        """Close every connection and leave the selector (the socket stays open)."""
        for conn in list(self.conns.values()):
            self.close(conn)
        try:
            self.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass

    def child_fds(self) -> List[int]:
        """Descriptors a forked child must close."""
        return [self.sock.fileno()] + list(self.conns)
