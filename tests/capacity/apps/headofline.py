"""``/slow`` takes a second; anything else answers at once (the head-of-line tests)."""

import time

BODY = b"ok\n"
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]


def app(environ, start_response):
    if environ.get("PATH_INFO", "").endswith("/slow"):
        time.sleep(1.0)
    start_response("200 OK", HEADERS)
    return [BODY]
