"""The notify pipe: how a worker tells the master it is ready, or why it cannot start.

Each worker gets the write end of its own pipe; the master watches the read end in its
selector. Frames, in order, never interleaved (one writer per pipe)::

    kind     1 byte    b"R" ready: the app is imported and the worker accepts
                       b"E" boot error: the payload is the error text (traceback, message,
                            hint), and the worker exits with EXIT_BOOT_ERROR next
                       b"L" leaving: the worker stopped accepting on its own (the payload
                            is why: ``max_requests``, ``max_memory``) and finishes what it
                            serves; the master starts its replacement at once
    length   4 bytes   big-endian unsigned, the payload's size (0 for b"R")
    payload  length bytes, UTF-8

A frame is at most ``MAX_PAYLOAD`` + 5 bytes; longer error texts keep their end (the
exception line and hint are what an operator needs).
"""

from __future__ import annotations

import struct
from typing import List, Tuple

READY = b"R"
BOOT_ERROR = b"E"
LEAVING = b"L"
HEAD = struct.Struct("!cI")
MAX_PAYLOAD = 60000


def encode(kind: bytes, payload: bytes = b"") -> bytes:
    """One frame; a payload over ``MAX_PAYLOAD`` keeps its last bytes."""
    payload = payload[-MAX_PAYLOAD:]
    return HEAD.pack(kind, len(payload)) + payload


class Decoder:
    """Reassembles frames from whatever pieces ``os.read`` returns."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> List[Tuple[bytes, bytes]]:
        """Every complete ``(kind, payload)`` in ``data`` and what came before it."""
        self.buf += data
        frames = []
        while len(self.buf) >= HEAD.size:
            kind, length = HEAD.unpack_from(self.buf)
            end = HEAD.size + length
            if len(self.buf) < end:
                break
            frames.append((kind, self.buf[HEAD.size:end]))
            self.buf = self.buf[end:]
        return frames
