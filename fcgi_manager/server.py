"""``WSGIServer``: the drop-in for flup's server in the Flask guide's ``.fcgi`` files.

    from fcgi_manager import WSGIServer
    WSGIServer(app).run()                                   # socket on fd 0
    WSGIServer(app, bindAddress='/path/to/fcgi.sock').run()  # unix socket
    WSGIServer(app, bindAddress=('127.0.0.1', 9000)).run()   # TCP

It runs the same master and workers as ``fcgi-manager run``. Keyword arguments are
``[workers]``/``[listen]``/``[status]``/``[manager]`` settings (``count=4``,
``max_requests=1000``...), plus flup's own names where they mean the same thing.
Reload (SIGHUP) replaces the workers, forked from this process's already-imported app:
to load new code, restart, or use ``fcgi-manager`` with a config file.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Tuple, Union

from . import config as config_mod
from .errors import FcgiManagerError, format_error
from .run_flags import socket_mode
from .sockets import fd0_is_listening_socket

FLUP_NAMES = {
    "maxRequests": "max_requests",
    "maxChildren": "max_workers",
    "maxSpare": "max_spare",
    "minSpare": "min_spare",
    "backlog": "backlog",
    "umask": "umask",
}
FLUP_IGNORED = ("debug", "multiplexed", "multithreaded", "multiprocess", "maxThreads",
                "roles", "environ", "error_email", "loggingLevel", "bindAddress")


class WSGIServer:
    """Serve ``application`` with a prefork pool until stopped; see the module docstring."""

    def __init__(self, application: Callable, bindAddress: Union[None, str,
                 Tuple[str, int]] = None, **options: Any) -> None:
        self.application = application
        self.bind_address = bindAddress
        self.options = options

    def _bind(self) -> str:
        addr = self.bind_address
        if addr is None:
            if fd0_is_listening_socket():
                return "fd:0"
            raise FcgiManagerError(
                "WSGIServer(app).run() expects a listening FastCGI socket on stdin (fd 0), as "
                "passed by Apache mod_fcgid, lighttpd bin-path, spawn-fcgi or Supervisor's "
                "fcgi-program; stdin here is not a socket",
                "run it from the web server, or pass bindAddress='/path/to/fcgi.sock' or "
                "('127.0.0.1', 9000), or use `fcgi-manager run module:app --bind ...`",
            )
        if isinstance(addr, tuple):
            host, port = addr
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if isinstance(addr, str):
            return addr if addr.startswith(("unix:", "fd:")) or addr == "systemd" else \
                "unix:" + addr
        raise FcgiManagerError(f"bindAddress {addr!r}: expected a path or (host, port)")

    def _config(self) -> config_mod.Config:
        options = {}
        for key, value in self.options.items():
            if key in FLUP_IGNORED:
                logging.getLogger("fcgi_manager").debug("WSGIServer: ignoring %s=%r", key, value)
                continue
            options[FLUP_NAMES.get(key, key)] = value
        if "umask" in options:
            # flup: the socket is created under this umask, so it is 0777 & ~umask
            # (umask=0 lets every user, the web server's too, connect).
            options.setdefault("mode", socket_mode(options["umask"], "WSGIServer(umask=...)"))
            if isinstance(options["umask"], int):
                options["umask"] = format(options["umask"], "03o")
        app = self.application
        name = getattr(app, "__name__", None) or type(app).__name__
        module = getattr(app, "__module__", None) or "__main__"
        if not name.isidentifier():
            name = "app"
        options.setdefault("preload", True)
        return config_mod.from_options(f"{module}:{name}", bind=self._bind(), **options)

    def run(self) -> int:
        """Serve until stopped; 0 after a clean stop.

        A failure (no socket on fd 0, a bind error, an app that cannot start) prints the
        reason and raises ``SystemExit(1)``: the Flask guide's ``.fcgi`` files ignore what
        ``run()`` returns, and their process must still exit non-zero.
        """
        from .master.lifecycle import serve

        try:
            cfg = self._config()
            code = serve(cfg, app=self.application)
        except FcgiManagerError as exc:
            print(format_error(exc), file=sys.stderr)
            code = 1
        except KeyboardInterrupt:
            return 0
        if code:
            raise SystemExit(code)
        return 0



__all__ = ["WSGIServer"]
