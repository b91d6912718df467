"""The servers under test, each configured for the same two worker processes.

Every server runs the same callables from ``bench/apps.py`` on a unix socket, and is
stopped with SIGTERM. The settings follow each project's own documentation for a production
deployment behind nginx, changed only where needed for a fair comparison (worker count) or
for the harness (foreground, stop on SIGTERM, logs to a file).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .deps import Peers

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = BENCH_DIR.parent
WORKERS = 2


@dataclass(frozen=True)
class Context:
    """What a server's command line is built from."""

    app: str
    socket: Path
    peers: Optional[Peers]


@dataclass(frozen=True)
class Server:
    """One server under test: how nginx reaches it and how to start it."""

    name: str
    protocol: str  # "fastcgi" (keep-conn off and on) or "http" (gunicorn, behind proxy_pass)
    peer: Optional[str]  # the package it comes from in the peers' virtualenv, if any
    argv: Callable[[Context], List[str]]
    env: Callable[[Context], Dict[str, str]]
    nginx_params: str = ""  # extra fastcgi_param lines (php-fpm needs SCRIPT_FILENAME)

    @property
    def keep_conn_variants(self) -> List[Optional[bool]]:
        """FastCGI servers run with keep-conn off and on; HTTP has no such switch (None)."""
        return [False, True] if self.protocol == "fastcgi" else [None]


def _plain_env(ctx: Context) -> Dict[str, str]:
    return dict(os.environ)


def _fcgi_manager_env(ctx: Context) -> Dict[str, str]:
    """Import fcgi_manager from this checkout and the apps from bench/."""
    env = dict(os.environ)
    paths = [str(BENCH_DIR), str(REPO_ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def _fcgi_manager_argv(ctx: Context) -> List[str]:
    return [
        sys.executable, "-m", "fcgi_manager", "run", f"apps:{ctx.app}",
        "--bind", f"unix:{ctx.socket}", "--workers", str(WORKERS),
    ]


def _flup_argv(model: str) -> Callable[[Context], List[str]]:
    def argv(ctx: Context) -> List[str]:
        assert ctx.peers is not None
        return [
            str(ctx.peers.python), str(BENCH_DIR / "flup_server.py"), "--model", model,
            "--app", ctx.app, "--socket", str(ctx.socket), "--workers", str(WORKERS),
        ]

    return argv


def _uwsgi_argv(ctx: Context) -> List[str]:
    """uWSGI's native FastCGI socket; --die-on-term because SIGTERM means reload in 2.0."""
    assert ctx.peers is not None
    return [
        str(ctx.peers.bin("uwsgi")), "--fastcgi-socket", str(ctx.socket),
        "--processes", str(WORKERS), "--master", "--die-on-term", "--need-app",
        "--pythonpath", str(BENCH_DIR), "--module", f"apps:{ctx.app}",
        "--disable-logging",
    ]


def _gunicorn_argv(ctx: Context) -> List[str]:
    """gunicorn's default sync workers, which its docs say belong behind a buffering proxy."""
    assert ctx.peers is not None
    return [
        str(ctx.peers.bin("gunicorn")), "--workers", str(WORKERS), "--worker-class", "sync",
        "--bind", f"unix:{ctx.socket}", "--chdir", str(BENCH_DIR), "--log-level", "warning",
        f"apps:{ctx.app}",
    ]


PHP_SCRIPT = BENCH_DIR / "php" / "index.php"


def php_fpm_binary() -> Optional[str]:
    """Debian names the binary after the PHP version (``php-fpm8.2``); take the newest."""
    for directory in ("/usr/sbin", "/usr/local/sbin"):
        found = sorted(Path(directory).glob("php-fpm*"), reverse=True)
        for candidate in found:
            if os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def _php_fpm_argv(ctx: Context) -> List[str]:
    """php-fpm with ``pm = static`` and two children, the same pages in PHP (opcache on, as
    Debian's php-fpm ships it). Its config is written beside the socket for each start."""
    binary = php_fpm_binary()
    if binary is None:
        raise RuntimeError("php-fpm is not installed (Debian package php-fpm)")
    conf = ctx.socket.with_suffix(f".{ctx.app}.php-fpm.conf")
    as_root = os.geteuid() == 0
    conf.write_text(
        "[global]\n"
        f"pid = {ctx.socket.with_suffix('.php-fpm.pid')}\n"
        f"error_log = {ctx.socket.with_suffix('.php-fpm.log')}\n"
        "daemonize = no\n"
        "[bench]\n"
        + ("user = root\ngroup = root\n" if as_root else "")
        + f"listen = {ctx.socket}\n"
        "listen.mode = 0666\n"
        "listen.backlog = 1024\n"
        "pm = static\n"
        f"pm.max_children = {WORKERS}\n"
        f"env[BENCH_APP] = {ctx.app}\n"
    )
    return [binary, "--nodaemonize", "--fpm-config", str(conf)] + (["-R"] if as_root else [])


SERVERS: Dict[str, Server] = {
    server.name: server
    for server in (
        Server("fcgi-manager", "fastcgi", None, _fcgi_manager_argv, _fcgi_manager_env),
        Server("flup-fork", "fastcgi", "flup", _flup_argv("fork"), _plain_env),
        Server("flup-threaded", "fastcgi", "flup", _flup_argv("threaded"), _plain_env),
        Server("uwsgi", "fastcgi", "uwsgi", _uwsgi_argv, _plain_env),
        Server("gunicorn", "http", "gunicorn", _gunicorn_argv, _plain_env),
        Server("php-fpm", "fastcgi", None, _php_fpm_argv, _plain_env,
               nginx_params=f"\n        fastcgi_param SCRIPT_FILENAME {PHP_SCRIPT};"),
    )
}
SUBJECT = "fcgi-manager"


def fcgi_manager_problem() -> Optional[str]:
    """Why ``python -m fcgi_manager run`` cannot work from this checkout, or None."""
    ctx = Context(app="hello", socket=Path("/nonexistent"), peers=None)
    argv = [sys.executable, "-m", "fcgi_manager", "run", "--help"]
    try:
        done = subprocess.run(
            argv, env=_fcgi_manager_env(ctx), capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"
