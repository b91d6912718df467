"""Server-sent events through nginx (examples/nginx/sse.conf, examples/sse/events.py): each
event reaches the browser when the app yields it, not when the stream ends."""

from __future__ import annotations

import os
import shutil
import socket
import time
from typing import List

import pytest

from .support import EXAMPLES, Manager, Nginx, Procs, Site, http_request

pytestmark = pytest.mark.needs("nginx")


@pytest.fixture(scope="module")
def nginx(site: Site, procs: Procs) -> Nginx:
    shutil.copy(EXAMPLES / "sse" / "events.py", site.app / "events.py")
    os.chmod(site.app / "events.py", 0o644)
    override = site.test_overrides()
    override["app"] = {"module": "events:app"}
    config = site.render_toml("flask_app/fcgi-manager.toml", site.etc / "sse.toml",
                              override=override)
    Manager(site, procs, config).start()
    server = Nginx(site, procs)
    server.add("nginx/sse.conf")
    return server.start()


def _event_arrivals(port: int, path: str, expect: int) -> List[float]:
    """When each event of the stream at ``path`` reached the client (monotonic seconds,
    from the moment the request was sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: example.com\r\n"
                     f"Accept: text/event-stream\r\nConnection: close\r\n\r\n".encode())
        started = time.monotonic()
        seen = b""
        arrivals: List[float] = []
        while len(arrivals) < expect:
            data = sock.recv(65536)
            if not data:
                break
            seen += data
            now = time.monotonic() - started
            arrivals += [now] * (seen.count(b"\ndata: ") - len(arrivals))
        assert b"text/event-stream" in seen.split(b"\r\n\r\n", 1)[0], seen[:500]
        return arrivals


def test_events_arrive_as_they_are_yielded(nginx: Nginx) -> None:
    port = nginx.ports["sse.conf"]
    arrivals = _event_arrivals(port, "/events?count=5&interval=0.5", 5)
    assert len(arrivals) == 5, arrivals
    assert arrivals[0] < 0.4, f"the first event was held back: {arrivals}"
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert all(0.4 <= gap <= 0.6 for gap in gaps), gaps


def test_the_page_is_served_next_to_the_stream(nginx: Nginx) -> None:
    page = http_request(nginx.ports["sse.conf"], "/")
    assert page.status == 200 and b"EventSource" in page.body, page
