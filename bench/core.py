#!/usr/bin/env python3
"""The request core alone, in one process: what one request costs in the code that a
compiler can speed up, without sockets, nginx or a loaded machine in the way.

    python bench/core.py                      # µs per request, hello/page/post
    python bench/core.py --callgrind          # + user-space instructions per request
    FCGI_MANAGER_PURE=1 python bench/core.py  # the same on the pure-Python core

Each request runs the worker's own sequence on the real functions: the bytes nginx sends
for ``GET /hello`` (BEGIN_REQUEST, 25 params from the stock ``fastcgi_params`` plus the
browser's headers, empty PARAMS and STDIN; the 64 KiB ``post`` body as STDIN records) are
fed to ``protocol.ServerConnection``, the events dispatched as the worker does (body
buffer, environ from ``wsgi.EnvironBuilder``), the app run through ``wsgi.run_app`` into a
``send`` that keeps the response bytes, and the connection reset for the next request.

Timing is process CPU time, the minimum over rounds (the only figure that holds still on
a shared machine). ``--callgrind`` runs this script under ``valgrind --tool=callgrind``
twice, with a few and with many requests, and reports the difference divided by the
difference in requests: instructions per request, start-up excluded, the same count on
every run whatever else the machine does.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import apps  # noqa: E402

from fcgi_manager.wire import protocol  # noqa: E402
from fcgi_manager.worker import wsgi  # noqa: E402

POST_SIZE = 64 * 1024

# What nginx 1.22 sends for a browser's GET through the stock fastcgi_params, with
# fastcgi_split_path_info's PATH_INFO and SCRIPT_FILENAME: 25 pairs.
NGINX_PARAMS: Dict[str, str] = {
    "QUERY_STRING": "",
    "REQUEST_METHOD": "GET",
    "CONTENT_TYPE": "",
    "CONTENT_LENGTH": "",
    "SCRIPT_NAME": "/hello",
    "REQUEST_URI": "/hello",
    "DOCUMENT_URI": "/hello",
    "DOCUMENT_ROOT": "/usr/share/nginx/html",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REQUEST_SCHEME": "http",
    "GATEWAY_INTERFACE": "CGI/1.1",
    "SERVER_SOFTWARE": "nginx/1.22.1",
    "REMOTE_ADDR": "127.0.0.1",
    "REMOTE_PORT": "53124",
    "REMOTE_USER": "",
    "SERVER_ADDR": "127.0.0.1",
    "SERVER_PORT": "8080",
    "SERVER_NAME": "",
    "REDIRECT_STATUS": "200",
    "PATH_INFO": "",
    "HTTP_HOST": "127.0.0.1",
    "HTTP_USER_AGENT": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "HTTP_ACCEPT": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "HTTP_ACCEPT_ENCODING": "gzip, deflate, br",
    "HTTP_ACCEPT_LANGUAGE": "en-US,en;q=0.5",
}


def request_bytes(app: str) -> bytes:
    """The whole request as nginx writes it on the connection."""
    params = dict(NGINX_PARAMS)
    body = b""
    if app == "post":
        body = b"x" * POST_SIZE
        params.update(REQUEST_METHOD="POST", CONTENT_LENGTH=str(POST_SIZE),
                      CONTENT_TYPE="application/octet-stream")
    return protocol.encode_request(params, body)


class Core:
    """One connection's worth of the worker's request path, run again and again."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.errors = wsgi.ErrorStream(lambda line: None)
        self.builder = wsgi.EnvironBuilder(self.errors)
        self.out: List[bytes] = []
        self.conn = protocol.ServerConnection()

    def log_exception(self, summary: str, text: str) -> None:
        raise SystemExit(f"the app failed in the benchmark: {summary}\n{text}")

    def request(self, data: bytes) -> int:
        """Serve one request from its bytes; the size of the response sent."""
        conn = self.conn
        out = self.out
        out.clear()
        params: Dict[str, str] = {}
        body: Any = None
        rid = 0
        for ev in conn.feed(data):
            kind = type(ev)
            if kind is protocol.Stdin:
                body.append(ev.data)
            elif kind is protocol.Params:
                params = ev.params
                body = wsgi.new_body(params, 1024 * 1024)
            elif kind is protocol.StdinEnd:
                wsgi.request_path(params)
                environ = self.builder.build(params, body.stream())
                wsgi.run_app(self.app, environ, out.append, rid, self.errors,
                             self.log_exception)
            elif kind is protocol.BeginRequest:
                rid = ev.request_id
        conn.request_done()
        return sum(len(b) for b in out)


def core_name() -> str:
    """Which protocol module runs: the extension's file name, or "pure"."""
    path = protocol.__file__ or ""
    return "pure" if path.endswith(".py") else os.path.basename(path)


def time_requests(app: str, n: int, rounds: int) -> float:
    """µs of process CPU time per request, the minimum over ``rounds`` runs of ``n``."""
    core = Core(getattr(apps, app))
    data = request_bytes(app)
    for _ in range(200):
        core.request(data)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(n):
            core.request(data)
        best = min(best, time.process_time() - t0)
    return best / n * 1e6


def run_fixed(app: str, n: int) -> None:
    """Serve ``n`` requests and nothing else (what callgrind counts)."""
    core = Core(getattr(apps, app))
    data = request_bytes(app)
    sent = 0
    for _ in range(n):
        sent = core.request(data)
    print(f"served {n} {app} requests, {sent} bytes each")


def callgrind_count(app: str, n: int) -> int:
    """Instructions callgrind counts for this script serving ``n`` requests."""
    with tempfile.TemporaryDirectory(prefix="core-cg-") as tmp:
        out = os.path.join(tmp, "cg.out")
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
               sys.executable, __file__, "--fixed", str(n), "--apps", app]
        # A fixed hash seed: the same dict layouts, hence the same count, on every run.
        env = dict(os.environ, PYTHONHASHSEED="0")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"callgrind failed:\n{proc.stderr[-2000:]}")
        match = re.search(r"Collected\s*:\s*(\d+)", proc.stderr)
        if match is None:
            raise SystemExit(f"no instruction count in callgrind's output:\n{proc.stderr}")
        return int(match.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--apps", default="hello,page,post")
    ap.add_argument("--requests", type=int, default=20000, help="requests per timed round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--callgrind", action="store_true",
                    help="also count instructions per request with callgrind")
    ap.add_argument("--fixed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    names = [a for a in args.apps.split(",") if a]
    if args.fixed:
        for app in names:
            run_fixed(app, args.fixed)
        return 0
    if args.callgrind and shutil.which("valgrind") is None:
        raise SystemExit("--callgrind needs valgrind (apt-get install valgrind)")
    print(f"core: {core_name()}  (python {sys.version.split()[0]})")
    print("| app | µs per request (CPU, min of rounds) | instructions per request |")
    print("|---|---:|---:|")
    for app in names:
        us = time_requests(app, args.requests, args.rounds)
        instr = "—"
        if args.callgrind:
            low, high = 200, 2200
            per = (callgrind_count(app, high) - callgrind_count(app, low)) / (high - low)
            instr = f"{per:,.0f}"
        print(f"| {app} | {us:.2f} | {instr} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
