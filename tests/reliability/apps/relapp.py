"""The app the reliability tests serve, routing on PATH_INFO:

* ``/big?mib=N`` -- an N MiB response in 1 MiB chunks (for clients that stop reading);
* ``/sleep?s=N`` -- sleeps N seconds, then answers;
* ``/echo`` -- reads the whole body; answers its length and SHA-256;
* ``/exit`` -- ``os._exit(1)`` in the middle of the request (a crashing app);
* anything else -- a short text naming the worker's pid.
"""

import hashlib
import os
import time
from urllib.parse import parse_qs

CHUNK = b"x" * (1 << 20)


def _query(environ, name, default):
    return float(parse_qs(environ.get("QUERY_STRING", "")).get(name, [default])[0])


def _big(environ, start_response):
    mib = int(_query(environ, "mib", "50"))
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(mib * len(CHUNK)))])
    return (CHUNK for _ in range(mib))


def _sleep(environ, start_response):
    deadline = time.monotonic() + _query(environ, "s", "0")
    while time.monotonic() < deadline:
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"slept in {os.getpid()}\n".encode()]


def _echo(environ, start_response):
    stream = environ["wsgi.input"]
    digest = hashlib.sha256()
    size = 0
    while True:
        chunk = stream.read(65536)
        if not chunk:
            break
        digest.update(chunk)
        size += len(chunk)
    body = f"{size} {digest.hexdigest()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


def _exit(environ, start_response):
    os._exit(1)


ROUTES = {"/big": _big, "/sleep": _sleep, "/echo": _echo, "/exit": _exit}


def app(environ, start_response):
    handler = ROUTES.get(environ.get("PATH_INFO", ""))
    if handler is not None:
        return handler(environ, start_response)
    body = f"ok from {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
