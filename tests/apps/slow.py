"""``?s=N`` sleeps N seconds inside ``sleep_for_test`` (so stack dumps show its name)."""

import os
import time
from urllib.parse import parse_qs


def sleep_for_test(seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def app(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    seconds = float(query.get("s", ["0"])[0])
    started = time.monotonic()
    sleep_for_test(seconds)
    body = f"slept {time.monotonic() - started:.2f} s in pid {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length",
                                                                str(len(body)))])
    return [body]
