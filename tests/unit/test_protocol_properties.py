"""Property tests for fcgi_manager.wire.protocol: round trips, and "only ProtocolError" on
garbage."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import describe_event

from fcgi_manager.errors import ProtocolError
from fcgi_manager.wire import protocol as p

SETTINGS = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

LATIN1 = st.characters(min_codepoint=0, max_codepoint=255)
short_text = st.text(LATIN1, max_size=20)
long_text = st.text(LATIN1, min_size=120, max_size=400)  # straddles the 127/128 boundary
latin1_text = st.one_of(short_text, short_text, long_text)

# Long values: a short seed repeated, so a 70 kB value costs little to generate.
huge_text = st.builds(
    lambda s, n: s * n, st.text(LATIN1, min_size=1, max_size=8), st.integers(1, 9000)
)

body_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=64), st.integers(1, 3000)),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given positions (any order, duplicates allowed)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


cuts = st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=30)


describe = describe_event


# --- name-value pairs ----------------------------------------------------------------------


@SETTINGS
@given(st.lists(st.tuples(latin1_text, latin1_text), max_size=12))
def test_pairs_round_trip(pairs):
    encoded = p.encode_pairs(pairs)
    assert p.decode_pairs(encoded) == dict(pairs)
    # Every length is 1 byte below 128 and 4 bytes from 128 on.
    expected = sum(
        (1 if len(n) < 128 else 4) + (1 if len(v) < 128 else 4) + len(n) + len(v)
        for n, v in pairs
    )
    assert len(encoded) == expected


@SETTINGS
@given(st.lists(st.tuples(st.binary(max_size=300), st.binary(max_size=300)), max_size=8))
def test_pairs_round_trip_bytes(pairs):
    decoded = p.decode_pairs(p.encode_pairs(pairs))
    assert decoded == {n.decode("latin-1"): v.decode("latin-1") for n, v in pairs}


@SETTINGS
@given(st.binary(max_size=600))
def test_decode_pairs_arbitrary_bytes_only_protocol_error(data):
    try:
        pairs = p.decode_pairs(data)
    except ProtocolError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in pairs.items())
    # Whatever decoded used every byte: names and values plus at least 2 length bytes each.
    assert sum(len(k) + len(v) + 2 for k, v in pairs.items()) <= len(data)


@SETTINGS
@given(st.lists(st.tuples(short_text, short_text), min_size=1, max_size=5), st.data())
def test_truncated_pairs_raise_protocol_error(pairs, data):
    encoded = p.encode_pairs(pairs)
    cut = data.draw(st.integers(min_value=1, max_value=len(encoded)))
    truncated = encoded[: len(encoded) - cut]
    try:
        p.decode_pairs(truncated)
    except ProtocolError:
        return
    # Only cutting exactly at a pair boundary may succeed.
    assert any(truncated == p.encode_pairs(pairs[:i]) for i in range(len(pairs)))


# --- whole requests ------------------------------------------------------------------------


@SETTINGS
@given(
    params=st.dictionaries(latin1_text, st.one_of(latin1_text, huge_text), max_size=10),
    body=body_bytes,
    request_id=st.integers(min_value=1, max_value=0xFFFF),
    keep_conn=st.booleans(),
    cut_at=cuts,
)
def test_encode_request_round_trip(params, body, request_id, keep_conn, cut_at):
    data = p.encode_request(params, body, request_id=request_id, keep_conn=keep_conn)
    conn = p.ServerConnection()
    events = []
    for piece in split(data, cut_at):
        events.extend(conn.feed(piece))
    kinds = [type(e).__name__ for e in events]
    assert kinds[:2] == ["BeginRequest", "Params"]
    assert kinds[-1] == "StdinEnd"
    assert set(kinds[2:-1]) <= {"Stdin"}
    assert all(e.request_id == request_id for e in events)
    assert events[0].keep_conn is keep_conn
    assert events[1].params == params
    assert b"".join(e.data for e in events if isinstance(e, p.Stdin)) == body
    assert all(e.data for e in events if isinstance(e, p.Stdin))
    assert conn.buffered == 0


@SETTINGS
@given(
    requests=st.lists(
        st.tuples(st.dictionaries(short_text, short_text, max_size=4), st.binary(max_size=100)),
        min_size=1,
        max_size=4,
    ),
    cut_at=cuts,
)
def test_kept_connection_serves_requests_in_sequence(requests, cut_at):
    conn = p.ServerConnection()
    for params, body in requests:
        data = p.encode_request(params, body, request_id=1, keep_conn=True)
        events = []
        for piece in split(data, cut_at):
            events.extend(conn.feed(piece))
        assert events[1].params == params
        assert b"".join(e.data for e in events if isinstance(e, p.Stdin)) == body
        conn.request_done()


# --- garbage in: only ProtocolError out ----------------------------------------------------

def _record(version: int, rtype: int, rid: int, content: bytes, padding: int = 0) -> bytes:
    header = struct.pack("!BBHHBx", version, rtype, rid, len(content), padding)
    return header + content + b"\0" * padding


request_ids = st.sampled_from([1, 1, 1, 2, 65535])
paddings = st.sampled_from([0, 0, 0, 1, 7, 255])
pair_bytes = st.one_of(
    st.lists(st.tuples(short_text, latin1_text), max_size=3).map(p.encode_pairs),
    st.binary(max_size=12),
)
# Records a web server might send, plus arbitrary ones, so that streams reach every state.
record = st.one_of(
    st.builds(
        lambda rid, role, flags, pad: _record(
            1, p.BEGIN_REQUEST, rid, struct.pack("!HB5x", role, flags), pad
        ),
        request_ids,
        st.sampled_from([1, 1, 1, 2, 3, 0]),
        st.integers(0, 255),
        paddings,
    ),
    st.builds(
        lambda rid, c, pad: _record(1, p.PARAMS, rid, c, pad), request_ids, pair_bytes, paddings
    ),
    st.builds(lambda rid: _record(1, p.PARAMS, rid, b""), request_ids),
    st.builds(
        lambda rid, c, pad: _record(1, p.STDIN, rid, c, pad),
        request_ids,
        st.binary(max_size=20),
        paddings,
    ),
    st.builds(lambda rid: _record(1, p.STDIN, rid, b""), request_ids),
    st.builds(lambda rid: _record(1, p.ABORT_REQUEST, rid, b""), request_ids),
    st.builds(lambda c: _record(1, p.GET_VALUES, 0, c), pair_bytes),
    st.builds(
        _record,
        st.sampled_from([1, 1, 1, 1, 1, 1, 1, 0, 2, 255]),
        st.integers(0, 255),
        st.sampled_from([0, 1, 2]),
        st.binary(max_size=40),
        paddings,
    ),
)


def _valid_records(params: dict, body: bytes, keep_conn: bool) -> list[bytes]:
    pairs = p.encode_pairs(params.items())
    return [
        p.encode_begin_request(1, p.RESPONDER, keep_conn),
        *(_record(1, p.PARAMS, 1, pairs[i : i + 9]) for i in range(0, len(pairs), 9)),
        _record(1, p.PARAMS, 1, b""),
        *(_record(1, p.STDIN, 1, body[i : i + 7]) for i in range(0, len(body), 7)),
        _record(1, p.STDIN, 1, b""),
    ]


def _perturb(records: list[bytes], inserts: list[tuple[int, bytes]], drop: int) -> bytes:
    records = list(records)
    if drop < len(records):
        del records[drop]
    for index, extra in inserts:
        records.insert(index % (len(records) + 1), extra)
    return b"".join(records)


# Valid requests (up to three in a row) with records dropped and foreign records inserted.
perturbed_requests = st.builds(
    _perturb,
    st.lists(
        st.builds(
            _valid_records,
            st.dictionaries(short_text, st.one_of(short_text, long_text), max_size=3),
            st.binary(max_size=30),
            st.booleans(),
        ),
        min_size=1,
        max_size=3,
    ).map(lambda reqs: [r for req in reqs for r in req]),
    st.lists(st.tuples(st.integers(0, 100), record), max_size=3),
    st.integers(0, 200),
)

record_streams = st.one_of(
    st.binary(max_size=500),
    perturbed_requests,
    perturbed_requests,
    st.lists(record, max_size=16).map(b"".join),
    st.builds(  # the last record cut short
        lambda rs, cut: b"".join(rs)[:-cut],
        st.lists(record, min_size=1, max_size=16),
        st.integers(1, 20),
    ),
)


def run_server(data: bytes, cut_at: list[int], reuse: bool = False, **limits) -> list[tuple]:
    """Feed ``data`` in pieces; with ``reuse``, end each request as soon as it may end."""
    conn = p.ServerConnection(**limits)
    events = []
    for piece in split(data, cut_at):
        for event in conn.feed(piece):
            events.append(describe(event))
            if reuse and isinstance(event, (p.StdinEnd, p.AbortRequest)):
                conn.request_done()
    return events


@SETTINGS
@given(data=record_streams, cut_at=cuts)
def test_server_connection_arbitrary_input_only_protocol_error(data, cut_at):
    try:
        chunked = run_server(data, cut_at)
    except ProtocolError:
        chunked = None
    try:
        whole = run_server(data, [])
    except ProtocolError:
        whole = None
    # Chunking never changes the outcome.
    assert chunked == whole


@SETTINGS
@given(data=record_streams, cut_at=cuts)
def test_server_connection_small_limits_only_protocol_error(data, cut_at):
    try:
        events = run_server(data, cut_at, reuse=True, max_params=16, max_buffer=24)
    except ProtocolError:
        return
    # Within the limits, every Params event decoded at most 16 bytes of pairs.
    for event in events:
        if event[0] == "Params":
            assert sum(len(k) + len(v) + 2 for k, v in event[2].items()) <= 16


@SETTINGS
@given(data=record_streams, cut_at=cuts)
def test_client_connection_arbitrary_input_only_protocol_error(data, cut_at):
    client = p.ClientConnection(1)
    try:
        for piece in split(data, cut_at):
            client.feed(piece)
    except ProtocolError:
        return
    whole = p.ClientConnection(1)
    resp_whole = whole.feed(data)
    resp = client.response
    assert bytes(resp.stdout) == bytes(resp_whole.stdout)
    assert bytes(resp.stderr) == bytes(resp_whole.stderr)
    assert resp.records == resp_whole.records
    assert client.management == whole.management
