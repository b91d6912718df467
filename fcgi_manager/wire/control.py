"""The control socket: how the CLI talks to a running master.

Transport: a unix stream socket, mode 0600, beside the pidfile (``manager.control``). The
master accepts a peer only if ``SO_PEERCRED`` says its uid is the master's or root.

Framing: each message is a 4-byte big-endian length, then that many bytes of UTF-8 JSON
(at most ``MAX_MESSAGE`` bytes). One request, one reply, per connection::

    request  {"id": 1, "command": "status", "args": {}}
    reply    {"id": 1, "ok": true, "result": {...}}
             {"id": 1, "ok": false, "error": "what went wrong"}

Commands: ``status``, ``stop`` (args ``now``), ``reload``, ``scale`` (args ``value``:
``"N"``, ``"+1"``, ``"-1"``), ``reopen-logs``, ``ping``. Commands carry no paths and run
nothing: what they can do is fixed by the master.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from typing import Any, Dict, Optional, Tuple

from ..errors import ControlError, FcgiManagerError, ProtocolError

MAX_MESSAGE = 64 * 1024
LENGTH = struct.Struct("!I")
COMMANDS = ("status", "stop", "reload", "scale", "reopen-logs", "ping")


def encode_message(obj: Dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_MESSAGE * 16:
        raise ValueError("control message too large")
    return LENGTH.pack(len(data)) + data


def decode_request(data: bytes) -> Tuple[Any, str, Dict[str, Any]]:
    """Parse one request body (without its length); ProtocolError says what is wrong."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"control request is not JSON: {exc}") from None
    except RecursionError:  # "[[[[..." fits in MAX_MESSAGE and would kill the master
        raise ProtocolError("control request is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control request must be a JSON object")
    command = obj.get("command")
    if not isinstance(command, str) or command not in COMMANDS:
        raise ProtocolError(f"unknown control command {command!r}")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError("control request 'args' must be an object")
    req_id = obj.get("id")
    if req_id is not None and not isinstance(req_id, (int, str)):
        raise ProtocolError("control request 'id' must be a number or string")
    return req_id, command, args


def read_message(sock: socket.socket, limit: int = MAX_MESSAGE) -> bytes:
    """Read one framed message; ProtocolError on a bad length or a short read."""
    head = _read_exact(sock, 4)
    (length,) = LENGTH.unpack(head)
    if length > limit:
        raise ProtocolError(f"control message of {length} bytes is over the {limit} limit")
    return _read_exact(sock, length)


class MessageReader:
    """Sans-I/O framing for a peer that sends in pieces: :meth:`feed` whatever arrived,
    get the body once it is whole. The master reads control connections this way, in its
    own selector, so a client that sends a byte a second holds nothing but its buffer."""

    __slots__ = ("limit", "buf", "length")

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self.limit = limit
        self.buf = b""
        self.length = -1  # body length, once the 4-byte head is in

    def feed(self, data: bytes) -> Optional[bytes]:
        """The body once complete (bytes after it are ignored), else None; ProtocolError
        on a length over the limit, or when ``data`` is b"" (EOF) before the end."""
        if not data:
            raise ProtocolError("control message truncated")
        self.buf += data
        if self.length < 0 and len(self.buf) >= LENGTH.size:
            (self.length,) = LENGTH.unpack_from(self.buf)
            if self.length > self.limit:
                raise ProtocolError(f"control message of {self.length} bytes is over the "
                                    f"{self.limit} limit")
        if 0 <= self.length <= len(self.buf) - LENGTH.size:
            return self.buf[LENGTH.size:LENGTH.size + self.length]
        return None

    def wants(self) -> int:
        """How many more bytes the message needs (at least 1 while incomplete)."""
        if self.length < 0:
            return LENGTH.size - len(self.buf)
        return max(1, LENGTH.size + self.length - len(self.buf))


def _read_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 65536))
        if not chunk:
            raise ProtocolError("control message truncated")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def peer_creds(sock: socket.socket) -> Tuple[Optional[int], Optional[int]]:
    """(pid, uid) of the process on the other end (Linux SO_PEERCRED), Nones if unknown.

    For a connection to a listening socket, that is the process that called ``listen``:
    the kernel says it, the peer cannot lie about it."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None, None
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid


def peer_uid(sock: socket.socket) -> Optional[int]:
    """The uid of the process on the other end (Linux SO_PEERCRED), None if unknown."""
    return peer_creds(sock)[1]


def peer_allowed(sock: socket.socket) -> bool:
    uid = peer_uid(sock)
    return uid is not None and uid in (0, os.geteuid())


def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # a full backlog or a timeout: someone is listening
    finally:
        probe.close()


def bind_control(path: str) -> socket.socket:
    """Create the control socket (0600). A stale one from a dead master is replaced; one
    a live master answers on is not (a second instance with the same ``manager.control``
    must not steal it); anything that is not a socket (a link, a file) is refused."""
    try:
        st: Optional[os.stat_result] = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise FcgiManagerError(f"cannot create the control socket {path}: something that "
                                   f"is not a socket is there",
                                   "remove it, or set manager.control to another path")
        if _socket_is_live(path):
            raise FcgiManagerError(f"the control socket {path} is in use by a running master",
                                   "stop it first, or give this instance its own "
                                   "manager.control (or manager.pidfile)")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600: nothing is changed by path afterwards
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        too_long = len(os.fsencode(path)) > 107
        raise FcgiManagerError(
            f"cannot create the control socket {path}: "
            f"{'the path is too long for a unix socket' if too_long else exc.strerror or exc}",
            "set manager.control (or manager.pidfile) to a path of at most 107 bytes"
            if too_long else "check that its directory exists and is writable",
        ) from None
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


def call(path: str, command: str, args: Optional[Dict[str, Any]] = None,
         timeout: float = 10.0) -> Dict[str, Any]:
    """Send one command to the master at ``path``; return its result or raise ControlError."""
    return call_with_peer(path, command, args, timeout)[0]


def call_with_peer(path: str, command: str, args: Optional[Dict[str, Any]] = None,
                   timeout: float = 10.0) -> Tuple[Dict[str, Any], Optional[int]]:
    """:func:`call`, also returning the pid that answered (SO_PEERCRED, not the reply's
    word for it): a command that later signals a pid signals that one, and only if the
    pidfile proves it is the master (an impostor's socket can name any pid)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path}: the master is not running") from None
        except (ConnectionRefusedError, PermissionError) as exc:
            raise ControlError(f"cannot connect to {path}: {exc.strerror}") from None
        peer_pid, _ = peer_creds(sock)
        sock.sendall(encode_message({"id": 1, "command": command, "args": args or {}}))
        try:
            reply = json.loads(read_message(sock, MAX_MESSAGE * 64).decode("utf-8"))
        except ProtocolError:
            raise ControlError("the master closed the control connection without an answer"
                               ) from None
        except socket.timeout:
            raise ControlError(f"the master did not answer {command!r} within {timeout:.0f} s"
                               ) from None
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc}") from None
    finally:
        sock.close()
    if not isinstance(reply, dict):
        raise ControlError("the master sent a malformed reply")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "the master refused the command")))
    result = reply.get("result")
    return (result if isinstance(result, dict) else {}), peer_pid
