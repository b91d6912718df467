#!/usr/bin/env python3
"""Mutational fuzzer for the control-socket decoder (fcgi_manager.wire.control).

Standard library only. Each input is a framed control message (4-byte big-endian length,
then JSON) built from valid requests and mutated at three levels:

* structure: the decoded object with keys dropped, added or renamed, and values replaced
  by other JSON types (null, booleans, huge and non-finite numbers, strings, lists, nested
  objects, deep nesting);
* text: JSON tokens inserted (brackets, quotes, escapes, lone surrogates, ``1e999``,
  ``NaN``), deep or unbalanced nesting, deletions and duplications;
* bytes: bit flips, interesting bytes (invalid UTF-8, NUL), truncations, length-prefix
  overwrites with interesting 32-bit values, splices with other inputs.

Every input goes to:

* ``read_message`` over a fake socket, whole and in a random chunking (``recv`` returns
  at most one chunk), with the master's limit and with a tiny one: both chunkings must
  agree, and a success must be exactly the framed body;
* ``MessageReader`` (how the master reads a control connection without blocking), fed
  the same bytes as a slow client delivers them -- one byte at a time, or in random
  pieces, with EOF after the last -- must agree with ``read_message`` exactly, and must
  say it needs more bytes (``wants() > 0``) for as long as it has no body;
* ``decode_request`` on that body and on the raw input: a success must name a known
  command, with a dict of args and an id that is None, an int or a str, and must survive
  ``encode_message`` -> ``read_message`` -> ``decode_request`` unchanged.

Anything other than ProtocolError -- including a failed check -- is a crash: the input is
saved to ``tests/fixtures/control_crashes/<sha1>.bin`` and the exit status is 1.

    python tests/fuzz/fuzz_control.py --seconds 30 --seed 1
"""

from __future__ import annotations

import json
import random
import struct
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fcgi_manager.errors import ProtocolError  # noqa: E402
from fcgi_manager.wire import control  # noqa: E402
from tests.fuzz import driver  # noqa: E402
from tests.fuzz.driver import CheckFailed, FuzzResult  # noqa: E402,F401

CRASH_DIR = ROOT / "tests" / "fixtures" / "control_crashes"
LENGTH = struct.Struct("!I")

INTERESTING_32 = [0, 1, 3, 4, 0x7F, 0x80, 0xFFFF, 0x10000, control.MAX_MESSAGE,
                  control.MAX_MESSAGE + 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 100_000_000]
INTERESTING_8 = [0x00, 0x22, 0x5C, 0x7B, 0x7D, 0x5B, 0x5D, 0x7F, 0x80, 0xC0, 0xED, 0xFE, 0xFF]
TOKENS = [b"{", b"}", b"[", b"]", b'"', b"\\", b",", b":", b"null", b"true", b"false",
          b"-0", b"1e999", b"-1e999", b"NaN", b"Infinity", b"-Infinity", b"1" * 40,
          b"9" * 5000, b'"\\ud800"', b'"\\u0000"', b'"\\uDFFF\\uD800"', b"\xed\xa0\x80",
          b"\xff\xfe", b"\x00", b"\t\n\r ", b'"command"', b'"args"', b'"id"']
JSON_VALUES: List[Any] = [None, True, False, 0, -1, 1, 2 ** 63, -(2 ** 70), 1.5, 1e308,
                          float("inf"), float("nan"), "", "status", "+1", "-1", "3",
                          "\u0000", "\ud800", "x" * 300, [], [1, "a"], {}, {"now": True},
                          {"value": "+1"}, {"value": 3}, {"now": "yes"}, [[[]]]]
KEYS = ["id", "command", "args", "value", "now", "", "COMMAND", "\u00e9", "__proto__"]





# --- seeds ---------------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    return LENGTH.pack(len(body)) + body


def seed_objects() -> List[dict]:
    return [
        {"id": 1, "command": "status", "args": {}},
        {"id": 2, "command": "ping"},
        {"id": "x", "command": "stop", "args": {"now": True}},
        {"id": 3, "command": "reload", "args": {}},
        {"id": 4, "command": "scale", "args": {"value": "+1"}},
        {"id": 5, "command": "scale", "args": {"value": "3"}},
        {"command": "reopen-logs", "args": {}},
        {"id": None, "command": "status", "args": {"extra": [1, 2, {"a": None}]}},
    ]


def seeds() -> List[bytes]:
    out = [frame(json.dumps(obj).encode()) for obj in seed_objects()]
    out.append(frame(json.dumps(seed_objects()[0], indent=2).encode()))
    out.append(frame(b'{"command":"status","command":"stop"}'))
    out.append(frame('{"id":"\u00e9\u2603","command":"ping"}'.encode()))
    return out


# --- mutations -----------------------------------------------------------------------------


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if roll < 0.6 or depth > 3:
        return rng.choice(JSON_VALUES)
    if roll < 0.8:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(KEYS): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _nest(rng: random.Random) -> bytes:
    depth = rng.choice((10, 100, 900, 1100, 5000, 30000))
    opener, closer = rng.choice(((b"[", b"]"), (b'{"a":', b"}")))
    inner = opener * depth + b"1" + closer * (depth if rng.random() < 0.7 else depth // 2)
    return inner


def mutate_structure(obj: dict, rng: random.Random) -> bytes:
    obj = dict(obj)
    for _ in range(rng.randint(1, 3)):
        choice = rng.randrange(5)
        if choice == 0 and obj:
            del obj[rng.choice(list(obj))]
        elif choice == 1:
            obj[rng.choice(KEYS)] = _random_value(rng)
        elif choice == 2 and obj:
            key = rng.choice(list(obj))
            obj[rng.choice(KEYS)] = obj.pop(key)
        elif choice == 3:
            args = obj.get("args")
            if isinstance(args, dict):
                args = dict(args)
                args[rng.choice(KEYS)] = _random_value(rng)
                obj["args"] = args
            else:
                obj["args"] = _random_value(rng)
        else:
            obj["command"] = rng.choice(list(control.COMMANDS) + ["", "STATUS", "status ",
                                                                  "exec", None, 1, ["stop"]])
    try:
        text = json.dumps(obj).encode()
    except (TypeError, ValueError):
        text = b"{}"
    if rng.random() < 0.2:
        text = text.replace(b"1", _nest(rng), 1)
    return frame(text)


def mutate(data: bytes, rng: random.Random, corpus: List[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3))):
        choice = rng.randrange(10)
        n = len(buf)
        if choice == 0 and n:  # bit flips
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif choice == 1 and n:  # interesting byte
            buf[rng.randrange(n)] = rng.choice(INTERESTING_8)
        elif choice == 2 and n:  # truncation
            buf = buf[: rng.randrange(n)]
        elif choice == 3 and n >= 4:  # length prefix overwrite
            buf[0:4] = LENGTH.pack(rng.choice(INTERESTING_32 + [n - 4, max(0, n - 5), n - 3]))
        elif choice == 4:  # JSON token inserted into the body
            at = rng.randint(min(4, n), n)
            buf[at:at] = rng.choice(TOKENS)
        elif choice == 5:  # deep or unbalanced nesting in place of a value
            at = rng.randint(min(4, n), n)
            buf[at:at] = _nest(rng)
        elif choice == 6 and n:  # delete a range
            a = rng.randrange(n)
            del buf[a : a + rng.randint(1, 16)]
        elif choice == 7 and n:  # duplicate a range
            a = rng.randrange(n)
            b = min(n, a + rng.randint(1, 32))
            buf[a:a] = buf[a:b]
        elif choice == 8:  # splice with another input
            other = rng.choice(corpus)
            buf = buf[: rng.randint(0, n)] + other[rng.randint(0, len(other)) :]
        else:  # fix the length prefix after the other mutations (so the body is parsed)
            if n >= 4:
                buf[0:4] = LENGTH.pack(n - 4)
    return bytes(buf)


def random_input(rng: random.Random) -> bytes:
    body = bytes(rng.randrange(256) for _ in range(rng.choice((0, 3, 16, 200))))
    return frame(body) if rng.random() < 0.7 else body


def chunking(data: bytes, rng: random.Random) -> List[bytes]:
    n = len(data)
    if n < 2 or rng.random() < 0.2:
        return [data]
    if rng.random() < 0.3 and n <= 512:
        return [data[i : i + 1] for i in range(n)]
    cuts = sorted({rng.randint(1, n - 1) for _ in range(rng.randint(1, 6))})
    bounds = [0, *cuts, n]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if a < b]


# --- targets -------------------------------------------------------------------------------


class FakeSocket:
    """``recv`` over a list of chunks (one chunk at most per call), then EOF."""

    def __init__(self, chunks: List[bytes]) -> None:
        self.chunks = list(chunks)

    def recv(self, n: int) -> bytes:
        if not self.chunks:
            return b""
        chunk = self.chunks[0]
        if len(chunk) > n:
            self.chunks[0] = chunk[n:]
            return chunk[:n]
        self.chunks.pop(0)
        return chunk


def _read(chunks: List[bytes], limit: int) -> Optional[bytes]:
    try:
        body = control.read_message(FakeSocket(chunks), limit)  # type: ignore[arg-type]
    except ProtocolError:
        return None
    if not isinstance(body, bytes):
        raise CheckFailed(f"read_message returned {type(body).__name__}")
    return body


def _read_incremental(chunks: List[bytes], limit: int) -> Optional[bytes]:
    """``MessageReader`` fed ``chunks`` one by one, then EOF: the body, or None."""
    reader = control.MessageReader(limit)
    try:
        for chunk in chunks:
            body = reader.feed(chunk)
            if body is not None:
                return body
            if reader.wants() <= 0:
                raise CheckFailed("MessageReader wants no more bytes but has no body")
        reader.feed(b"")  # EOF before the end: always a ProtocolError
    except ProtocolError:
        return None
    raise CheckFailed("MessageReader accepted EOF in the middle of a message")


def slow_delivery(data: bytes, rng: random.Random) -> List[bytes]:
    """How a slow or unlucky client delivers ``data``: a byte at a time, or in pieces
    (never empty: an empty read is EOF)."""
    if len(data) <= 256 and rng.random() < 0.3:
        return [data[i : i + 1] for i in range(len(data))]
    return [c for c in chunking(data, rng) if c]


def check_framing(data: bytes, rng: random.Random) -> Optional[bytes]:
    """The framed body of ``data`` (None if read_message refused it), checked."""
    for limit in (control.MAX_MESSAGE, 16):
        whole = _read([data], limit)
        chunked = _read(chunking(data, rng), limit)
        if whole != chunked:
            raise CheckFailed(f"chunking changed read_message's outcome (limit {limit})")
        if _read_incremental(slow_delivery(data, rng), limit) != whole:
            raise CheckFailed(f"MessageReader disagrees with read_message (limit {limit})")
        expected: Optional[bytes] = None
        if len(data) >= 4:
            (length,) = LENGTH.unpack_from(data)
            if length <= limit and len(data) - 4 >= length:
                expected = data[4 : 4 + length]
        if whole != expected:
            raise CheckFailed(f"read_message gave {whole!r:.80}, expected {expected!r:.80}")
    return _read([data], control.MAX_MESSAGE)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def check_decode(body: bytes) -> None:
    try:
        req_id, command, args = control.decode_request(body)
    except ProtocolError:
        return
    if command not in control.COMMANDS:
        raise CheckFailed(f"decode_request accepted the command {command!r}")
    if not isinstance(args, dict):
        raise CheckFailed(f"decode_request gave args of type {type(args).__name__}")
    if req_id is not None and not isinstance(req_id, (int, str)):
        raise CheckFailed(f"decode_request gave an id of type {type(req_id).__name__}")
    again = control.encode_message({"id": req_id, "command": command, "args": args})
    round_trip = control.decode_request(control.read_message(  # type: ignore[arg-type]
        FakeSocket([again]), len(again)))
    if _canonical(round_trip) != _canonical((req_id, command, args)):
        raise CheckFailed("a decoded request does not survive encode_message")


def check_input(data: bytes, rng: Optional[random.Random] = None) -> None:
    """Run every target on ``data``; raises only on a crash (never ProtocolError)."""
    rng = rng or random.Random(0)
    body = check_framing(data, rng)
    if body is not None:
        check_decode(body)
    check_decode(data)


# --- driver --------------------------------------------------------------------------------


def next_input(rng: random.Random, corpus: List[bytes]) -> bytes:
    roll = rng.random()
    if roll < 0.1:
        return random_input(rng)
    if roll < 0.4:
        return mutate_structure(rng.choice(seed_objects()), rng)
    return mutate(rng.choice(corpus), rng, corpus)


def fuzz(
    seconds: float,
    seed: int = 0,
    crash_dir: Optional[Path] = None,
    max_inputs: Optional[int] = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> FuzzResult:
    """Fuzz for ``seconds`` (or ``max_inputs`` inputs); crashes are saved to ``crash_dir``."""
    corpus = seeds()
    return driver.run(lambda rng: next_input(rng, corpus), check_input, seconds, seed,
                      crash_dir or CRASH_DIR, max_inputs, log)


def main(argv: Optional[List[str]] = None) -> int:
    return driver.main("fuzz_control", __doc__ or "", fuzz, CRASH_DIR, argv)


if __name__ == "__main__":
    sys.exit(main())
