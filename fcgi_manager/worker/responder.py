"""One request on one connection: records in, the app or the worker's own answer, records
out.

Both worker loops hold a :class:`Responder`: the single-thread loop calls it inline, the
threaded loop from its app threads. It never waits on epoll, accepts or closes a
connection: :meth:`Responder.receive` says what the loop must do next (:class:`Need`),
:meth:`Responder.respond` says how the request ended (:class:`Result`), and the loop acts
on that. What differs per thread running requests (its scoreboard writer, ``wsgi.errors``,
environ template, access-log meter, hooks around the app call) is a :class:`Lane`.

The worker's own answers, given without calling the app: 413 for a body past
``workers.max_body``, the ping and status pages, and 503 for a request that waited past
``workers.queue_timeout`` (README: "Status page and ping", "Limits").
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..escaping import escape
from ..wire import protocol
from .connection import Conn
from .wsgi import (
    ClientGone,
    EnvironBuilder,
    ErrorStream,
    RequestAborted,
    content_length,
    new_body,
    request_path,
    run_app,
    simple_response,
)

log = logging.getLogger("fcgi_manager.worker")

MAX_REPLIES = 64  # records answered on a connection without a request being served

# status line, body, content type, extra headers
Answer = Tuple[str, bytes, str, List[Tuple[str, str]]]
Send = Callable[[bytes], None]


class Need(enum.IntEnum):
    """What the loop does with a connection after :meth:`Responder.receive`."""

    MORE = 0  # the request is not complete: watch the connection for its next bytes
    APP = 1  # a complete request: run :meth:`Responder.respond` (events after it wait)
    CLOSE = 2  # it failed (a reply could not be sent, a spool file): close it


class Result(enum.IntEnum):
    """How :meth:`Responder.respond` ended a request."""

    KEEP = 0  # answered: the connection may serve another (if the web server keeps it)
    CLOSE = 1  # answered, or cut short by the client: close it, count the request
    GONE = 2  # aborted and the end could not be sent: close it, nothing served


class Lane:
    """What one thread running requests owns.

    ``enter``/``leave`` run around the app call (the single-thread worker's hand-off
    watchdog may touch its idle connections only in between); ``check_memory``, when set,
    runs just before the write that ends the response (a threaded worker past
    ``max_memory`` must stop accepting before its client can send the next request)."""

    __slots__ = ("slot", "errors", "environ", "meter", "enter", "leave", "check_memory")

    def __init__(self, slot: Any, errors: ErrorStream, environ: EnvironBuilder,
                 meter: Any = None, enter: Optional[Callable[[Conn], None]] = None,
                 leave: Optional[Callable[[], None]] = None,
                 check_memory: Optional[Callable[[], None]] = None) -> None:
        self.slot = slot  # scoreboard.SlotWriter or ThreadSlotWriter: busy() and idle()
        self.errors = errors
        self.environ = environ
        self.meter = meter  # accesslog.AccessLog or ThreadMeter: begin, counting, end
        self.enter = enter
        self.leave = leave
        self.check_memory = check_memory


class Responder:
    """Turns one connection's records into one response (see the module docstring)."""

    def __init__(self, app: Callable[..., Any], config: Any, slot: Any,
                 status_page: Optional[Callable[[str], Tuple[str, bytes, str]]] = None,
                 max_conns: int = 1, max_reqs: int = 1) -> None:
        w = config.workers
        self.app = app
        self.slot = slot  # the worker's SlotWriter: draining flag, shed count
        self.max_body_in_memory = w.max_body_in_memory
        self.max_body = w.max_body
        self.read_timeout = w.read_timeout
        self.queue_timeout = w.queue_timeout
        self.status_path = config.status.path
        self.ping_path = config.status.ping_path
        self.ping_body = (config.status.ping_response + "\n").encode()
        self.has_special = bool(self.status_path or self.ping_path or self.queue_timeout)
        self.special_prefixes = tuple(p for p in (self.ping_path, self.status_path) if p)
        self.status_page = status_page
        self.values = {"FCGI_MAX_CONNS": str(max_conns), "FCGI_MAX_REQS": str(max_reqs),
                       "FCGI_MPXS_CONNS": "0"}
        # App threads share the slot's shed counter (one thread: no lock needed).
        self.shed_lock: Optional[Any] = threading.Lock() if max_reqs > 1 else None

    # -- records in -----------------------------------------------------------------------

    def receive(self, conn: Conn, events: List[Any]) -> Need:
        """Act on parsed events up to a complete request; the events after it wait in
        ``conn.pending`` until the request is answered."""
        for i, ev in enumerate(events):
            if isinstance(ev, protocol.Stdin):
                if ev.request_id != conn.request_id:
                    continue  # the rest of a request aborted before its app ran
                body = conn.body
                assert body is not None
                try:
                    body.append(ev.data)
                except OSError as exc:  # the spool file: disk full, file too large
                    return self._spool_failed(conn, exc)
            elif isinstance(ev, protocol.Params):
                if ev.request_id != conn.request_id:
                    continue  # parsed in the same read as the abort that ended it
                conn.params = ev.params
                try:
                    conn.body = new_body(ev.params, self.max_body_in_memory, self.max_body)
                except OSError as exc:  # no temporary file: out of descriptors, no space
                    return self._spool_failed(conn, exc)
            elif isinstance(ev, protocol.StdinEnd):
                if ev.request_id != conn.request_id:
                    continue
                if i + 1 < len(events):  # usually the last event: nothing to keep
                    rest = events[i + 1:]
                    if any(type(e) is protocol.AbortRequest and e.request_id == ev.request_id
                           for e in rest):
                        if not self.end_request(conn, 0):  # aborted before the app ran
                            return Need.CLOSE
                        continue
                    conn.pending = rest + conn.pending
                return Need.APP
            elif isinstance(ev, protocol.BeginRequest):
                conn.request_id = ev.request_id
                if conn.last_used:  # a kept connection's next request: its own read time
                    conn.deadline = time.monotonic() + self.read_timeout
                # (a new connection's read time runs from its accept, so "the oldest
                # unfinished" is the one connected first, whenever its bytes were read)
            elif isinstance(ev, protocol.AbortRequest):
                if conn.request_id == ev.request_id:
                    # Aborted before the app ran: end it without calling the app.
                    if not self.end_request(conn, 0):
                        return Need.CLOSE
            elif isinstance(ev, protocol.GetValues):
                values = self.values
                if not self.reply(conn, protocol.encode_get_values_result(
                        {n: values[n] for n in ev.names if n in values})):
                    return Need.CLOSE
            elif isinstance(ev, protocol.Rejected):
                if not self.reply(conn, protocol.encode_end_request(ev.request_id, 0,
                                                                    ev.protocol_status)):
                    return Need.CLOSE
            elif isinstance(ev, protocol.UnknownType):
                if not self.reply(conn, protocol.encode_unknown_type(ev.record_type)):
                    return Need.CLOSE
        return Need.MORE

    def _spool_failed(self, conn: Conn, exc: OSError) -> Need:
        """A request body that cannot be spooled costs its connection, not the worker."""
        log.error("closed a connection: cannot spool the request body to a temporary file: "
                  "%s", exc.strerror or exc)
        conn.body = None
        return Need.CLOSE

    def reply(self, conn: Conn, data: bytes) -> bool:
        """Answer a record that needs no app (management, refused or aborted request);
        False if the connection must be closed.

        Bounded twice: the write by ``write_timeout`` (set at once on a unix socket, whose
        peer may flood requests and never read), the number of such answers by
        ``MAX_REPLIES`` between two requests served -- past that the peer is not a web
        server doing its job.
        """
        conn.replies += 1
        if conn.replies > MAX_REPLIES:
            log.warning("closed a connection from %s: more than %d records to answer without "
                        "a request (not a web server?)", peer_name(conn.peer), MAX_REPLIES)
            return False
        if conn.lazy_sndtimeo is not None and not conn.timed:
            conn._set_send_timeout()
        try:
            conn.send(data)
            return True
        except ClientGone:
            return False

    def end_request(self, conn: Conn, app_status: int) -> bool:
        rid = conn.request_id
        request_done(conn)
        return self.reply(conn, protocol.end_of_request(rid, app_status))

    # -- one request ----------------------------------------------------------------------

    def respond(self, conn: Conn, lane: Lane) -> Result:
        """Answer the complete request on ``conn``: the app, or the worker's own answer."""
        params = conn.params or {}
        rid = conn.request_id
        method = params.get("REQUEST_METHOD", "GET")
        uri = params.get("REQUEST_URI") or params.get("SCRIPT_NAME", "") + params.get(
            "PATH_INFO", "")
        slot = lane.slot
        slot.busy(method, uri)
        send: Send = conn.send
        meter = lane.meter
        if meter is not None:
            meter.begin()
            send = meter.counting(send)
        checked: Optional[List[bool]] = None
        check_memory = lane.check_memory
        if check_memory is not None:
            checked = [False]
            send = _memory_checked(send, checked, check_memory)
        result = Result.KEEP
        conn.replies = 0
        if lane.enter is not None:
            lane.enter(conn)
        code = 499  # nginx's "client closed the request", unless the response went out
        try:
            special = self.own_answer(conn, params)
            if special is not None:
                status, body, ctype, extra = special
                simple_response(send, rid, status, body, ctype, extra)
                code = int(status[:3])
            else:
                assert conn.body is not None
                environ = lane.environ.build(params, conn.body.stream())
                code = run_app(self.app, environ, send, rid, lane.errors,
                               self.log_exception, conn.check_abort)
        except RequestAborted as aborted:  # its own name: compiled, a name has one type
            if lane.leave is not None:
                lane.leave()
            # Stop the output and end the request; the connection stays usable.
            log.info("%s: %s", escape(f"{method} {uri[:200]}"), aborted)
            lane.errors.reset()
            try:
                send(protocol.end_of_request(rid, 0))
            except ClientGone:
                result = Result.GONE
        except ClientGone as gone:
            if lane.leave is not None:
                lane.leave()
            log.info("%s: %s (client abort?)", escape(f"{method} {uri[:200]}"), gone)
            lane.errors.reset()
            result = Result.CLOSE
        else:
            if lane.leave is not None:
                lane.leave()
        slot.idle()
        if checked is not None and not checked[0] and check_memory is not None:
            check_memory()  # the response did not end normally
        if meter is not None:
            meter.end(params, uri, code)
        request_done(conn)
        return result

    @staticmethod
    def log_exception(message: str, tb: str) -> None:
        log.error("%s\n%s", message, tb.rstrip())

    # -- the worker's own answers ---------------------------------------------------------

    def own_answer(self, conn: Conn, params: Dict[str, str]) -> Optional[Answer]:
        """The answer the worker gives without calling the app, if any: 413 for a body
        past ``workers.max_body``, then ping, status page and shedding."""
        if conn.body is not None and conn.body.too_large:
            return self._too_large(conn.body.size, params)
        if not self.has_special:
            return None
        lock = self.shed_lock
        if lock is None:
            return self._special(params)
        with lock:
            return self._special(params)

    def _too_large(self, received: int, params: Dict[str, str]) -> Answer:
        """The 413 for a body past ``workers.max_body`` (the app is not called)."""
        announced = content_length(params)
        log.warning("answered 413 without calling the app: request body over workers.max_body "
                    "(%d bytes; CONTENT_LENGTH %s, %d bytes received); raise the limit if "
                    "such bodies are expected", self.max_body,
                    "none" if announced is None else announced, received)
        return ("413 Content Too Large",
                b"Content Too Large: the request body is over this server's limit\n",
                "text/plain; charset=utf-8", [])

    def _special(self, params: Dict[str, str]) -> Optional[Answer]:
        """Answers the worker gives itself: ping, status page, queue-timeout shedding."""
        if self.queue_timeout:
            start = params.get("REQUEST_START") or params.get("HTTP_X_REQUEST_START")
            if start:
                try:
                    begun = float(start.lstrip("t="))
                    if begun > 1e12:  # milliseconds or microseconds since the epoch
                        begun /= 1000.0 if begun < 1e15 else 1e6
                    waited = time.time() - begun
                except ValueError:
                    waited = 0.0
                if waited > self.queue_timeout:
                    self.slot.count_shed()
                    return ("503 Service Unavailable",
                            b"Service Unavailable: the request waited too long in the queue\n",
                            "text/plain; charset=utf-8", [("Retry-After", "1")])
        if self.special_prefixes:
            raw = params.get("DOCUMENT_URI") or params.get("REQUEST_URI", "")
            if not raw.startswith(self.special_prefixes) and "%" not in raw and \
                    raw[:1] == "/":
                return None  # the common case, decided without decoding the path
            path = request_path(params)
            if path and path == self.ping_path:
                if self.slot.draining():  # a stop is coming: balancers, take us out
                    return ("503 Service Unavailable", b"draining\n",
                            "text/plain; charset=utf-8", [("Cache-Control", "no-store")])
                return ("200 OK", self.ping_body, "text/plain; charset=utf-8",
                        [("Cache-Control", "no-store")])
            if path and path == self.status_path and self.status_page is not None:
                status, body, ctype = self.status_page(params.get("QUERY_STRING", ""))
                return (status, body, ctype, [("Cache-Control", "no-store")])
        return None


def request_done(conn: Conn) -> None:
    """The request on ``conn`` is over: the parser and the connection wait for the next."""
    conn.parser.request_done()
    conn.request_id = 0
    conn.params = None
    conn.body = None


def _memory_checked(send: Send, checked: List[bool], check_memory: Callable[[], None]) -> Send:
    """``send`` that runs ``check_memory`` just before the write that ends the response
    (END_REQUEST is its last record): once the client has its answer it may send the next
    request at once, and another thread could take it before a check made after the
    write. Checked first, a worker past the limit has stopped accepting by then."""
    def checking(data: bytes) -> None:
        if len(data) >= 16 and data[-15] == protocol.END_REQUEST and data[-16] == 1 \
                and not checked[0]:
            checked[0] = True
            check_memory()
        send(data)
    return checking


def peer_name(peer: Any) -> str:
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return "the unix socket"
