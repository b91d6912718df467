"""gunicorn's command-line flags for ``run`` (and ``config``), each setting one config key.

A gunicorn user's muscle memory works: ``fcgi-manager run app:app -b unix:/run/app.sock
-w 4 -t 30 --max-requests 1000 --preload -e KEY=VALUE``. A flag's value is read like an
environment value (a TOML value, else text) and checked by the config, so an error names
the flag: ``Error: --workers ([workers] count): expected a whole number``.
"""

from __future__ import annotations

import argparse
from typing import List, Tuple

from .config import Override
from .errors import ConfigError

# (flags, dest, section, key, metavar, help)
FLAGS: Tuple[Tuple[Tuple[str, ...], str, str, str, str, str], ...] = (
    (("-b", "--bind"), "bind", "listen", "bind", "ADDR",
     "unix:/path, HOST:PORT, [::1]:PORT, fd:0, systemd (default 127.0.0.1:9000)"),
    (("-w", "--workers"), "workers", "workers", "count", "N",
     "number of workers (default: $WEB_CONCURRENCY, else the number of CPUs)"),
    (("-t", "--timeout"), "timeout", "workers", "timeout", "SECONDS",
     "seconds a request may run before its worker is killed"),
    (("--graceful-timeout",), "graceful_timeout", "workers", "graceful_timeout", "SECONDS",
     "seconds requests in flight get on stop and reload"),
    (("--max-requests",), "max_requests", "workers", "max_requests", "N",
     "recycle a worker after N requests (0 = never)"),
    (("--max-requests-jitter",), "max_requests_jitter", "workers", "max_requests_jitter", "N",
     "add up to N to each worker's max-requests"),
    (("--threads",), "threads", "workers", "threads", "N", "requests at once in each worker"),
    (("-u", "--user"), "user", "manager", "user", "USER",
     "run the app as USER (when started as root)"),
    (("-g", "--group"), "group", "manager", "group", "GROUP", "run the app with GROUP"),
    (("--chdir",), "chdir", "app", "chdir", "DIR", "directory to import the app from"),
    (("--chmod-socket",), "chmod_socket", "listen", "mode", "MODE",
     "mode of the unix socket, e.g. 666 (uWSGI's flag; default 0660: the web server "
     "must be the socket's owner or in its group)"),
    (("--pidfile",), "pidfile", "manager", "pidfile", "PATH", "write the master's pid here"),
    (("--access-log",), "access_log", "manager", "access_log", "PATH",
     "access log file ('-' = stderr)"),
    (("--log-level",), "log_level", "manager", "log_level", "LEVEL",
     "debug, info, warning, error"),
    (("--log-format",), "log_format", "manager", "log_format", "FORMAT", "text or json"),
)


def add_to(parser: argparse.ArgumentParser) -> None:
    for flags, dest, _, _, metavar, text in FLAGS:
        parser.add_argument(*flags, dest=f"set_{dest}", default=None, metavar=metavar,
                            help=text)
    parser.add_argument("--preload", dest="set_preload", action="store_true", default=None,
                        help="import the app in the master before forking")
    parser.add_argument("--no-preload", dest="set_preload", action="store_false",
                        help="import the app in each worker")
    parser.add_argument("--chown-socket", dest="set_chown_socket", default=None,
                        metavar="[USER][:GROUP]",
                        help="owner and group of the unix socket, e.g. :www-data to let "
                             "nginx's group in (uWSGI's flag; giving it away needs root, or "
                             "membership of GROUP)")
    parser.add_argument("-m", "--umask", dest="set_umask", default=None, metavar="UMASK",
                        help="umask of the master, e.g. 022; the unix socket is made "
                             "0777 & ~UMASK unless --chmod-socket is given (gunicorn's flag)")
    parser.add_argument("-e", "--env", dest="set_env", action="append", default=None,
                        metavar="KEY=VALUE", help="add to the app's environment (repeatable)")


def overrides(args: argparse.Namespace) -> List[Override]:
    """The config keys the flags given set, in a fixed order."""
    out = []
    if getattr(args, "app", None):
        out.append(Override("app", "module", args.app, "MODULE:APP"))
    for flags, dest, section, key, _, _ in FLAGS:
        value = getattr(args, f"set_{dest}", None)
        if value is not None:
            out.append(Override(section, key, value, flags[-1], text=True))
    chown = getattr(args, "set_chown_socket", None)
    if chown is not None:
        owner, sep, group = chown.partition(":")
        if not owner and not group:
            raise ConfigError(f"--chown-socket {chown!r}: write it as USER, USER:GROUP or "
                              ":GROUP")
        if owner:
            out.append(Override("listen", "owner", owner, "--chown-socket"))
        if group:
            out.append(Override("listen", "group", group, "--chown-socket"))
    umask = getattr(args, "set_umask", None)
    if umask is not None:
        out.append(Override("manager", "umask", umask, "--umask"))
        if getattr(args, "set_chmod_socket", None) is None:
            out.append(Override("listen", "mode", socket_mode(umask, "--umask"), "--umask"))
    if args.set_preload is not None:
        out.append(Override("app", "preload", args.set_preload,
                            "--preload" if args.set_preload else "--no-preload"))
    if args.set_env:
        env = {}
        for item in args.set_env:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise ConfigError(f"--env {item!r}: write it as KEY=VALUE")
            env[name] = value
        out.append(Override("app", "env", env, "--env"))
    return out


def socket_mode(umask: object, where: str) -> str:
    """The unix socket mode a umask gives, as flup and gunicorn make it: 0777 & ~umask."""
    if isinstance(umask, int) and not isinstance(umask, bool):
        value = umask
    else:
        text = str(umask).strip()
        try:
            value = int(text, 8)
        except ValueError:
            raise ConfigError(f'{where} {umask!r}: expected an octal umask like "022"'
                              ) from None
    if not 0 <= value <= 0o777:
        raise ConfigError(f"{where} {umask!r}: expected an octal umask like \"022\"")
    return format(0o777 & ~value, "04o")
