"""FastCGI 1.0 on the wire, sans-I/O: bytes in, events out; values in, bytes out.

Nothing here touches a socket, so every rule is a unit test on bytes and any I/O loop
can drive it. The worker feeds what it received to :class:`ServerConnection` and gets a
list of events back; it answers with the ``encode_*`` functions.

Wire format (all integers big-endian)::

    record  = version:1 type:1 request_id:2 content_length:2 padding_length:1 reserved:1
              content[content_length] padding[padding_length]
    pair    = name_length value_length name value
    length  = 0..127 in one byte, or 4 bytes with the top bit set (31-bit length)

Request on a connection (what nginx, Apache, lighttpd and cgi-fcgi send)::

    BEGIN_REQUEST(role, flags) PARAMS* PARAMS(empty) STDIN* STDIN(empty)

Events, in the order a well-formed request yields them:

    ``BeginRequest``  -> ``Params`` (when the empty PARAMS record ends the stream)
    -> ``Stdin`` (one per non-empty STDIN record) -> ``StdinEnd``

plus, at any time, ``AbortRequest``, ``GetValues`` (management, request id 0),
``UnknownType`` (answer with :func:`encode_unknown_type`) and ``Rejected`` (a second
request while one is active, or a role other than responder: answer with
:func:`encode_end_request` and the given protocol status).

Limits: a peer may not make us buffer more than ``max_params`` bytes of PARAMS or more than
``max_record_buffer`` bytes of undelivered input; breaking a limit or the grammar raises
:class:`~fcgi_manager.errors.ProtocolError`, after which the connection must be closed.
"""

from __future__ import annotations

import struct
from typing import Dict, Iterable, List, Tuple, Union

from ..errors import ProtocolError

VERSION = 1
HEADER: struct.Struct = struct.Struct("!BBHHBx")
HEADER_LEN = 8
MAX_CONTENT = 0xFFFF

BEGIN_REQUEST = 1
ABORT_REQUEST = 2
END_REQUEST = 3
PARAMS = 4
STDIN = 5
STDOUT = 6
STDERR = 7
DATA = 8
GET_VALUES = 9
GET_VALUES_RESULT = 10
UNKNOWN_TYPE = 11

RESPONDER = 1
AUTHORIZER = 2
FILTER = 3

KEEP_CONN = 1

REQUEST_COMPLETE = 0
CANT_MPX_CONN = 1
OVERLOADED = 2
UNKNOWN_ROLE = 3


_BEGIN_BODY = struct.Struct("!HB5x")
_END_BODY = struct.Struct("!IB3x")
_LEN4 = struct.Struct("!I")

# What the functions that take received or outgoing bytes accept. The annotations are
# enforced where the core is compiled, so they say all that the pure code accepts.
Buffer = Union[bytes, bytearray, memoryview]

DEFAULT_MAX_PARAMS = 256 * 1024
STDIN_VIEW_MIN = 4096  # STDIN records this large are handed out as views, not copies
DEFAULT_MAX_BUFFER = 1024 * 1024


class BeginRequest:
    """A request starts: ``role`` is RESPONDER for every web server we serve."""

    __slots__ = ("request_id", "role", "keep_conn")

    def __init__(self, request_id: int, role: int, keep_conn: bool) -> None:
        self.request_id = request_id
        self.role = role
        self.keep_conn = keep_conn

    def __repr__(self) -> str:
        return f"BeginRequest({self.request_id}, role={self.role}, keep_conn={self.keep_conn})"


class Params:
    """The whole PARAMS stream of the active request, decoded (latin-1, as PEP 3333 wants)."""

    __slots__ = ("request_id", "params")

    def __init__(self, request_id: int, params: Dict[str, str]) -> None:
        self.request_id = request_id
        self.params = params

    def __repr__(self) -> str:
        return f"Params({self.request_id}, {len(self.params)} pairs)"


class Stdin:
    """A chunk of the request body: ``bytes``, or for a large record a ``memoryview`` of the
    bytes received (no copy here: the body is copied once, where it is assembled)."""

    __slots__ = ("request_id", "data")

    def __init__(self, request_id: int, data: Union[bytes, memoryview]) -> None:
        self.request_id = request_id
        self.data = data

    def __repr__(self) -> str:
        return f"Stdin({self.request_id}, {len(self.data)} bytes)"


class StdinEnd:
    """The empty STDIN record: the request body is complete."""

    __slots__ = ("request_id",)

    def __init__(self, request_id: int) -> None:
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"StdinEnd({self.request_id})"


class AbortRequest:
    """The web server gave up on the active request: stop output and end it."""

    __slots__ = ("request_id",)

    def __init__(self, request_id: int) -> None:
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"AbortRequest({self.request_id})"


class GetValues:
    """A management query; answer with :func:`encode_get_values_result`."""

    __slots__ = ("names",)

    def __init__(self, names: List[str]) -> None:
        self.names = names

    def __repr__(self) -> str:
        return f"GetValues({self.names})"


class UnknownType:
    """A record type we do not know; answer with :func:`encode_unknown_type`."""

    __slots__ = ("record_type",)

    def __init__(self, record_type: int) -> None:
        self.record_type = record_type

    def __repr__(self) -> str:
        return f"UnknownType({self.record_type})"


class Rejected:
    """A BEGIN_REQUEST we refuse; answer END_REQUEST with ``protocol_status``."""

    __slots__ = ("request_id", "protocol_status")

    def __init__(self, request_id: int, protocol_status: int) -> None:
        self.request_id = request_id
        self.protocol_status = protocol_status

    def __repr__(self) -> str:
        return f"Rejected({self.request_id}, status={self.protocol_status})"


Event = Union[BeginRequest, Params, Stdin, StdinEnd, AbortRequest, GetValues, UnknownType, Rejected]


def _read_length(data: bytes, pos: int, end: int) -> Tuple[int, int]:
    if pos >= end:
        raise ProtocolError("name-value pair truncated in its length")
    first = data[pos]
    if first < 0x80:
        return first, pos + 1
    if pos + 4 > end:
        raise ProtocolError("name-value pair truncated in its 4-byte length")
    return _LEN4.unpack_from(data, pos)[0] & 0x7FFFFFFF, pos + 4


def decode_pairs(received: Buffer, max_pairs: int = 10000) -> Dict[str, str]:
    """Decode a name-value pair stream into a dict (names and values latin-1 decoded).

    A length that runs past the end of ``data`` is a :class:`ProtocolError`, never an
    over-read: lengths are untrusted (a 4-byte length can claim 2 GiB).

    Hot path: the whole stream is decoded to ``str`` once (latin-1 maps each byte to one
    character, so offsets are unchanged) and names and values are string slices -- one
    ``decode`` per request instead of two per pair.
    """
    data = received if isinstance(received, bytes) else bytes(received)
    text = data.decode("latin-1")
    pairs: Dict[str, str] = {}
    pos = 0
    end = len(data)
    try:
        while pos < end:
            name_len = data[pos]
            if name_len < 0x80:
                value_len = data[pos + 1]  # IndexError: truncated (caught below)
                if value_len < 0x80:
                    pos += 2
                else:
                    value_len, pos = _read_length(data, pos + 1, end)
            else:
                name_len, pos = _read_length(data, pos, end)
                value_len, pos = _read_length(data, pos, end)
            middle = pos + name_len
            stop = middle + value_len
            if stop > end:
                raise ProtocolError(
                    f"name-value pair claims {name_len}+{value_len} bytes, only {end - pos} left"
                )
            pairs[text[pos:middle]] = text[middle:stop]
            pos = stop
    except IndexError:
        raise ProtocolError("name-value pair truncated in its length") from None
    if len(pairs) > max_pairs:
        raise ProtocolError(f"more than {max_pairs} name-value pairs")
    return pairs


def _encode_length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n > 0x7FFFFFFF:
        raise ValueError("name or value longer than 2**31-1 bytes")
    return _LEN4.pack(n | 0x80000000)


def encode_pairs(pairs: Iterable[Tuple[Union[str, bytes], Union[str, bytes]]]) -> bytes:
    """Encode name-value pairs (str is encoded latin-1, or UTF-8 where latin-1 cannot)."""
    out = bytearray()
    for name, value in pairs:
        nb = _to_bytes(name)
        vb = _to_bytes(value)
        out += _encode_length(len(nb))
        out += _encode_length(len(vb))
        out += nb
        out += vb
    return bytes(out)


def _to_bytes(text: Union[str, bytes]) -> bytes:
    if isinstance(text, bytes):
        return text
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def encode_record(
    record_type: int, request_id: int, content: Buffer = b"", padding: int = 0
) -> bytes:
    """One record; ``content`` must fit in one record (see :func:`encode_stream`)."""
    if len(content) > MAX_CONTENT:
        raise ValueError("record content longer than 65535 bytes")
    return HEADER.pack(VERSION, record_type, request_id, len(content), padding) + content + (
        b"\0" * padding
    )


def encode_stream(record_type: int, request_id: int, data: Buffer) -> bytes:
    """Data for a stream (STDOUT, STDERR, STDIN, PARAMS), split at the record maximum.

    Empty ``data`` gives nothing: the empty record that ends a stream is sent on purpose
    with :func:`encode_record`, never by accident (an empty STDOUT before the headers makes
    nginx report "upstream prematurely closed FastCGI stdout").
    """
    n = len(data)
    if n <= MAX_CONTENT:
        if not n:
            return b""
        return HEADER.pack(VERSION, record_type, request_id, n, 0) + data
    view = memoryview(data)
    parts: List[Union[bytes, memoryview]] = []
    for start in range(0, n, MAX_CONTENT):
        chunk = view[start : start + MAX_CONTENT]
        parts.append(HEADER.pack(VERSION, record_type, request_id, len(chunk), 0))
        parts.append(chunk)
    return b"".join(parts)


def encode_end_request(request_id: int, app_status: int = 0, protocol_status: int = 0) -> bytes:
    """END_REQUEST: the last record of a request; nginx reuses a kept connection after it."""
    return HEADER.pack(VERSION, END_REQUEST, request_id, 8, 0) + _END_BODY.pack(
        app_status & 0xFFFFFFFF, protocol_status
    )


def encode_begin_request(request_id: int, role: int = RESPONDER, keep_conn: bool = False) -> bytes:
    """BEGIN_REQUEST, for our own client (``request``, ``check``) and the tests."""
    return HEADER.pack(VERSION, BEGIN_REQUEST, request_id, 8, 0) + _BEGIN_BODY.pack(
        role, KEEP_CONN if keep_conn else 0
    )


def encode_unknown_type(record_type: int) -> bytes:
    return encode_record(UNKNOWN_TYPE, 0, bytes((record_type & 0xFF,)) + b"\0" * 7)


def encode_get_values_result(values: Dict[str, str]) -> bytes:
    return encode_record(GET_VALUES_RESULT, 0, encode_pairs(values.items()))


def end_of_request(request_id: int, app_status: int = 0) -> bytes:
    """The bytes that close a response: empty STDOUT, then END_REQUEST."""
    return HEADER.pack(VERSION, STDOUT, request_id, 0, 0) + encode_end_request(
        request_id, app_status
    )


# nginx always uses request id 1: its response trailer is a constant.
END_OF_REQUEST_1 = end_of_request(1)


class ServerConnection:
    """The application side of one FastCGI connection: protocol state only.

    ``feed(data)`` appends received bytes and returns every event they complete. One
    request is active at a time (``request_id``, 0 when none); the caller calls
    :meth:`request_done` after sending END_REQUEST so the connection can take the next one.
    """

    __slots__ = (
        "_buf",
        "request_id",
        "keep_conn",
        "_params",
        "_params_size",
        "_params_done",
        "_stdin_done",
        "max_params",
        "max_buffer",
    )

    def __init__(self, max_params: int = DEFAULT_MAX_PARAMS, max_buffer: int = DEFAULT_MAX_BUFFER):
        self._buf = bytearray()
        self.request_id = 0
        self.keep_conn = False
        self._params: List[bytes] = []
        self._params_size = 0
        self._params_done = False
        self._stdin_done = False
        self.max_params = max_params
        self.max_buffer = max_buffer

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events (a partial record)."""
        return len(self._buf)

    def request_done(self) -> None:
        """The active request was answered: accept a new BEGIN_REQUEST."""
        self.request_id = 0
        self._params = []
        self._params_size = 0
        self._params_done = False
        self._stdin_done = False

    def feed(self, received: Buffer) -> List[Event]:
        """Parse ``received`` (plus what was left over) into events; raise ProtocolError on
        abuse."""
        buf = self._buf
        if buf:
            buf += received
            data = bytes(buf)
        elif isinstance(received, bytes):
            data = received
        else:
            data = bytes(received)
        events: List[Event] = []
        pos = 0
        end = len(data)
        unpack = HEADER.unpack_from
        view = None
        while end - pos >= HEADER_LEN:
            version, rtype, rid, clen, plen = unpack(data, pos)
            if version != VERSION:
                raise ProtocolError(f"record version {version}, expected 1 (not FastCGI?)")
            stop = pos + HEADER_LEN + clen
            if stop + plen > end:
                break
            # Fast paths for the records every request carries; the rest in _record.
            if rtype == STDIN and rid == self.request_id and self._params_done and rid:
                if self._stdin_done:
                    if clen:
                        raise ProtocolError("STDIN record after the STDIN stream ended")
                elif clen:
                    if clen >= STDIN_VIEW_MIN and type(data) is bytes:
                        if view is None:
                            view = memoryview(data)
                        events.append(Stdin(rid, view[pos + HEADER_LEN : stop]))
                    else:
                        events.append(Stdin(rid, data[pos + HEADER_LEN : stop]))
                else:
                    self._stdin_done = True
                    events.append(StdinEnd(rid))
            elif rtype == PARAMS and rid == self.request_id and not self._params_done and rid:
                if clen:
                    self._params_size += clen
                    if self._params_size > self.max_params:
                        raise ProtocolError(f"PARAMS larger than {self.max_params} bytes")
                    self._params.append(data[pos + HEADER_LEN : stop])
                else:
                    self._params_done = True
                    parts = self._params
                    blob = parts[0] if len(parts) == 1 else b"".join(parts)
                    self._params = []
                    self._params_size = 0
                    events.append(Params(rid, decode_pairs(blob)))
            else:
                self._record(rtype, rid, data[pos + HEADER_LEN : stop], events)
            pos = stop + plen
        if pos < end:
            if end - pos > self.max_buffer:
                raise ProtocolError(f"more than {self.max_buffer} bytes of unparsed input")
            self._buf = bytearray(data[pos:]) if pos else bytearray(data)
        elif buf:
            self._buf = bytearray()
        return events

    def _record(self, rtype: int, rid: int, content: bytes, events: List[Event]) -> None:
        if rid == 0:
            if rtype == GET_VALUES:
                events.append(GetValues(list(decode_pairs(content))))
            else:
                events.append(UnknownType(rtype))
            return
        if rtype == BEGIN_REQUEST:
            if len(content) < 8:
                raise ProtocolError(f"BEGIN_REQUEST body is {len(content)} bytes, expected 8")
            role, flags = _BEGIN_BODY.unpack_from(content)
            if self.request_id:
                if rid == self.request_id:
                    raise ProtocolError(f"BEGIN_REQUEST for request {rid}, which is active")
                events.append(Rejected(rid, CANT_MPX_CONN))
                return
            if role != RESPONDER:
                events.append(Rejected(rid, UNKNOWN_ROLE))
                return
            self.request_id = rid
            self.keep_conn = bool(flags & KEEP_CONN)
            events.append(BeginRequest(rid, role, self.keep_conn))
            return
        if rtype > UNKNOWN_TYPE or rtype in (END_REQUEST, STDOUT, STDERR, GET_VALUES_RESULT):
            # Types a web server never sends to an application.
            events.append(UnknownType(rtype))
            return
        if rid != self.request_id:
            # FastCGI: records for a request that is not active are ignored.
            return
        # PARAMS and STDIN in their proper order are handled in feed(); what reaches
        # this point broke that order.
        if rtype == PARAMS:
            raise ProtocolError("PARAMS record after the PARAMS stream ended")
        if rtype == STDIN:
            raise ProtocolError("STDIN record before the PARAMS stream ended")
        if rtype == ABORT_REQUEST:
            events.append(AbortRequest(rid))
        # DATA belongs to the FILTER role, which we reject at BEGIN_REQUEST: ignore it.


class ClientResponse:
    """What a responder answered: for our own FastCGI client (``request``, ``check``)."""

    __slots__ = ("stdout", "stderr", "app_status", "protocol_status", "complete", "records")

    def __init__(self) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.app_status = 0
        self.protocol_status = 0
        self.complete = False
        self.records: List[int] = []


class ClientConnection:
    """The web-server side: parse what a responder sends back for one request id."""

    def __init__(self, request_id: int = 1) -> None:
        self.request_id = request_id
        self._buf = bytearray()
        self.response = ClientResponse()
        self.management: List[Tuple[int, bytes]] = []

    def feed(self, data: Buffer) -> ClientResponse:
        self._buf += data
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HEADER_LEN:
            version, rtype, rid, clen, plen = HEADER.unpack_from(buf, pos)
            if version != VERSION:
                raise ProtocolError(f"record version {version} in the response")
            stop = pos + HEADER_LEN + clen
            if stop + plen > len(buf):
                break
            content = bytes(buf[pos + HEADER_LEN : stop])
            pos = stop + plen
            if rid == 0:
                self.management.append((rtype, content))
                continue
            if rid != self.request_id:
                raise ProtocolError(f"response for request {rid}, expected {self.request_id}")
            resp = self.response
            resp.records.append(rtype)
            if rtype == STDOUT:
                resp.stdout += content
            elif rtype == STDERR:
                resp.stderr += content
            elif rtype == END_REQUEST:
                if len(content) < 8:
                    raise ProtocolError("END_REQUEST body shorter than 8 bytes")
                resp.app_status, resp.protocol_status = _END_BODY.unpack_from(content)
                resp.complete = True
            else:
                raise ProtocolError(f"record type {rtype} on a request connection")
        del buf[:pos]
        return self.response


def encode_request(
    params: Dict[str, str],
    body: Buffer = b"",
    request_id: int = 1,
    keep_conn: bool = False,
) -> bytes:
    """A whole responder request as a web server would send it."""
    return b"".join(
        (
            encode_begin_request(request_id, RESPONDER, keep_conn),
            encode_stream(PARAMS, request_id, encode_pairs(params.items())),
            encode_record(PARAMS, request_id),
            encode_stream(STDIN, request_id, body),
            encode_record(STDIN, request_id),
        )
    )
