"""The WSGI apps every server under test runs, so that only the server differs.

Each app is deliberately trivial: the benchmark measures the cost of the server and the
FastCGI/HTTP hop, not of the app. The bodies are built once at import time, so a request
does no work beyond what the server itself asks of it.

- ``hello``: a 13-byte ``text/plain`` body, the classic "hello world" overhead test.
- ``page``: a 16 KiB HTML page, about the size of a small rendered template; it needs
  more than one FastCGI record and exercises the server's output path.
- ``post``: reads the whole request body (the benchmark sends 64 KiB) in chunks, as a form
  or upload handler would, and answers with its length; it exercises the input path.
- ``sleep20``: waits 20 ms (a database query's stand-in), then answers like ``hello``; the
  app threads are for (``bench/threads.py``).
- ``wait``: waits 1 s, so that every request of a load is waiting at the same moment (the
  memory a pool needs to hold that many, ``bench/threads.py``).
- ``mixed``: ``hello``, except ``.../slow`` which takes a second (``headofline.py``).
- ``boom``: raises on every request, with a message of two lines, so that each request
  logs a traceback (``error_flood.py``: what the master costs under an error flood).
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, List, Tuple

StartResponse = Callable[[str, List[Tuple[str, str]]], object]

HELLO_BODY = b"Hello, World!"
PAGE_SIZE = 16 * 1024
READ_CHUNK = 16 * 1024


def _make_page(size: int) -> bytes:
    """Build an HTML page of exactly ``size`` bytes (padding paragraphs, then filler)."""
    head = b"<!DOCTYPE html>\n<html><head><title>bench page</title></head><body>\n"
    tail = b"</body></html>\n"
    para = b"<p>Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.</p>\n"
    room = size - len(head) - len(tail)
    body = para * (room // len(para))
    body += b" " * (room - len(body))
    page = head + body + tail
    assert len(page) == size
    return page


PAGE_BODY = _make_page(PAGE_SIZE)


def _respond(start_response: StartResponse, body: bytes, content_type: str) -> List[bytes]:
    """Send a 200 with an explicit Content-Length, which every server then passes through."""
    start_response(
        "200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    )
    return [body]


def hello(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
    """Answer 13 bytes of plain text."""
    return _respond(start_response, HELLO_BODY, "text/plain")


def page(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
    """Answer a 16 KiB HTML page."""
    return _respond(start_response, PAGE_BODY, "text/html; charset=utf-8")


def post(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
    """Read the request body to its end and answer its length in bytes."""
    stream = environ["wsgi.input"]
    remaining = int(environ.get("CONTENT_LENGTH") or 0)
    total = 0
    while remaining > 0:
        chunk = stream.read(min(READ_CHUNK, remaining))
        if not chunk:
            break
        total += len(chunk)
        remaining -= len(chunk)
    return _respond(start_response, str(total).encode("ascii"), "text/plain")


def sleep20(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
    """Wait 20 ms, as for a database, then answer 13 bytes of plain text."""
    time.sleep(0.020)
    return _respond(start_response, HELLO_BODY, "text/plain")


def wait(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
    """Wait 1 s, then answer 13 bytes of plain text."""
    time.sleep(1.0)
    return _respond(start_response, HELLO_BODY, "text/plain")


SLOW_SECONDS = 1.0


def mixed(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
    """``.../slow`` sleeps ``SLOW_SECONDS`` (a slow endpoint); anything else is ``hello``.

    The head-of-line experiment (``headofline.py``) keeps one slow request running while
    other clients send instant ones.
    """
    if environ.get("PATH_INFO", "").endswith("/slow"):
        time.sleep(SLOW_SECONDS)
    return _respond(start_response, HELLO_BODY, "text/plain")


def boom(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
    """Fails every time: the worker logs the traceback and answers 500."""
    raise RuntimeError("boom\r\nforged line: " + environ.get("PATH_INFO", ""))
