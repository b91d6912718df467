"""An app with an ``app.post_fork`` hook: the hook records the worker id and pid it ran
with, the app answers them (and the pid it runs in), so a test sees that each worker ran
the hook once, after the fork, before serving. ``failing_hook`` raises."""

import json
import os
import time

CALLS = []  # filled in each worker by the hook (the master's copy stays empty)
IMPORTED_IN = os.getpid()


def post_fork(worker_id):
    CALLS.append({"worker": worker_id, "pid": os.getpid()})


def failing_hook(worker_id):
    raise ConnectionError(f"cannot reach the database from worker {worker_id}")


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/print":
        print("a line the app printed", flush=True)
    elif environ.get("PATH_INFO") == "/sleep":
        time.sleep(0.3)  # so that a second request at once goes to the other worker
    body = json.dumps({"pid": os.getpid(), "imported_in": IMPORTED_IN,
                       "calls": CALLS}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
