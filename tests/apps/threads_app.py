"""For the threaded-worker tests (``workers.threads`` > 1), routing on PATH_INFO:

- ``/gate?n=N`` waits until N requests are inside it at once (a barrier, 20 s at most):
  200 if they met, 500 if not -- proof that N requests ran at the same time;
- ``/hold?file=PATH`` waits in ``hold_for_test`` until PATH exists (60 s at most);
- ``/sleep?s=N`` sleeps N seconds in ``sleep_for_test``;
- ``/grow?mb=N`` keeps N MiB for the rest of the worker's life (for ``max_memory``),
  answers the pid;
- ``/err`` writes a long traceback-like text to stderr (an error flood), answers 200;
- ``/stream`` streams 64 KiB chunks until the server stops it (``FCGI_ABORT_REQUEST``);
- anything else answers the worker's pid, the thread's name and ``wsgi.multithread``.
"""

import os
import sys
import threading
import time
import traceback
from urllib.parse import parse_qs

_barriers = {}
_kept = []
_lock = threading.Lock()


def _barrier(n):
    with _lock:
        if n not in _barriers:
            _barriers[n] = threading.Barrier(n)
        return _barriers[n]


def hold_for_test(path):
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


def sleep_for_test(seconds):
    time.sleep(seconds)


def _stream():
    chunk = b"x" * 65536
    for _ in range(100000):
        time.sleep(0.005)
        yield chunk


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    status = "200 OK"
    if path == "/gate":
        try:
            _barrier(int(query["n"])).wait(timeout=20)
            body = b"met\n"
        except threading.BrokenBarrierError:
            status, body = "500 Internal Server Error", b"the requests did not meet\n"
    elif path == "/hold":
        hold_for_test(query["file"])
        body = b"released\n"
    elif path == "/sleep":
        sleep_for_test(float(query.get("s", "0")))
        body = b"slept\n"
    elif path == "/grow":
        _kept.append(b"\x01" * (int(query.get("mb", "1")) << 20))  # touched: resident
        body = f"{os.getpid()}\n".encode()
    elif path == "/err":
        sys.stderr.write("Traceback (a test flood):\n" + "".join(traceback.format_stack()) * 20)
        body = b"logged\n"
    elif path == "/stream":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return _stream()
    else:
        body = (f"{os.getpid()} {threading.current_thread().name} "
                f"{environ['wsgi.multithread']}\n").encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
