"""A small FastCGI client: what ``fcgi-manager request`` and ``check`` use (like
``cgi-fcgi``, but it builds the CGI params for you and shows the answer readably)."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

from ..errors import ProtocolError
from ..sockets import Address
from ..wire import protocol


@dataclass
class Reply:
    status: str
    headers: List[Tuple[str, str]]
    body: bytes
    stderr: bytes
    app_status: int
    protocol_status: int
    raw: bytes = b""
    seconds: float = 0.0
    records: List[int] = field(default_factory=list)


def build_params(path: str, method: str = "GET", headers: Optional[Dict[str, str]] = None,
                 body_len: int = 0, server: Tuple[str, int] = ("localhost", 80),
                 script_name: str = "") -> Dict[str, str]:
    parts = urlsplit(path if path.startswith("/") else "/" + path)
    decoded = unquote(parts.path, encoding="latin-1")  # CGI paths are decoded, as bytes
    params = {
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": "fcgi-manager-client",
        "REQUEST_METHOD": method.upper(),
        "REQUEST_URI": path if path.startswith("/") else "/" + path,
        "DOCUMENT_URI": decoded,
        "SCRIPT_NAME": script_name,
        "PATH_INFO": decoded[len(script_name):] if script_name else decoded,
        "QUERY_STRING": parts.query,
        "SERVER_NAME": server[0],
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "0",
        "HTTP_HOST": server[0],
    }
    if body_len or method.upper() in ("POST", "PUT", "PATCH"):
        params["CONTENT_LENGTH"] = str(body_len)
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            params[key] = value
        else:
            params["HTTP_" + key] = value
    return params


def connect(address: Address, timeout: float) -> socket.socket:
    if address.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address.path)
        return sock
    if address.kind == "tcp":
        host = "127.0.0.1" if address.host in ("0.0.0.0", "") else address.host
        host = "::1" if host == "::" else host
        return socket.create_connection((host, address.port), timeout=timeout)
    raise OSError(f"cannot connect to {address}: only unix and TCP addresses can be reached")


def request(address: Address, params: Dict[str, str], body: bytes = b"",
            timeout: float = 30.0) -> Reply:
    """Send one request and read the whole response; raise OSError or ProtocolError."""
    started = time.monotonic()
    sock = connect(address, timeout)
    try:
        sock.sendall(protocol.encode_request(params, body))
        parser = protocol.ClientConnection(1)
        while True:
            data = sock.recv(65536)
            if not data:
                break
            resp = parser.feed(data)
            if resp.complete:
                break
        resp = parser.response
        if not resp.complete:
            raise ProtocolError("the server closed the connection before END_REQUEST")
        raw = bytes(resp.stdout)
    finally:
        sock.close()
    status, headers, payload = split_response(raw)
    return Reply(status, headers, payload, bytes(resp.stderr), resp.app_status,
                 resp.protocol_status, raw, time.monotonic() - started, resp.records)


def split_response(raw: bytes) -> Tuple[str, List[Tuple[str, str]], bytes]:
    """CGI response -> (status, headers, body)."""
    sep = raw.find(b"\r\n\r\n")
    skip = 4
    if sep < 0:
        sep = raw.find(b"\n\n")
        skip = 2
    if sep < 0:
        return "", [], raw
    head = raw[:sep].decode("latin-1")
    headers = []
    status = "200 OK"
    for line in head.replace("\r\n", "\n").split("\n"):
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = value.strip()
        elif name:
            headers.append((name.strip(), value.strip()))
    return status, headers, raw[sep + skip :]
