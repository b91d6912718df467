"""The built-in demo app: ``fcgi-manager run fcgi_manager.demo:app``.

``/`` says hello, ``/env`` shows the WSGI environ the app got (SCRIPT_NAME and PATH_INFO
included, handy when setting up a front end), ``/echo`` returns the request body, and
``/sleep?s=N`` sleeps (to watch ``status`` show a busy worker).
"""

from __future__ import annotations

import os
import time
from urllib.parse import parse_qs


def app(environ, start_response):
    path = environ.get("PATH_INFO", "") or "/"
    if path == "/env":
        lines = [f"{k}={v!r}" for k, v in sorted(environ.items())]
        body = ("\n".join(lines) + "\n").encode("utf-8", "replace")
    elif path == "/echo":
        body = environ["wsgi.input"].read()
    elif path == "/sleep":
        seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("s", ["1"])[0])
        time.sleep(min(seconds, 600.0))
        body = f"slept {seconds} s in pid {os.getpid()}\n".encode()
    else:
        body = (f"Hello from fcgi-manager (worker pid {os.getpid()})\n"
                f"SCRIPT_NAME={environ.get('SCRIPT_NAME', '')!r} PATH_INFO={path!r}\n").encode()
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                              ("Content-Length", str(len(body)))])
    return [body]
