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
import struct
from typing import Any, Dict, Optional, Tuple

from .errors import ControlError, FcgiManagerError, ProtocolError

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


def _read_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 65536))
        if not chunk:
            raise ProtocolError("control message truncated")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def peer_uid(sock: socket.socket) -> Optional[int]:
    """The uid of the process on the other end (Linux SO_PEERCRED), None if unknown."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    _, uid, _ = struct.unpack("3i", creds)
    return uid


def peer_allowed(sock: socket.socket) -> bool:
    uid = peer_uid(sock)
    return uid is not None and uid in (0, os.geteuid())


def bind_control(path: str) -> socket.socket:
    """Create the control socket (0600); a stale one from a dead master is replaced."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
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
    os.chmod(path, 0o600)
    sock.listen(16)
    sock.set_inheritable(True)
    return sock


def call(path: str, command: str, args: Optional[Dict[str, Any]] = None,
         timeout: float = 10.0) -> Dict[str, Any]:
    """Send one command to the master at ``path``; return its result or raise ControlError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path}: the master is not running") from None
        except (ConnectionRefusedError, PermissionError) as exc:
            raise ControlError(f"cannot connect to {path}: {exc.strerror}") from None
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
    return result if isinstance(result, dict) else {}
