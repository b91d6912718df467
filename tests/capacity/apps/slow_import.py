"""An app whose import takes about a second (a big framework, a cold disk)."""

import time

IMPORT_SECONDS = 1.0

_deadline = time.monotonic() + IMPORT_SECONDS
while time.monotonic() < _deadline:
    time.sleep(max(0.0, min(0.05, _deadline - time.monotonic())))


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"imported\n"]
