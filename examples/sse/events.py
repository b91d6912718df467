"""Server-sent events with plain WSGI: a page that shows a clock ticking, pushed by the
server (https://html.spec.whatwg.org/multipage/server-sent-events.html).

    fcgi-manager run events:app --bind unix:/run/yourapplication/fcgi.sock --chown-socket :www-data

(``--chown-socket :www-data`` lets nginx, running as www-data, connect: it needs root or
membership of www-data; ``--chmod-socket 666`` lets every local user in instead.)

``/`` is the page; ``/events`` the stream: one event per ``interval`` seconds (default 1),
``count`` of them (default 60; the browser reconnects when the stream ends, and sends
``Last-Event-ID`` to go on where it stopped). fcgi-manager sends each event the moment the
generator yields it; nginx passes it on at once with ``fastcgi_buffering off`` in the
location (examples/nginx/sse.conf) or the ``X-Accel-Buffering: no`` header sent here.

A stream holds its worker for as long as it runs: count on one worker per open stream
(``workers.count``), or keep streams short and let browsers reconnect.
"""

import time
from urllib.parse import parse_qs

PAGE = b"""<!DOCTYPE html>
<title>fcgi-manager: server-sent events</title>
<p>Server time: <output id="clock">waiting for the first event</output></p>
<script>
  new EventSource("events").onmessage = (e) => {
    document.getElementById("clock").textContent = e.data;
  };
</script>
"""


def _number(text, default, kind=float):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        return default
    return value if abs(value) < 1e9 else default  # not inf, not nan


def events(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    interval = min(max(_number(query.get("interval", [""])[0], 1.0), 0.01), 60.0)
    count = min(max(_number(query.get("count", [""])[0], 60, int), 1), 3600)
    first = _number(environ.get("HTTP_LAST_EVENT_ID"), -1, int) + 1
    start_response("200 OK", [
        ("Content-Type", "text/event-stream; charset=utf-8"),
        ("Cache-Control", "no-cache"),
        ("X-Accel-Buffering", "no"),
    ])
    for n in range(first, first + count):
        if n != first:
            time.sleep(interval)
        stamp = time.strftime("%H:%M:%S")
        yield f"id: {n}\ndata: {stamp} (event {n})\n\n".encode()


def app(environ, start_response):
    if environ.get("PATH_INFO", "") == "/events":
        return events(environ, start_response)
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", str(len(PAGE)))])
    return [PAGE]
