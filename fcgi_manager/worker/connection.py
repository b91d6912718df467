"""One connection from the web server and the request being received on it.

A raw descriptor plus the sans-I/O parser's state: what both worker loops, the
:class:`~.responder.Responder` and the hand-off client (``handoff.py``) pass around. Its
writes are bounded (``SO_SNDTIMEO``, or ``poll`` on a non-blocking socket) and
:meth:`Conn.check_abort` lets a streaming response notice ``FCGI_ABORT_REQUEST`` or a
hang-up between two flushes. README: "Keep-conn without pinning" for the story.
"""

from __future__ import annotations

import os
import select
import socket
from typing import Any, ClassVar, Dict, List, Optional

from ..errors import ProtocolError
from ..wire import protocol
from .wsgi import BodyBuffer, ClientGone

RECV_SIZE = 256 * 1024
IDLE_CONN_TIMEOUT = 300.0  # seconds an idle kept connection is held
UNBOUNDED_SEND = 65536  # bytes a unix connection may be sent before it needs SO_SNDTIMEO


class Conn:
    """One connection from the web server, and the request being received on it.

    It is a raw file descriptor, not a ``socket.socket``: building a socket object costs a
    hidden ``getsockname`` per connection, and ``os.read``/``os.write`` on the fd are all
    the request path needs. Timeouts come from the kernel: accepted TCP sockets inherit
    ``SO_RCVTIMEO``/``SO_SNDTIMEO`` from the listener (see :meth:`Worker._set_timeouts`);
    unix sockets are accepted non-blocking (:mod:`.nbaccept`) and never wait in a read.
    """

    __slots__ = ("fd", "parser", "params", "body", "request_id", "deadline",
                 "registered", "last_used", "peer", "pending", "_poller", "timed",
                 "untimed_sent", "replies")

    lazy_sndtimeo: ClassVar[Optional[bytes]] = None  # set by the worker for unix sockets
    # Set by the worker: bounds each wait for room on a non-blocking descriptor.
    write_timeout: ClassVar[float] = 60.0

    def __init__(self, fd: int, peer: Any, max_params: int) -> None:
        self.fd = fd
        self.parser = protocol.ServerConnection(max_params=max_params)
        self.params: Optional[Dict[str, str]] = None
        self.body: Optional[BodyBuffer] = None
        self.request_id = 0
        self.deadline = 0.0
        self.registered = False
        self.last_used = 0.0
        self.peer = peer
        self.pending: List[Any] = []  # events that arrived while the app ran
        self._poller: Optional[Any] = None
        self.timed = False
        self.untimed_sent = 0  # bytes written before SO_SNDTIMEO was set (unix sockets)
        self.replies = 0  # records answered since the last request served (see MAX_REPLIES)

    def _set_send_timeout(self) -> None:
        """SO_SNDTIMEO on this connection (unix sockets do not inherit the listener's)."""
        self.timed = True
        timeout = self.lazy_sndtimeo
        if timeout is None:  # a TCP connection: inherited from the listener
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=self.fd)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        except OSError:
            pass
        finally:
            sock.detach()

    def check_abort(self) -> bool:
        """While a response streams: did the web server abort the request or hang up?

        One ``poll`` with a zero timeout per 64 KiB flushed; bytes that are not an abort
        (a management record, say) are parsed and kept for after the request.
        """
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.fd, select.POLLIN)
        if not self._poller.poll(0):
            return False
        try:
            data = os.read(self.fd, RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        if not data:
            return True
        try:
            events = self.parser.feed(data)
        except ProtocolError:
            return True
        aborted = False
        for ev in events:
            if not aborted and type(ev) is protocol.AbortRequest and \
                    ev.request_id == self.request_id:
                aborted = True
            else:
                self.pending.append(ev)
        return aborted

    def send(self, data: bytes) -> None:
        """Write all of ``data``: blocking, bounded by SO_SNDTIMEO or, on a non-blocking
        socket, by ``write_timeout`` per wait for room (:meth:`_send_rest`)."""
        fd = self.fd
        if self.lazy_sndtimeo is not None and not self.timed:
            # A fresh unix socket's send buffer (~208 KiB) takes the first 64 KiB without
            # blocking; anything more could block (a large or streamed response, a kept
            # connection, a flood of management replies): bound it from then on.
            self.untimed_sent += len(data)
            if self.untimed_sent >= UNBOUNDED_SEND:
                self._set_send_timeout()
        try:
            sent = os.write(fd, data)
            if sent < len(data):
                self._send_rest(data, sent)
        # One name per handler: compiled, a name keeps the type of its first binding.
        except BlockingIOError as full:
            if os.get_blocking(fd):  # SO_SNDTIMEO ran out
                raise ClientGone("write timeout: the web server stopped reading") from full
            self._send_rest(data, 0)
        except (BrokenPipeError, ConnectionResetError) as closed:
            raise ClientGone("the web server closed the connection") from closed
        except OSError as failed:
            raise ClientGone(f"write failed: {failed.strerror}") from failed

    def _send_rest(self, data: bytes, sent: int) -> None:
        """The rest of a write the socket did not take at once.

        A blocking socket (bounded by SO_SNDTIMEO) that fails with EAGAIN timed out. A
        non-blocking one (accepted with :mod:`.nbaccept`) waits for room with ``poll``,
        each wait bounded by ``write_timeout``, as SO_SNDTIMEO bounds each blocking write.
        """
        fd = self.fd
        view = memoryview(data)
        total = len(data)
        poller = None
        try:
            while sent < total:
                try:
                    sent += os.write(fd, view[sent:])
                except BlockingIOError:
                    if os.get_blocking(fd):
                        raise
                    if poller is None:
                        poller = select.poll()
                        poller.register(fd, select.POLLOUT)
                    if not poller.poll(self.write_timeout * 1000.0):
                        raise
        except (BrokenPipeError, ConnectionResetError) as closed:
            raise ClientGone("the web server closed the connection") from closed
        except BlockingIOError as full:
            raise ClientGone("write timeout: the web server stopped reading") from full
        except OSError as failed:
            raise ClientGone(f"write failed: {failed.strerror}") from failed

    def mid_request(self) -> bool:
        return self.request_id != 0 or self.parser.buffered > 0
