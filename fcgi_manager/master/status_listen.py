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
newest is closed at once; that part is :mod:`.selector_conns`, as for the control
socket). One request per connection: the connection is closed after the reply
(``shutdown`` first, so the peer reads all of it).
"""

from __future__ import annotations

import logging
import selectors
import socket
from typing import Any, Callable, Dict, Optional, Tuple

from ..errors import ProtocolError
from ..wire import protocol
from .selector_conns import SelectorConn, SelectorServer

log = logging.getLogger("fcgi_manager.master")

DEADLINE = 5.0
KIND = "status_listen"

# params -> (status line, body, content type)
Answer = Callable[[Dict[str, str]], Tuple[str, bytes, str]]


class StatusConnection(SelectorConn):
    __slots__ = ("parser", "request_id", "params", "out", "closed")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__(sock, deadline)
        self.parser = protocol.ServerConnection(max_params=64 * 1024, max_buffer=256 * 1024)
        self.request_id = 0
        self.params: Dict[str, str] = {}
        self.out = b""
        self.closed = False


class StatusListener(SelectorServer[StatusConnection]):
    """The socket and its connections, driven by the master's selector."""

    name = "status.listen"
    accept_deadline = DEADLINE

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector, answer: Answer,
                 clock: Callable[[], float]) -> None:
        self.answer = answer
        self.on_close: Callable[[], None] = lambda: None  # removes a unix socket's file
        super().__init__(sock, selector, KIND, clock)

    def on_event(self, conn: Optional[StatusConnection], mask: int) -> None:
        if conn is None:
            self._accept()
        elif conn.out:
            self._write(conn)
        else:
            self._read(conn)

    def new_conn(self, sock: socket.socket, deadline: float) -> StatusConnection:
        return StatusConnection(sock, deadline)

    def _read(self, conn: StatusConnection) -> None:
        data = self._recv(conn, 65536)
        if data is None:
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
        sent = self._send(conn, conn.out)
        if sent is None:
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

    def close_all(self) -> None:
        super().close_all()
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
