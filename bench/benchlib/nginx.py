"""The private nginx every server is measured behind.

One nginx serves the whole run, from a config written to the run's temporary directory
(``daemon off``, run as a child of the harness, with its own pid file, temp paths and error
log), so nothing of the system's nginx is used or touched. Each server under test gets:

- ``/<server>/off/``: ``fastcgi_pass unix:SOCK`` — a new FastCGI connection per request,
  which is what most deployments do;
- ``/<server>/on/``: ``fastcgi_keep_conn on`` through an ``upstream { keepalive 16; }``, so
  nginx reuses connections; with more keepalive connections than workers a prefork server
  can stall here (the php-fpm problem), which is exactly what this variant shows;
- for an HTTP server (gunicorn), ``/<server>/off/`` is a ``proxy_pass`` as its docs show.

``/ceiling`` answers ``return 200`` with the same 13 bytes as the ``hello`` app: the most
this nginx and wrk can do on this machine, the upper bound for every other number.
"""

from __future__ import annotations

import http.client
import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Tuple

KEEPALIVE_CONNECTIONS = 16
UPSTREAM_TIMEOUT_S = 10
CEILING_BODY = "Hello, World!"

# What the WSGI servers need; written out instead of including /etc/nginx/fastcgi_params
# so the run does not depend on the system's nginx files. SCRIPT_NAME is empty and
# PATH_INFO the whole path, the way a WSGI app mounted at the root sees it.
FASTCGI_PARAMS = """
        fastcgi_param QUERY_STRING $query_string;
        fastcgi_param REQUEST_METHOD $request_method;
        fastcgi_param CONTENT_TYPE $content_type;
        fastcgi_param CONTENT_LENGTH $content_length;
        fastcgi_param SCRIPT_NAME "";
        fastcgi_param PATH_INFO $uri;
        fastcgi_param REQUEST_URI $request_uri;
        fastcgi_param DOCUMENT_URI $document_uri;
        fastcgi_param SERVER_PROTOCOL $server_protocol;
        fastcgi_param REQUEST_SCHEME $scheme;
        fastcgi_param GATEWAY_INTERFACE CGI/1.1;
        fastcgi_param SERVER_SOFTWARE nginx/$nginx_version;
        fastcgi_param REMOTE_ADDR $remote_addr;
        fastcgi_param REMOTE_PORT $remote_port;
        fastcgi_param SERVER_ADDR $server_addr;
        fastcgi_param SERVER_PORT $server_port;
        fastcgi_param SERVER_NAME $server_name;"""


@dataclass(frozen=True)
class Backend:
    """A server under test as nginx sees it: a name, a protocol and a unix socket."""

    name: str
    protocol: str  # "fastcgi" or "http"
    socket: Path
    params: str = ""  # extra fastcgi_param lines this server needs


def _user_directive() -> str:
    """Run workers as the harness's own user, so they can reach the servers' sockets."""
    if os.geteuid() != 0:
        return ""  # nginx ignores "user" when not root (and would warn about it)
    return f"user {pwd.getpwuid(os.geteuid()).pw_name};"


def _upstream(b: Backend, kind: str) -> str:
    """An upstream name made only of characters nginx accepts in a host name."""
    return f"{b.name.replace('-', '_')}_{kind}"


def _fastcgi_blocks(b: Backend) -> Tuple[str, str]:
    """The upstream block and the two locations (keep-conn off and on) of a FastCGI server."""
    upstream = f"""
    upstream {_upstream(b, 'keepconn')} {{
        server unix:{b.socket};
        keepalive {KEEPALIVE_CONNECTIONS};
    }}"""
    locations = f"""
        location /{b.name}/off/ {{
            fastcgi_pass unix:{b.socket};{FASTCGI_PARAMS}{b.params}
        }}
        location /{b.name}/on/ {{
            fastcgi_pass {_upstream(b, 'keepconn')};
            fastcgi_keep_conn on;{FASTCGI_PARAMS}{b.params}
        }}"""
    return upstream, locations


def _http_blocks(b: Backend) -> Tuple[str, str]:
    """The upstream block and location of an HTTP server, as gunicorn's docs deploy it."""
    upstream = f"""
    upstream {_upstream(b, 'http')} {{
        server unix:{b.socket} fail_timeout=0;
    }}"""
    locations = f"""
        location /{b.name}/off/ {{
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_redirect off;
            proxy_pass http://{_upstream(b, 'http')};
        }}"""
    return upstream, locations


def render_config(tmp: Path, port: int, backends: Iterable[Backend]) -> str:
    """The whole nginx.conf for a run, every path inside ``tmp``."""
    upstreams: List[str] = []
    locations: List[str] = []
    for backend in backends:
        blocks = _fastcgi_blocks(backend) if backend.protocol == "fastcgi" else (
            _http_blocks(backend)
        )
        upstreams.append(blocks[0])
        locations.append(blocks[1])
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp / ('nginx-' + kind)};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""# Written by bench/run.py for one benchmark run.
{_user_directive()}
worker_processes 1;
daemon off;
master_process on;
pid {tmp / 'nginx.pid'};
error_log {tmp / 'nginx-error.log'} warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    default_type application/octet-stream;
{temp_paths}
    client_max_body_size 1m;
    client_body_buffer_size 128k;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    fastcgi_read_timeout {UPSTREAM_TIMEOUT_S}s;
    proxy_read_timeout {UPSTREAM_TIMEOUT_S}s;
{''.join(upstreams)}

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;

        location = /ceiling {{
            default_type text/plain;
            return 200 "{CEILING_BODY}";
        }}
{''.join(locations)}
    }}
}}
"""


def command(nginx_bin: str, tmp: Path, conf: Path) -> List[str]:
    """nginx in the foreground with its own prefix and startup error log (nginx >= 1.19.5)."""
    return [nginx_bin, "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(conf)]


def http_status(port: int, path: str, timeout_s: float = 2.0) -> int:
    """The status of one GET through nginx, or 0 when there is no answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


class ErrorLog:
    """nginx's error log, read in slices: what it logged during one wrk run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        """The current end of the log, to count from."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def lines_since(self, offset: int) -> List[str]:
        """The lines written after ``offset``."""
        try:
            with open(self.path, "rb") as log:
                log.seek(offset)
                data = log.read()
        except FileNotFoundError:
            return []
        return data.decode(errors="replace").splitlines()
