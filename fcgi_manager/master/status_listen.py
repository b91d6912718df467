"""``status.listen``: a second socket on which the master itself answers the status, ping
and metrics pages over FastCGI, without a worker (php-fpm's ``pm.status_listen``).

Why: the ``status.path`` page is answered by the workers, so when every worker is busy
(the moment an operator most wants to look) it waits in the queue with everything else.
This socket is the master's own: nginx sends ``location = /fcgi-status`` there, and the
page answers at once whatever the workers do.

What it answers, by the request's path: ``status.ping_path`` gives the ping reply (503
``draining`` during ``shutdown_delay``); a path ending in ``/metrics`` gives OpenMetrics;
every other path gives the status page (``?json``, ``?openmetrics`` or text, as on
``status.path``). The page is read from the scoreboard, as the workers' page is.

Never blocking the master: every connection is non-blocking and lives in the master's
selector; its request is parsed by :class:`protocol.ServerConnection` from whatever pieces
arrive; the reply is written as far as the socket takes it; a connection gets
``DEADLINE`` seconds in all, and at most ``MAX_CONNECTIONS`` are open (past that the
newest is closed at once). One request per connection: the connection is closed after
the reply (``shutdown`` first, so the peer reads all of it).
"""

from __future__ import annotations

import logging
import selectors
import socket
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import ProtocolError
from ..wire import protocol

log = logging.getLogger("fcgi_manager.master")

DEADLINE = 5.0
MAX_CONNECTIONS = 64
KIND = "status_listen"

# params -> (status line, body, content type)
Answer = Callable[[Dict[str, str]], Tuple[str, bytes, str]]


class StatusConnection:
    __slots__ = ("sock", "parser", "request_id", "params", "out", "deadline", "closed")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.parser = protocol.ServerConnection(max_params=64 * 1024, max_buffer=256 * 1024)
        self.request_id = 0
        self.params: Dict[str, str] = {}
        self.out = b""
        self.deadline = deadline
        self.closed = False


class StatusListener:
    """The socket and its connections, driven by the master's selector."""

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector, answer: Answer,
                 clock: Callable[[], float]) -> None:
        self.sock = sock
        self.selector = selector
        self.answer = answer
        self.clock = clock
        self.conns: Dict[int, StatusConnection] = {}
        self.on_close: Callable[[], None] = lambda: None  # removes a unix socket's file
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, (KIND, None))

    def on_event(self, conn: Optional[StatusConnection], mask: int) -> None:
        if conn is None:
            self._accept()
        elif conn.out:
            self._write(conn)
        else:
            self._read(conn)

    def _accept(self) -> None:
        for _ in range(16):
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("status.listen: accept failed: %s", exc)
                return
            if len(self.conns) >= MAX_CONNECTIONS:
                client.close()
                continue
            client.setblocking(False)
            conn = StatusConnection(client, self.clock() + DEADLINE)
            self.conns[client.fileno()] = conn
            self.selector.register(client, selectors.EVENT_READ, (KIND, conn))

    def _read(self, conn: StatusConnection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        if not data:
            self.close(conn)
            return
        try:
            events = conn.parser.feed(data)
        except ProtocolError as exc:
            log.info("status.listen: closed a connection: %s", exc)
            self.close(conn)
            return
        out = []
        for ev in events:
            if isinstance(ev, protocol.BeginRequest):
                conn.request_id = ev.request_id
            elif isinstance(ev, protocol.Params):
                conn.params = ev.params
            elif isinstance(ev, protocol.StdinEnd):
                out.append(self._response(conn))
            elif isinstance(ev, protocol.GetValues):
                out.append(protocol.encode_get_values_result(
                    {k: v for k, v in (("FCGI_MAX_CONNS", "64"), ("FCGI_MAX_REQS", "64"),
                                       ("FCGI_MPXS_CONNS", "0")) if k in ev.names}))
            elif isinstance(ev, protocol.UnknownType):
                out.append(protocol.encode_unknown_type(ev.record_type))
            elif isinstance(ev, protocol.Rejected):
                out.append(protocol.encode_end_request(ev.request_id, 0, ev.protocol_status))
        if out:
            conn.out = b"".join(out)
            self._write(conn)

    def _response(self, conn: StatusConnection) -> bytes:
        try:
            status, body, ctype = self.answer(conn.params)
        except Exception:  # noqa: BLE001 - a page that fails must not take the master down
            log.exception("status.listen: the status page failed")
            status, body, ctype = ("500 Internal Server Error", b"status page failed\n",
                                   "text/plain; charset=utf-8")
        head = (f"Status: {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n\r\n").encode()
        conn.closed = True  # one request: the connection ends with this answer
        return protocol.encode_stream(protocol.STDOUT, conn.request_id, head + body) + \
            protocol.end_of_request(conn.request_id)

    def _write(self, conn: StatusConnection) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            self.selector.modify(conn.sock, selectors.EVENT_WRITE, (KIND, conn))
        elif conn.closed:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.close(conn)
        else:
            self.selector.modify(conn.sock, selectors.EVENT_READ, (KIND, conn))

    def close(self, conn: StatusConnection) -> None:
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
            if now >= conn.deadline:
                self.close(conn)

    def child_fds(self) -> List[int]:
        """Descriptors a forked child must close."""
        return [self.sock.fileno()] + list(self.conns)

    def close_all(self) -> None:
        for conn in list(self.conns.values()):
            self.close(conn)
        try:
            self.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self.on_close()


def page(cfg: Any, board: Any, params: Dict[str, str]) -> Tuple[str, bytes, str]:
    """The answer for one request on the status socket (see the module docstring)."""
    from .. import status as status_mod
    from ..worker.wsgi import request_path

    path = request_path(params)
    if cfg.status.ping_path and path == cfg.status.ping_path:
        if board.draining():
            return "503 Service Unavailable", b"draining\n", "text/plain; charset=utf-8"
        return "200 OK", (cfg.status.ping_response + "\n").encode(), "text/plain; charset=utf-8"
    query = params.get("QUERY_STRING", "")
    if path.rstrip("/").endswith("/metrics"):
        query = "openmetrics"
    return status_mod.render_page(status_mod.snapshot(cfg, board), query)


def open_for(cfg: Any, selector: selectors.BaseSelector, board: Callable[[], Any],
             clock: Callable[[], float]) -> Optional[StatusListener]:
    """The status socket ``status.listen`` names (unix: with listen's owner, group and
    mode), or None when it is not set."""
    if not cfg.status.listen:
        return None
    from .. import sockets

    address = sockets.parse_address(cfg.status.listen, "status.listen")
    sock = sockets.create_listener(address, 64, cfg.listen.mode, cfg.listen.owner,
                                   cfg.listen.group)
    listener = StatusListener(sock, selector, lambda params: page(cfg, board(), params),
                              clock)
    inode = sockets.socket_file_inode(address)
    listener.on_close = lambda: sockets.remove_unix_socket(address, inode)
    return listener
