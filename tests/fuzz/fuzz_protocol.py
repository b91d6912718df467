#!/usr/bin/env python3
"""Mutational fuzzer for the sans-I/O FastCGI layer (fcgi_manager.wire.protocol).

Standard library only. Each input is either random bytes or a valid request/response
mutated with bit flips, interesting bytes, truncations, header and name-value length
overwrites, splices, insertions, deletions and duplications. Every input goes to:

* ``ServerConnection.feed`` whole and in a random chunking: both must give the same events
  (or both raise ProtocolError), and the event sequence must follow the request grammar;
* ``ServerConnection`` with tiny limits, ending each request as soon as it may end;
* ``decode_pairs`` (a successful decode must survive re-encoding);
* ``ClientConnection.feed`` whole and chunked, with the same differential check.

Anything other than ProtocolError -- including a failed check -- is a crash: the input is
saved to ``tests/fixtures/fcgi_crashes/<sha1>.bin`` and the exit status is 1.

    python tests/fuzz/fuzz_protocol.py --seconds 30 --seed 1
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fcgi_manager.errors import ProtocolError  # noqa: E402
from fcgi_manager.wire import protocol as p  # noqa: E402
from tests.fuzz import driver  # noqa: E402
from tests.fuzz.driver import CheckFailed, FuzzResult  # noqa: E402,F401
from tests.support import describe_event  # noqa: E402

CRASH_DIR = ROOT / "tests" / "fixtures" / "fcgi_crashes"

INTERESTING_8 = [0x00, 0x01, 0x7F, 0x80, 0x81, 0xFE, 0xFF]
INTERESTING_16 = [0, 1, 7, 8, 9, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFF8, 0xFFFF]
INTERESTING_32 = [
    0x80000000,
    0x80000001,
    0x8000007F,
    0x80000080,
    0x8000FFFF,
    0x80010000,
    0xFFFFFFFE,
    0xFFFFFFFF,
    0x7FFFFFFF,
]
HEADER = p.HEADER





# --- seed corpus ---------------------------------------------------------------------------


def _rec(rtype: int, rid: int, content: bytes = b"", padding: int = 0) -> bytes:
    return p.encode_record(rtype, rid, content, padding)


def _nginx_params(extra: int = 0) -> dict:
    params = {
        "QUERY_STRING": "a=1",
        "REQUEST_METHOD": "POST",
        "CONTENT_TYPE": "text/plain",
        "CONTENT_LENGTH": "5",
        "SCRIPT_NAME": "",
        "REQUEST_URI": "/x?a=1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "example.org",
    }
    if extra:
        params["HTTP_COOKIE"] = "c" * extra
        params["HTTP_X_" + "L" * 130] = "\u00e9"
    return params


def server_seeds() -> List[bytes]:
    begin_keep = p.encode_begin_request(1, p.RESPONDER, keep_conn=True)
    small = p.encode_request({"A": "b"}, b"body", keep_conn=True)
    get_values = _rec(
        p.GET_VALUES,
        0,
        p.encode_pairs([("FCGI_MAX_CONNS", ""), ("FCGI_MAX_REQS", ""), ("FCGI_MPXS_CONNS", "")]),
    )
    padded = (
        _rec(p.BEGIN_REQUEST, 1, b"\x00\x01\x00\x00\x00\x00\x00\x00", padding=3)
        + _rec(p.PARAMS, 1, b"\x04\x03HOSTabc", padding=7)
        + _rec(p.PARAMS, 1, padding=1)
        + _rec(p.STDIN, 1, b"data", padding=4)
        + _rec(p.STDIN, 1, padding=255)
    )
    pairs = p.encode_pairs(_nginx_params(200).items())
    split_params = (
        begin_keep
        + b"".join(_rec(p.PARAMS, 1, pairs[i : i + 50]) for i in range(0, len(pairs), 50))
        + _rec(p.PARAMS, 1)
        + _rec(p.STDIN, 1, b"x" * 30)
        + _rec(p.STDIN, 1, b"y" * 3)
        + _rec(p.STDIN, 1)
    )
    return [
        p.encode_request(_nginx_params(), b"hello"),
        p.encode_request(_nginx_params(), b"", keep_conn=True),
        split_params,
        small + small,
        small + get_values + small,
        get_values,
        padded,
        p.encode_request({}, b""),
        p.encode_request({"K" * 128: "V" * 300}, bytes(range(256))),
        begin_keep + _rec(p.PARAMS, 1, b"\x01\x01ab") + _rec(p.ABORT_REQUEST, 1),
        p.encode_begin_request(3, p.AUTHORIZER) + _rec(p.PARAMS, 3) + _rec(p.STDIN, 3),
        begin_keep + p.encode_begin_request(2, p.RESPONDER) + _rec(p.PARAMS, 1) + _rec(p.STDIN, 1),
        _rec(42, 0, b"\0" * 8) + _rec(p.DATA, 1, b"d") + small,
        _rec(p.STDIN, 5, b"inactive") + small,
    ]


def client_seeds() -> List[bytes]:
    return [
        p.encode_stream(p.STDOUT, 1, b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\nhi")
        + p.encode_stream(p.STDERR, 1, b"warning\n")
        + p.end_of_request(1, 0),
        p.encode_get_values_result({"FCGI_MAX_CONNS": "4", "FCGI_MPXS_CONNS": "0"}),
        p.encode_end_request(1, 0, p.CANT_MPX_CONN),
        _rec(p.STDOUT, 1, b"x" * 20, padding=5) + p.encode_end_request(1, 255),
    ]


# --- mutations -----------------------------------------------------------------------------


def record_offsets(data: bytes) -> List[Tuple[int, int, int]]:
    """(offset, type, content length) of each record header, walking leniently."""
    out = []
    pos = 0
    while len(data) - pos >= 8:
        _, rtype, _, clen, plen = HEADER.unpack_from(data, pos)
        out.append((pos, rtype, clen))
        pos += 8 + clen + plen
    return out


def _put(data: bytearray, pos: int, raw: bytes) -> None:
    data[pos : pos + len(raw)] = raw


def mutate(data: bytes, rng: random.Random, corpus: List[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        choice = rng.randrange(11)
        n = len(buf)
        if choice == 0 and n:  # bit flips
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif choice == 1 and n:  # interesting byte
            buf[rng.randrange(n)] = rng.choice(INTERESTING_8)
        elif choice == 2 and n:  # truncation, at the end or the front
            cut = rng.randrange(n)
            buf = buf[:cut] if rng.random() < 0.8 else buf[cut:]
        elif choice in (3, 4):  # header field overwrite
            headers = record_offsets(bytes(buf))
            if not headers:
                continue
            pos = rng.choice(headers)[0]
            field = rng.randrange(5)
            if field == 0:  # content length
                _put(buf, pos + 4, rng.choice(INTERESTING_16).to_bytes(2, "big"))
            elif field == 1:  # padding length
                buf[pos + 6] = rng.choice(INTERESTING_8)
            elif field == 2:  # version
                buf[pos] = rng.choice((0, 2, 0xFF, 1))
            elif field == 3:  # type
                buf[pos + 1] = rng.choice((rng.randrange(13), rng.randrange(256)))
            else:  # request id
                _put(buf, pos + 2, rng.choice((0, 1, 2, 0xFFFF)).to_bytes(2, "big"))
        elif choice in (5, 6):  # name-value length overwrite inside PARAMS / GET_VALUES
            targets = [
                (pos, clen)
                for pos, rtype, clen in record_offsets(bytes(buf))
                if rtype in (p.PARAMS, p.GET_VALUES) and clen
            ]
            if not targets:
                continue
            pos, clen = rng.choice(targets)
            at = pos + 8 + rng.randrange(clen)
            if rng.random() < 0.5:
                raw = rng.choice(INTERESTING_32).to_bytes(4, "big")
            else:
                raw = bytes((rng.choice((0, 1, 0x7F, rng.randrange(128))),))
            _put(buf, at, raw)
        elif choice == 7:  # splice with another input
            other = rng.choice(corpus)
            buf = buf[: rng.randint(0, n)] + other[rng.randint(0, len(other)) :]
        elif choice == 8:  # insert random bytes or a record of another input
            other = rng.choice(corpus)
            heads = record_offsets(other)
            if heads and rng.random() < 0.5:
                pos, _, clen = rng.choice(heads)
                piece = other[pos : pos + 8 + clen]
            else:
                piece = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            at = rng.choice([h[0] for h in record_offsets(bytes(buf))] or [0, n])
            buf[at:at] = piece
        elif choice == 9 and n:  # delete a range
            a = rng.randrange(n)
            del buf[a : a + rng.randint(1, 32)]
        elif choice == 10 and n:  # duplicate a range
            a = rng.randrange(n)
            b = min(n, a + rng.randint(1, 64))
            buf[a:a] = buf[a:b]
    return bytes(buf)


def random_input(rng: random.Random) -> bytes:
    n = rng.choice((rng.randint(0, 16), rng.randint(0, 64), rng.randint(0, 512)))
    if rng.random() < 0.5:
        return bytes(rng.randrange(256) for _ in range(n))
    # Random records with a valid version, so the parser looks past the first header.
    out = bytearray()
    for _ in range(rng.randint(1, 6)):
        clen = rng.choice((0, 1, 8, rng.randrange(40)))
        plen = rng.choice((0, 0, 1, rng.randrange(256)))
        out += HEADER.pack(1, rng.randrange(13), rng.choice((0, 1, 2)), clen, plen)
        out += bytes(rng.randrange(256) for _ in range(clen + plen))
    return bytes(out)


def chunking(data: bytes, rng: random.Random) -> List[bytes]:
    n = len(data)
    mode = rng.randrange(5)
    if mode == 0 or n < 2:
        return [data]
    if mode == 1 and n <= 4096:
        return [data[i : i + 1] for i in range(n)]
    if mode == 2:  # cuts near record boundaries
        points = set()
        for pos, _, clen in record_offsets(data):
            for q in (pos - 1, pos, pos + 1, pos + 7, pos + 8, pos + 8 + clen):
                if 0 < q < n:
                    points.add(q)
    else:
        limit = rng.choice((8, 64, n))
        points = set()
        pos = 0
        while pos < n:
            pos += rng.randint(1, limit)
            points.add(min(pos, n))
    cuts = [0] + sorted(points) + [n]
    return [data[a:b] for a, b in zip(cuts, cuts[1:]) if a < b]


# --- targets -------------------------------------------------------------------------------


_describe = describe_event


def _run_server(chunks: List[bytes], reuse: bool = False, **limits) -> Optional[List[tuple]]:
    """Events from feeding ``chunks``; None when ProtocolError was raised."""
    conn = p.ServerConnection(**limits)
    events: List[tuple] = []
    try:
        for chunk in chunks:
            for event in conn.feed(chunk):
                events.append(_describe(event))
                if reuse and isinstance(event, (p.StdinEnd, p.AbortRequest)):
                    conn.request_done()
    except ProtocolError:
        return None
    data = b"".join(chunks)
    if conn.buffered != len(data) - _consumed(data):
        raise CheckFailed(f"buffered {conn.buffered} bytes, expected the trailing partial record")
    return events


def _consumed(data: bytes) -> int:
    pos = 0
    while len(data) - pos >= 8:
        _, _, _, clen, plen = HEADER.unpack_from(data, pos)
        if pos + 8 + clen + plen > len(data):
            break
        pos += 8 + clen + plen
    return pos


def _check_grammar(events: List[tuple]) -> None:
    """Events of one connection without request_done(): one request at most, in order."""
    state = "idle"  # idle -> begun -> params -> done
    active = 0
    for event in events:
        kind = event[0]
        if kind in ("GetValues", "UnknownType", "Rejected"):
            continue
        if kind == "BeginRequest":
            if state != "idle":
                raise CheckFailed(f"second BeginRequest accepted: {events}")
            state, active = "begun", event[1]
            continue
        if event[1] != active:
            raise CheckFailed(f"{kind} for request {event[1]}, active is {active}")
        if kind == "AbortRequest":
            continue
        expected = {"Params": "begun", "Stdin": "params", "StdinEnd": "params"}[kind]
        if state != expected:
            raise CheckFailed(f"{kind} in state {state}: {events}")
        if kind == "Stdin" and not event[2]:
            raise CheckFailed("empty Stdin event")
        if kind == "StdinEnd":
            state = "done"
        elif kind == "Params":
            state = "params"


def check_server(data: bytes, rng: random.Random) -> None:
    whole = _run_server([data])
    chunked = _run_server(chunking(data, rng))
    if whole != chunked:
        raise CheckFailed(f"chunking changed the outcome: {whole!r} != {chunked!r}")
    if whole is not None:
        _check_grammar(whole)
    _run_server(chunking(data, rng), reuse=True, max_params=64, max_buffer=64)


def reference_decode_pairs(data: bytes, max_pairs: int = 10000) -> Optional[dict]:
    """A plain restatement of the FastCGI pair grammar; None where it is violated."""
    pairs = {}
    pos = 0
    count = 0
    while pos < len(data):
        lengths = []
        for _ in range(2):
            if pos >= len(data):
                return None
            if data[pos] < 0x80:
                lengths.append(data[pos])
                pos += 1
            else:
                if pos + 4 > len(data):
                    return None
                lengths.append(int.from_bytes(data[pos : pos + 4], "big") & 0x7FFFFFFF)
                pos += 4
        name_len, value_len = lengths
        if pos + name_len + value_len > len(data):
            return None
        count += 1
        if count > max_pairs:
            return None
        name = data[pos : pos + name_len].decode("latin-1")
        pairs[name] = data[pos + name_len : pos + name_len + value_len].decode("latin-1")
        pos += name_len + value_len
    return pairs


def check_pairs(data: bytes) -> None:
    for piece in (data, data[8:]):
        expected = reference_decode_pairs(piece)
        try:
            pairs = p.decode_pairs(piece)
        except ProtocolError:
            if expected is not None:
                raise CheckFailed("decode_pairs rejected a valid pair stream") from None
            continue
        if pairs != expected:
            raise CheckFailed(f"decode_pairs gave {pairs!r}, expected {expected!r}")
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs.items()]
        again = p.decode_pairs(p.encode_pairs(raw))
        if again != pairs:
            raise CheckFailed("decode_pairs result does not survive re-encoding")


def _run_client(chunks: List[bytes]) -> Optional[tuple]:
    client = p.ClientConnection(1)
    try:
        for chunk in chunks:
            client.feed(chunk)
    except ProtocolError:
        return None
    r = client.response
    return (
        bytes(r.stdout),
        bytes(r.stderr),
        r.app_status,
        r.protocol_status,
        r.complete,
        list(r.records),
        list(client.management),
    )


def check_client(data: bytes, rng: random.Random) -> None:
    whole = _run_client([data])
    chunked = _run_client(chunking(data, rng))
    if whole != chunked:
        raise CheckFailed("chunking changed the client's outcome")


def check_input(data: bytes, rng: Optional[random.Random] = None) -> None:
    """Run every target on ``data``; raises only on a crash (never ProtocolError)."""
    rng = rng or random.Random(0)
    check_server(data, rng)
    check_pairs(data)
    check_client(data, rng)


# --- driver --------------------------------------------------------------------------------


def fuzz(
    seconds: float,
    seed: int = 0,
    crash_dir: Optional[Path] = None,
    max_inputs: Optional[int] = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> FuzzResult:
    """Fuzz for ``seconds`` (or ``max_inputs`` inputs); crashes are saved to ``crash_dir``."""
    servers = server_seeds()
    clients = client_seeds()
    corpus = servers + clients

    def next_input(rng: random.Random) -> bytes:
        roll = rng.random()
        if roll < 0.1:
            return random_input(rng)
        if roll < 0.8:
            return mutate(rng.choice(servers), rng, corpus)
        return mutate(rng.choice(clients), rng, corpus)

    return driver.run(next_input, check_input, seconds, seed, crash_dir or CRASH_DIR,
                      max_inputs, log)


def main(argv: Optional[List[str]] = None) -> int:
    return driver.main("fuzz_protocol", __doc__ or "", fuzz, CRASH_DIR, argv)


if __name__ == "__main__":
    sys.exit(main())
