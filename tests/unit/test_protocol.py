"""Byte-level tests for the sans-I/O FastCGI layer (fcgi_manager.wire.protocol).

Requests are written as raw records with :func:`rec`, which builds headers with ``struct``
rather than with the module under test, so an encoder bug cannot hide a parser bug.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from support import describe_event

from fcgi_manager.errors import ProtocolError
from fcgi_manager.wire import protocol as p

FIXTURES = Path(__file__).parent.parent / "fixtures" / "fcgi_invalid"
INVALID_FIXTURES = sorted(FIXTURES.glob("*.bin"))

BEGIN_BODY_RESPONDER = b"\x00\x01\x00\x00\x00\x00\x00\x00"
BEGIN_BODY_RESPONDER_KEEP = b"\x00\x01\x01\x00\x00\x00\x00\x00"


def rec(rtype: int, rid: int, content: bytes = b"", padding: int = 0, pad: bytes = b"\0") -> bytes:
    """One raw record: version 1, big-endian header, ``padding`` copies of ``pad``."""
    header = struct.pack("!BBHHBx", 1, rtype, rid, len(content), padding)
    return header + content + pad * padding


def begin(rid: int = 1, keep_conn: bool = False, role: int = 1) -> bytes:
    return rec(1, rid, struct.pack("!HB5x", role, 1 if keep_conn else 0))


describe = describe_event


def feed_all(data: bytes, conn: p.ServerConnection | None = None) -> list[tuple]:
    conn = conn or p.ServerConnection()
    return [describe(e) for e in conn.feed(data)]


def feed_bytewise(data: bytes, conn: p.ServerConnection | None = None) -> list[tuple]:
    conn = conn or p.ServerConnection()
    events = []
    for i in range(len(data)):
        events.extend(describe(e) for e in conn.feed(data[i : i + 1]))
    return events


def parse_records(data: bytes) -> list[tuple[int, int, int, int, bytes]]:
    """Split encoder output into (version, type, request_id, padding, content) tuples."""
    out = []
    pos = 0
    while pos < len(data):
        version, rtype, rid, clen, plen = struct.unpack_from("!BBHHBx", data, pos)
        content = data[pos + 8 : pos + 8 + clen]
        assert len(content) == clen, "record runs past the end of the data"
        out.append((version, rtype, rid, plen, content))
        pos += 8 + clen + plen
    assert pos == len(data)
    return out


# --- records and padding ----------------------------------------------------------------


def test_begin_request_bytes_match_the_spec_layout():
    raw = b"\x01\x01\x00\x01\x00\x08\x00\x00" + b"\x00\x01\x01\x00\x00\x00\x00\x00"
    assert p.encode_begin_request(1, p.RESPONDER, keep_conn=True) == raw
    assert p.encode_begin_request(0x1234, p.RESPONDER) == (
        b"\x01\x01\x12\x34\x00\x08\x00\x00" + BEGIN_BODY_RESPONDER
    )
    conn = p.ServerConnection()
    assert feed_all(raw, conn) == [("BeginRequest", 1, 1, True)]
    assert conn.request_id == 1
    assert conn.keep_conn is True
    assert conn.buffered == 0


def test_begin_request_with_longer_body_is_accepted():
    # The body is 8 bytes in FastCGI 1.0; extra bytes a future version might add are ignored.
    data = rec(1, 3, BEGIN_BODY_RESPONDER + b"\xaa\xbb")
    assert feed_all(data) == [("BeginRequest", 3, 1, False)]


def test_padding_is_skipped_and_never_delivered():
    body = b"hello"
    data = (
        rec(1, 1, BEGIN_BODY_RESPONDER, padding=8, pad=b"\xee")
        + rec(4, 1, b"\x04\x03HOSTabc", padding=5, pad=b"\xff")
        + rec(4, 1, padding=255, pad=b"\x01")
        + rec(5, 1, body, padding=3, pad=b"P")
        + rec(5, 1, padding=7, pad=b"\x05")
    )
    expected = [
        ("BeginRequest", 1, 1, False),
        ("Params", 1, {"HOST": "abc"}),
        ("Stdin", 1, b"hello"),
        ("StdinEnd", 1),
    ]
    assert feed_all(data) == expected
    assert feed_bytewise(data) == expected


def test_record_is_held_until_its_padding_arrives():
    data = begin() + rec(4, 1, b"\x01\x01ab", padding=6) + rec(4, 1)
    conn = p.ServerConnection()
    cut = len(begin()) + 8 + 4 + 3  # content complete, 3 of 6 padding bytes
    assert feed_all(data[:cut], conn) == [("BeginRequest", 1, 1, False)]
    assert conn.buffered == 8 + 4 + 3
    assert feed_all(data[cut:], conn) == [("Params", 1, {"a": "b"})]
    assert conn.buffered == 0


def test_encode_record_with_padding():
    assert p.encode_record(p.STDOUT, 2, b"abc", padding=5) == (
        b"\x01\x06\x00\x02\x00\x03\x05\x00" + b"abc" + b"\0" * 5
    )
    assert p.encode_record(p.PARAMS, 1) == b"\x01\x04\x00\x01\x00\x00\x00\x00"
    with pytest.raises(ValueError):
        p.encode_record(p.STDOUT, 1, b"x" * 65536)


# --- name-value pairs -------------------------------------------------------------------


def test_decode_pairs_one_byte_lengths():
    data = b"\x04\x03HOSTabc" + b"\x0e\x03REQUEST_METHODGET" + b"\x00\x00" + b"\x01\x00X"
    assert p.decode_pairs(data) == {"HOST": "abc", "REQUEST_METHOD": "GET", "": "", "X": ""}


def test_decode_pairs_four_byte_lengths():
    name = b"N" * 200
    value = bytes(range(256)) * 4
    data = b"\x80\x00\x00\xc8" + b"\x80\x00\x04\x00" + name + value
    assert p.decode_pairs(data) == {"N" * 200: value.decode("latin-1")}


def test_decode_pairs_mixed_and_non_minimal_lengths():
    long_value = b"v" * 300
    data = (
        b"\x03\x80\x00\x01\x2c" + b"abc" + long_value  # 1-byte name, 4-byte value
        + b"\x80\x00\x00\x81\x02" + b"n" * 129 + b"ok"  # 4-byte name, 1-byte value
        + b"\x80\x00\x00\x02\x80\x00\x00\x01" + b"hiX"  # 4-byte encodings of small lengths
    )
    assert p.decode_pairs(data) == {"abc": "v" * 300, "n" * 129: "ok", "hi": "X"}


def test_decode_pairs_is_latin1_and_later_duplicates_win():
    data = b"\x01\x02a\xe9\xff" + b"\x01\x01ab"
    assert p.decode_pairs(data) == {"a": "b"}
    assert p.decode_pairs(b"\x01\x02a\xe9\xff") == {"a": "\u00e9\u00ff"}


def test_encode_pairs_switches_to_four_bytes_above_127():
    assert p.encode_pairs([("a" * 127, "")]) == b"\x7f\x00" + b"a" * 127
    assert p.encode_pairs([("a" * 128, "")]) == b"\x80\x00\x00\x80\x00" + b"a" * 128
    assert p.encode_pairs([("k", "v" * 70000)]) == b"\x01\x80\x01\x11\x70k" + b"v" * 70000
    assert p.encode_pairs([(b"\xff", b"")]) == b"\x01\x00\xff"
    assert p.encode_pairs([("\u00e9", "\u20ac")]) == b"\x01\x03\xe9\xe2\x82\xac"
    assert p.encode_pairs([]) == b""


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x04", id="value-length-missing"),
        pytest.param(b"\x04\x03HOSTab", id="value-short-by-one"),
        pytest.param(b"\x04\x03HOS", id="name-short"),
        pytest.param(b"\x80", id="4-byte-name-length-1-of-4"),
        pytest.param(b"\x80\x00\x00", id="4-byte-name-length-3-of-4"),
        pytest.param(b"\x01\x80\x00", id="4-byte-value-length-truncated"),
        pytest.param(b"\xff\xff\xff\xff\x00abc", id="name-length-2GiB"),
        pytest.param(b"\x01\xff\xff\xff\xfeab", id="value-length-2GiB"),
        pytest.param(b"\x80\x00\x00\x05\x80\x00\x00\x05" + b"x" * 9, id="4-byte-both-short"),
        pytest.param(b"\x01\x01ab\x7f", id="good-pair-then-truncated"),
    ],
)
def test_decode_pairs_rejects_truncated_and_overlong_lengths(data):
    with pytest.raises(ProtocolError):
        p.decode_pairs(data)


def test_decode_pairs_limits_the_number_of_pairs():
    assert len(p.decode_pairs(b"\x01\x00a" * 5, max_pairs=5)) == 1
    data = b"".join(bytes((1, 0, 65 + i)) for i in range(6))
    assert len(p.decode_pairs(data, max_pairs=6)) == 6
    with pytest.raises(ProtocolError):
        p.decode_pairs(data, max_pairs=5)


# --- a typical nginx request --------------------------------------------------------------

NGINX_PARAMS = [
    ("QUERY_STRING", "a=1&b=2"),
    ("REQUEST_METHOD", "POST"),
    ("CONTENT_TYPE", "application/x-www-form-urlencoded"),
    ("CONTENT_LENGTH", "11"),
    ("SCRIPT_NAME", ""),
    ("REQUEST_URI", "/submit?a=1&b=2"),
    ("DOCUMENT_URI", "/submit"),
    ("SERVER_PROTOCOL", "HTTP/1.1"),
    ("REMOTE_ADDR", "127.0.0.1"),
    ("SERVER_NAME", "example.org"),
    ("HTTP_COOKIE", "session=" + "c" * 300),  # needs a 4-byte value length
    ("HTTP_X_" + "LONG_" * 30, "1"),  # needs a 4-byte name length
    ("HTTP_USER_AGENT", "curl/8.0 \u00e9"),
]


def _pairs_raw() -> bytes:
    out = b""
    for name, value in NGINX_PARAMS:
        nb, vb = name.encode("latin-1"), value.encode("latin-1")
        for n in (len(nb), len(vb)):
            out += bytes((n,)) if n < 128 else struct.pack("!I", n | 0x80000000)
        out += nb + vb
    return out


def nginx_request(rid: int, keep_conn: bool) -> bytes:
    pairs = _pairs_raw()
    # Split points inside a name, inside a 4-byte length and inside a value.
    cuts = [0, 5, pairs.index(b"HTTP_COOKIE") - 3, pairs.index(b"session=") + 4, len(pairs)]
    params = b"".join(rec(4, rid, pairs[a:b]) for a, b in zip(cuts, cuts[1:]))
    return (
        begin(rid, keep_conn)
        + params
        + rec(4, rid)
        + rec(5, rid, b"name=", padding=3)
        + rec(5, rid, b"value&x=1")
        + rec(5, rid)
    )


def nginx_events(rid: int, keep_conn: bool) -> list[tuple]:
    return [
        ("BeginRequest", rid, 1, keep_conn),
        ("Params", rid, dict(NGINX_PARAMS)),
        ("Stdin", rid, b"name="),
        ("Stdin", rid, b"value&x=1"),
        ("StdinEnd", rid),
    ]


@pytest.mark.parametrize("keep_conn", [False, True])
@pytest.mark.parametrize("feeder", [feed_all, feed_bytewise], ids=["whole", "bytewise"])
def test_nginx_request(feeder, keep_conn):
    data = nginx_request(1, keep_conn)
    conn = p.ServerConnection()
    assert feeder(data, conn) == nginx_events(1, keep_conn)
    assert conn.request_id == 1
    assert conn.keep_conn is keep_conn
    assert conn.buffered == 0


def test_nginx_request_in_two_halves_gives_the_same_events():
    data = nginx_request(1, True)
    for cut in range(0, len(data) + 1, 37):
        conn = p.ServerConnection()
        events = feed_all(data[:cut], conn) + feed_all(data[cut:], conn)
        assert events == nginx_events(1, True), cut


def test_request_without_params_or_body():
    data = begin(9) + rec(4, 9) + rec(5, 9)
    expected = [("BeginRequest", 9, 1, False), ("Params", 9, {}), ("StdinEnd", 9)]
    assert feed_all(data) == expected
    assert feed_bytewise(data) == expected


def test_duplicate_empty_stdin_is_ignored():
    data = begin() + rec(4, 1) + rec(5, 1) + rec(5, 1)
    assert feed_all(data) == [("BeginRequest", 1, 1, False), ("Params", 1, {}), ("StdinEnd", 1)]


def test_data_records_are_ignored():
    data = begin() + rec(4, 1) + rec(8, 1, b"filter data") + rec(5, 1)
    assert feed_all(data) == [("BeginRequest", 1, 1, False), ("Params", 1, {}), ("StdinEnd", 1)]


def test_encode_request_matches_handwritten_records():
    params = {"A": "1", "B": ""}
    assert p.encode_request(params, b"xyz", request_id=2, keep_conn=True) == (
        begin(2, True)
        + rec(4, 2, b"\x01\x01A1\x01\x00B")
        + rec(4, 2)
        + rec(5, 2, b"xyz")
        + rec(5, 2)
    )
    # Empty params and body: only the terminating records, no empty data records.
    assert p.encode_request({}, b"") == begin(1) + rec(4, 1) + rec(5, 1)


# --- keep-conn, multiplexing, roles, aborts ------------------------------------------------


def test_request_done_allows_the_next_request_on_a_kept_connection():
    conn = p.ServerConnection()
    assert feed_all(nginx_request(1, True), conn) == nginx_events(1, True)
    conn.request_done()
    assert conn.request_id == 0
    assert feed_bytewise(nginx_request(1, True), conn) == nginx_events(1, True)
    conn.request_done()
    assert feed_all(nginx_request(7, False), conn) == nginx_events(7, False)
    assert conn.keep_conn is False


def test_next_request_before_request_done_is_rejected():
    conn = p.ServerConnection()
    feed_all(nginx_request(1, True), conn)
    assert feed_all(begin(2, True), conn) == [("Rejected", 2, p.CANT_MPX_CONN)]
    assert conn.request_id == 1


def test_second_begin_request_while_active_is_cant_mpx_conn():
    data = (
        begin(1, True)
        + rec(4, 1, b"\x01\x01ab")
        + begin(2, True)
        + rec(4, 2, b"\x01\x01zz")  # belongs to the rejected request: ignored
        + rec(4, 2)
        + rec(4, 1)
        + rec(5, 2, b"ignored")
        + rec(5, 1, b"body")
        + rec(5, 1)
    )
    expected = [
        ("BeginRequest", 1, 1, True),
        ("Rejected", 2, p.CANT_MPX_CONN),
        ("Params", 1, {"a": "b"}),
        ("Stdin", 1, b"body"),
        ("StdinEnd", 1),
    ]
    assert feed_all(data) == expected
    assert feed_bytewise(data) == expected


@pytest.mark.parametrize("role", [p.AUTHORIZER, p.FILTER, 0, 77])
def test_non_responder_role_is_unknown_role(role):
    conn = p.ServerConnection()
    data = begin(4, role=role) + rec(4, 4, b"\x01\x01ab") + rec(4, 4) + rec(5, 4)
    assert feed_all(data, conn) == [("Rejected", 4, p.UNKNOWN_ROLE)]
    assert conn.request_id == 0
    # The connection stays usable for a responder request.
    assert feed_all(begin(5), conn) == [("BeginRequest", 5, 1, False)]


def test_abort_request_for_the_active_request():
    data = begin(1) + rec(4, 1, b"\x01\x01ab") + rec(2, 1) + rec(4, 1)
    expected = [("BeginRequest", 1, 1, False), ("AbortRequest", 1), ("Params", 1, {"a": "b"})]
    assert feed_all(data) == expected
    assert feed_bytewise(data) == expected


def test_abort_after_the_body_and_reuse():
    conn = p.ServerConnection()
    feed_all(nginx_request(1, True), conn)
    assert feed_all(rec(2, 1), conn) == [("AbortRequest", 1)]
    conn.request_done()
    assert feed_all(begin(1, True), conn) == [("BeginRequest", 1, 1, True)]


def test_records_for_inactive_request_ids_are_ignored():
    conn = p.ServerConnection()
    idle = rec(4, 3, b"\x01\x01ab") + rec(4, 3) + rec(5, 3, b"data") + rec(5, 3) + rec(2, 3)
    assert feed_all(idle, conn) == []
    assert conn.request_id == 0
    assert feed_all(begin(1), conn) == [("BeginRequest", 1, 1, False)]
    # Garbage that would be a grammar error for the active request is ignored for others.
    assert feed_all(rec(5, 3, b"early stdin") + rec(4, 65535, b"\xff") + rec(2, 2), conn) == []
    assert feed_all(rec(4, 1) + rec(5, 1), conn) == [("Params", 1, {}), ("StdinEnd", 1)]


def test_records_of_the_finished_request_are_ignored_after_request_done():
    conn = p.ServerConnection()
    feed_all(nginx_request(1, True), conn)
    conn.request_done()
    assert feed_all(rec(5, 1, b"late") + rec(2, 1), conn) == []


# --- management records --------------------------------------------------------------------

GET_VALUES_NAMES = b"\x0e\x00FCGI_MAX_CONNS" + b"\x0d\x00FCGI_MAX_REQS" + b"\x0f\x00FCGI_MPXS_CONNS"


def test_get_values_on_request_id_zero():
    data = rec(9, 0, GET_VALUES_NAMES, padding=3)
    expected = [("GetValues", ["FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS"])]
    assert feed_all(data) == expected
    assert feed_bytewise(data) == expected
    assert feed_all(rec(9, 0)) == [("GetValues", [])]


def test_get_values_during_a_request_does_not_disturb_it():
    data = begin(1) + rec(4, 1, b"\x01\x01ab") + rec(9, 0, GET_VALUES_NAMES) + rec(4, 1)
    assert feed_all(data) == [
        ("BeginRequest", 1, 1, False),
        ("GetValues", ["FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS"]),
        ("Params", 1, {"a": "b"}),
    ]


def test_get_values_result_round_trip():
    values = {"FCGI_MAX_CONNS": "4", "FCGI_MAX_REQS": "4", "FCGI_MPXS_CONNS": "0"}
    raw = p.encode_get_values_result(values)
    content = b"\x0e\x01FCGI_MAX_CONNS4" + b"\x0d\x01FCGI_MAX_REQS4" + b"\x0f\x01FCGI_MPXS_CONNS0"
    assert raw == b"\x01\x0a\x00\x00" + struct.pack("!H", len(content)) + b"\x00\x00" + content
    client = p.ClientConnection(1)
    client.feed(raw)
    assert client.management == [(p.GET_VALUES_RESULT, content)]
    assert p.decode_pairs(client.management[0][1]) == values
    assert client.response.records == []


@pytest.mark.parametrize("rtype", [0, 1, 2, 3, 4, 5, 12, 42, 255])
def test_unknown_management_type(rtype):
    data = rec(rtype, 0, b"anything", padding=1)
    conn = p.ServerConnection()
    assert feed_all(data, conn) == [("UnknownType", rtype)]
    assert conn.request_id == 0


def test_encode_unknown_type_bytes():
    assert p.encode_unknown_type(42) == b"\x01\x0b\x00\x00\x00\x08\x00\x00" + b"\x2a" + b"\0" * 7


@pytest.mark.parametrize("rtype", [p.END_REQUEST, p.STDOUT, p.STDERR, p.GET_VALUES_RESULT, 12, 200])
def test_types_an_application_never_receives_are_unknown(rtype):
    data = begin(1) + rec(rtype, 1, b"xx") + rec(4, 1)
    assert feed_all(data) == [
        ("BeginRequest", 1, 1, False),
        ("UnknownType", rtype),
        ("Params", 1, {}),
    ]


# --- limits and grammar errors -------------------------------------------------------------


def test_params_over_max_params():
    ok = p.ServerConnection(max_params=100)
    data = begin() + rec(4, 1, b"\x01\x5e" + b"a" + b"v" * 94) + rec(4, 1, b"\x01\x00b")
    assert len(b"\x01\x5e" + b"a" + b"v" * 94) + 3 == 100
    events = feed_all(data + rec(4, 1), ok)
    assert events[-1] == ("Params", 1, {"a": "v" * 94, "b": ""})

    over = p.ServerConnection(max_params=100)
    with pytest.raises(ProtocolError):
        over.feed(begin() + rec(4, 1, b"x" * 60) + rec(4, 1, b"y" * 41))


def test_params_over_default_max_params():
    conn = p.ServerConnection()
    conn.feed(begin())
    chunk = rec(4, 1, b"\x00" * 65535)
    for _ in range(p.DEFAULT_MAX_PARAMS // 65535):
        assert conn.feed(chunk) == []
    with pytest.raises(ProtocolError):
        conn.feed(chunk)


def test_unparsed_buffer_over_max_buffer():
    header = struct.pack("!BBHHBx", 1, 5, 1, 1000, 0)
    conn = p.ServerConnection(max_buffer=64)
    conn.feed(header + b"x" * 56)
    assert conn.buffered == 64
    with pytest.raises(ProtocolError):
        conn.feed(b"x")


def test_unparsed_buffer_over_max_buffer_in_one_feed():
    conn = p.ServerConnection(max_buffer=64)
    with pytest.raises(ProtocolError):
        conn.feed(begin() + struct.pack("!BBHHBx", 1, 4, 1, 500, 0) + b"p" * 100)


def test_complete_records_larger_than_max_buffer_are_fine():
    conn = p.ServerConnection(max_buffer=64)
    events = feed_all(begin() + rec(4, 1) + rec(5, 1, b"z" * 1000) + rec(5, 1), conn)
    assert events[2] == ("Stdin", 1, b"z" * 1000)
    assert conn.buffered == 0


def test_wrong_version():
    with pytest.raises(ProtocolError):
        p.ServerConnection().feed(b"\x02\x01\x00\x01\x00\x08\x00\x00" + BEGIN_BODY_RESPONDER)


def test_stdin_before_params_end():
    conn = p.ServerConnection()
    conn.feed(begin() + rec(4, 1, b"\x01\x01ab"))
    with pytest.raises(ProtocolError):
        conn.feed(rec(5, 1, b"body"))


def test_invalid_fixture_directory_is_populated():
    assert len(INVALID_FIXTURES) >= 20


@pytest.mark.parametrize("path", INVALID_FIXTURES, ids=[f.stem for f in INVALID_FIXTURES])
def test_invalid_fixture_raises_protocol_error(path):
    data = path.read_bytes()
    with pytest.raises(ProtocolError):
        p.ServerConnection().feed(data)
    conn = p.ServerConnection()
    with pytest.raises(ProtocolError):
        for i in range(len(data)):
            conn.feed(data[i : i + 1])


# --- encoders for the response side --------------------------------------------------------


def test_encode_stream_empty_data_gives_no_record():
    assert p.encode_stream(p.STDOUT, 1, b"") == b""
    assert p.encode_stream(p.STDERR, 1, bytearray()) == b""


@pytest.mark.parametrize(
    "size, lengths",
    [
        (1, [1]),
        (65535, [65535]),
        (65536, [65535, 1]),
        (65535 * 2, [65535, 65535]),
        (65535 * 3 + 7, [65535, 65535, 65535, 7]),
    ],
)
def test_encode_stream_splits_at_65535(size, lengths):
    data = bytes(i % 251 for i in range(size))
    records = parse_records(p.encode_stream(p.STDOUT, 3, data))
    assert [len(r[4]) for r in records] == lengths
    assert all(r[:4] == (1, p.STDOUT, 3, 0) for r in records)
    assert b"".join(r[4] for r in records) == data


def test_encode_stream_accepts_bytearray_and_memoryview():
    data = bytearray(b"q" * 70000)
    assert p.encode_stream(p.STDOUT, 1, data) == p.encode_stream(p.STDOUT, 1, bytes(data))
    view = memoryview(b"hello")
    assert p.encode_stream(p.STDOUT, 1, view) == b"\x01\x06\x00\x01\x00\x05\x00\x00hello"


def test_long_body_is_parsed_back_from_encode_stream():
    body = bytes(range(256)) * 600  # 153600 bytes: three STDIN records
    data = begin() + rec(4, 1) + p.encode_stream(p.STDIN, 1, body) + rec(5, 1)
    events = feed_all(data)
    kinds = [e[0] for e in events]
    assert kinds == ["BeginRequest", "Params", "Stdin", "Stdin", "Stdin", "StdinEnd"]
    assert b"".join(e[2] for e in events if e[0] == "Stdin") == body


def test_end_of_request_bytes():
    expected = (
        b"\x01\x06\x00\x01\x00\x00\x00\x00"  # empty STDOUT
        + b"\x01\x03\x00\x01\x00\x08\x00\x00"  # END_REQUEST header
        + b"\x00\x00\x00\x00\x00\x00\x00\x00"  # app_status 0, REQUEST_COMPLETE
    )
    assert p.end_of_request(1) == expected
    assert p.END_OF_REQUEST_1 == expected
    assert p.end_of_request(0x0102, app_status=500) == (
        b"\x01\x06\x01\x02\x00\x00\x00\x00"
        + b"\x01\x03\x01\x02\x00\x08\x00\x00"
        + b"\x00\x00\x01\xf4\x00\x00\x00\x00"
    )


def test_encode_end_request_statuses():
    assert p.encode_end_request(2, 0, p.CANT_MPX_CONN) == (
        b"\x01\x03\x00\x02\x00\x08\x00\x00" + b"\x00\x00\x00\x00\x01\x00\x00\x00"
    )
    assert p.encode_end_request(5, 0, p.UNKNOWN_ROLE)[8:] == b"\x00\x00\x00\x00\x03\x00\x00\x00"
    # A negative exit status is sent as its 32-bit two's complement.
    assert p.encode_end_request(1, -1)[8:12] == b"\xff\xff\xff\xff"


# --- the client side -----------------------------------------------------------------------

RESPONSE = (
    rec(6, 1, b"Status: 200 OK\r\nContent-Type: text/plain\r\n", padding=6)
    + rec(7, 1, b"warning: something\n")
    + rec(6, 1, b"\r\nhello world", padding=3)
    + rec(10, 0, b"\x0e\x01FCGI_MAX_CONNS4")
    + rec(6, 1)
    + rec(3, 1, b"\x00\x00\x00\x03\x00\x00\x00\x00")
)


@pytest.mark.parametrize("chunk", [len(RESPONSE), 1, 7], ids=["whole", "bytewise", "by-7"])
def test_client_connection_parses_a_response(chunk):
    client = p.ClientConnection(1)
    for i in range(0, len(RESPONSE), chunk):
        resp = client.feed(RESPONSE[i : i + chunk])
    assert resp is client.response
    assert bytes(resp.stdout) == (
        b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\nhello world"
    )
    assert bytes(resp.stderr) == b"warning: something\n"
    assert resp.app_status == 3
    assert resp.protocol_status == p.REQUEST_COMPLETE
    assert resp.complete is True
    assert resp.records == [p.STDOUT, p.STDERR, p.STDOUT, p.STDOUT, p.END_REQUEST]
    assert client.management == [(p.GET_VALUES_RESULT, b"\x0e\x01FCGI_MAX_CONNS4")]


def test_client_connection_incomplete_until_end_request():
    client = p.ClientConnection(1)
    cut = len(RESPONSE) - 3
    assert client.feed(RESPONSE[:cut]).complete is False
    assert client.feed(RESPONSE[cut:]).complete is True


def test_client_connection_reads_encoder_output():
    data = (
        p.encode_stream(p.STDOUT, 2, b"o" * 70000)
        + p.encode_stream(p.STDERR, 2, b"err")
        + p.end_of_request(2, app_status=1)
    )
    resp = p.ClientConnection(2).feed(data)
    assert bytes(resp.stdout) == b"o" * 70000
    assert bytes(resp.stderr) == b"err"
    assert (resp.app_status, resp.complete) == (1, True)


def test_client_connection_rejection_status():
    resp = p.ClientConnection(1).feed(p.encode_end_request(1, 0, p.UNKNOWN_ROLE))
    assert resp.complete is True
    assert resp.protocol_status == p.UNKNOWN_ROLE


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(rec(6, 2, b"x"), id="other-request-id"),
        pytest.param(rec(3, 1, b"\x00\x00\x00\x00"), id="short-end-request"),
        pytest.param(rec(5, 1, b"stdin"), id="stdin-in-response"),
        pytest.param(rec(1, 1, BEGIN_BODY_RESPONDER), id="begin-in-response"),
        pytest.param(b"\x00\x06\x00\x01\x00\x00\x00\x00", id="version-0"),
        pytest.param(b"HTTP/1.1 200 OK\r\n", id="http"),
    ],
)
def test_client_connection_protocol_errors(data):
    with pytest.raises(ProtocolError):
        p.ClientConnection(1).feed(data)
