"""The configuration: TOML in, frozen dataclasses out, every error naming file and key.

Each ``[section]`` of the file is one dataclass; every field has a default except
``app.module``. Unknown keys and wrong types are errors (a typo must never be silently
ignored), with the closest key suggested (``difflib``, so the same typo always gets the
same answer) or the section the key belongs in. Relative paths are made absolute against
the config file's directory, so the master can ``chdir`` and daemonize without changing
their meaning.

Where a value comes from, highest first (as gunicorn and twelve-factor apps expect):

1. command-line flags (``run -w 8``) and ``WSGIServer(app, count=8)`` keywords;
2. the environment: ``FCGI_MANAGER_<SECTION>_<KEY>=value`` (the value is read as a TOML
   value, or taken as a plain string when it is not one), and ``WEB_CONCURRENCY`` for
   ``workers.count`` when nothing else sets it;
3. the config file;
4. the defaults below.

Relative paths given by flags or the environment are relative to the current directory.
Every key remembers what set it (``Config.origin``), so errors and ``fcgi-manager config``
can name the variable or flag instead of the file.

The environment may not weaken a security key the file sets (:data:`SECURITY_KEYS`):
whoever can set a variable of the manager's environment (a unit's ``Environment=``, a
container's ``env``, an ``.env`` file) is not always whoever wrote the file, and an empty
``FCGI_MANAGER_MANAGER_USER`` would run the app as root. Such a variable is a config error
naming it, unless the command line says it is meant (``--allow-env-override``,
:func:`allow_env_override`). Flags are the operator's own word and may change anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .accesslog import check_format as check_access_format
from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib


@dataclass(frozen=True)
class AppConfig:
    module: str = ""
    path: Tuple[str, ...] = ()
    chdir: str = ""
    env: Tuple[Tuple[str, str], ...] = ()
    clear_env: bool = False
    preload: bool = True
    script_name: Optional[str] = None
    fix_root_url: bool = False
    post_fork: str = ""  # "module:function" called in each worker after fork


@dataclass(frozen=True)
class ListenConfig:
    bind: str = "127.0.0.1:9000"
    backlog: int = 1024
    mode: str = "0660"
    owner: str = ""
    group: str = ""
    allowed_clients: Tuple[str, ...] = ()
    acl_users: Tuple[str, ...] = ()  # POSIX ACL entries granting rw on the unix socket
    acl_groups: Tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkersConfig:
    count: int = 0  # 0 = number of CPUs, resolved by ``effective_count``
    max_requests: int = 0
    max_requests_jitter: int = 0
    timeout: float = 60.0
    slow_request: float = 0.0
    graceful_timeout: float = 30.0
    max_memory: int = 0  # bytes, 0 = off
    mode: str = "static"
    min_spare: int = 1
    max_spare: int = 3
    max_workers: int = 8
    idle_timeout: float = 10.0
    queue_timeout: float = 0.0
    max_body_in_memory: int = 1024 * 1024
    read_timeout: float = 30.0
    write_timeout: float = 60.0
    max_idle_connections: int = 1024
    max_body: int = 0  # bytes, 0 = no limit; larger request bodies get 413
    threads: int = 1  # requests run at once in each worker
    max_spawn_rate: int = 32  # workers forked per second at most when a dynamic pool grows

    @property
    def effective_count(self) -> int:
        if self.count:
            return self.count
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class StatusConfig:
    path: str = ""
    ping_path: str = ""
    ping_response: str = "pong"
    show_query: bool = False  # query strings shown as "?…" unless true
    listen: str = ""  # an extra socket the master answers status/ping/metrics on itself


@dataclass(frozen=True)
class ManagerConfig:
    pidfile: str = ""
    control: str = ""
    user: str = ""
    group: str = ""
    log: str = ""  # "" = stderr in the foreground, beside the pidfile in the background
    log_level: str = "info"
    umask: int = 0o022
    name: str = ""
    log_format: str = "text"  # "text" | "json"
    access_log: str = ""  # path, "-" = stderr, "" = off
    access_format: str = ""  # "" = the built-in format
    shutdown_delay: float = 0.0  # seconds the ping path answers 503 before a stop
    # php-fpm's pool limits, set in the workers ("" = inherited from the master)
    rlimit_files: Union[int, str] = ""  # RLIMIT_NOFILE: a number
    rlimit_core: Union[int, str] = ""  # RLIMIT_CORE: bytes, or "unlimited"
    priority: Union[int, str] = ""  # the workers' nice value, -20..19


@dataclass(frozen=True)
class Config:
    app: AppConfig = field(default_factory=AppConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    manager: ManagerConfig = field(default_factory=ManagerConfig)
    source: str = ""  # the config file, "" when built from the command line
    # "section.key" -> what set it when not the file or a default ("--workers",
    # "FCGI_MANAGER_WORKERS_COUNT", "WEB_CONCURRENCY"); file keys map to "file".
    origins: Tuple[Tuple[str, str], ...] = field(default=(), compare=False)

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)

    def origin(self, key: str) -> str:
        """What set ``key`` ("workers.count"): "default", "file", a flag or a variable."""
        return dict(self.origins).get(key, "default")


SECTIONS = {
    "app": AppConfig,
    "listen": ListenConfig,
    "workers": WorkersConfig,
    "status": StatusConfig,
    "manager": ManagerConfig,
}

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
MODES = ("static", "dynamic", "ondemand")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
# K, M, G (and KiB, MiB, GiB) are powers of 1024, as nginx, php-fpm and systemd read
# them; only the explicit SI spellings KB, MB, GB are powers of 1000.
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "KIB": 1024, "KB": 1000, "M": 1024**2,
               "MIB": 1024**2, "MB": 1000**2, "G": 1024**3, "GIB": 1024**3, "GB": 1000**3,
               "T": 1024**4, "TIB": 1024**4, "TB": 1000**4}
SIZE_KEYS = ("workers.max_memory", "workers.max_body_in_memory", "workers.max_body")


def parse_size(value: Any, where: str) -> int:
    """``"512M"`` and ``"512MiB"`` (both 512 x 1024²), ``"1MB"`` (10⁶), ``1048576`` -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a size like \"512M\", got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{where}: must not be negative")
        return value
    if isinstance(value, str):
        if value.strip() == "":
            return 0
        m = _SIZE_RE.match(value)
        if m:
            unit = (m.group(2) or "").upper()
            if unit in _SIZE_UNITS:
                return int(float(m.group(1)) * _SIZE_UNITS[unit])
    raise ConfigError(
        f"{where}: cannot read {value!r} as a size",
        hint='write it like "512M" (= 512MiB), "64K" or a number of bytes; K, M and G are '
             'powers of 1024'
    )


def _where(source: str, key: str) -> str:
    return f"{source}: [{key.split('.')[0]}] {key.split('.', 1)[1]}" if source else key


def _expect(value: Any, types: Tuple[type, ...], where: str, what: str) -> Any:
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{where}: expected {what}, got {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"{where}: expected {what}, got {type(value).__name__} {value!r}")
    return value


def _resolve_path(path: str, base: str) -> str:
    if not path or path == "-":
        return path
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def _convert(section: str, key: str, value: Any, source: str, base: str,
             where: str = "") -> Any:
    """Check one key's type and turn it into the dataclass field's value."""
    where = where or _where(source, f"{section}.{key}")
    full = f"{section}.{key}"
    if full in SIZE_KEYS:
        return parse_size(value, where)
    if full == "listen.bind":
        return _resolve_bind(_expect(value, (str,), where, 'an address like "unix:/run/app.sock"'),
                             base)
    if full == "app.path":
        if isinstance(value, str):
            value = [value]
        _expect(value, (list,), where, "a list of directories")
        return tuple(_resolve_path(_expect(p, (str,), where, "a directory"), base) for p in value)
    if full == "app.env":
        _expect(value, (dict,), where, "a table of NAME = \"value\"")
        out = []
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise ConfigError(f"{where}.{k}: expected a string, got {v!r}")
            out.append((k, str(v)))
        return tuple(out)
    if full == "listen.allowed_clients":
        if isinstance(value, str):
            value = [value]
        _expect(value, (list,), where, "a list of IP addresses")
        return tuple(_expect(v, (str,), where, "an IP address") for v in value)
    if full in ("listen.acl_users", "listen.acl_groups"):
        if isinstance(value, str):
            value = [value]
        what = "a list of user names" if full.endswith("users") else "a list of group names"
        _expect(value, (list,), where, what)
        names = tuple(_expect(v, (str,), where, what) for v in value)
        for name in names:
            if not re.fullmatch(r"[\w.][\w.$-]*", name):
                raise ConfigError(f"{where}: {name!r} is not a user or group name")
        return names
    if full in ("manager.rlimit_files", "manager.rlimit_core"):
        if value in ("", "unlimited"):
            return value
        if value == -1:
            return "unlimited"
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: expected a whole number, \"unlimited\" or \"\" "
                              f"(inherited), got {value!r}")
        return value
    if full == "manager.priority":
        if value == "":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not -20 <= value <= 19:
            raise ConfigError(f"{where}: expected a nice value from -20 to 19 (or \"\": "
                              f"inherited), got {value!r}")
        return value
    if full == "status.listen":
        text = _expect(value, (str,), where, 'an address like "unix:/run/app-status.sock"')
        return _resolve_bind(text, base) if text else ""
    if full == "listen.mode":
        if isinstance(value, int) and not isinstance(value, bool):
            # 660 (the digits as written, more than 0o777) or 0o660 (a TOML octal integer)
            value = str(value) if value > 0o777 else format(value, "o")
        text = _expect(value, (str,), where, 'an octal mode like "0660"')
        if not re.fullmatch(r"0?[0-7]{3}", text):
            raise ConfigError(f'{where}: expected an octal mode like "0660", got {text!r}')
        return text
    if full == "manager.umask":
        if isinstance(value, str):
            if not re.fullmatch(r"0?[0-7]{3}", value):
                raise ConfigError(f'{where}: expected an octal umask like "022", got {value!r}')
            return int(value, 8)
        return _expect(value, (int,), where, 'an octal umask like "022"')
    if full in ("manager.pidfile", "manager.control", "manager.log", "manager.access_log",
                "app.chdir"):
        return _resolve_path(_expect(value, (str,), where, "a path"), base)
    if full == "app.script_name":
        return _expect(value, (str,), where, "a path prefix like \"/app\"")
    default = getattr(SECTIONS[section](), key)
    if isinstance(default, bool):
        return _expect(value, (bool,), where, "true or false")
    if isinstance(default, int):
        return _expect(value, (int,), where, "a whole number")
    if isinstance(default, float):
        return float(_expect(value, (int, float), where, "a number of seconds"))
    return _expect(value, (str,), where, "a string")


def _resolve_bind(bind: str, base: str) -> str:
    """A relative unix socket path is relative to ``base``; a bare path means a unix socket."""
    if bind.startswith("unix:") and not os.path.isabs(bind[5:]):
        return "unix:" + os.path.normpath(os.path.join(base, bind[5:]))
    if bind.startswith("/") or bind.startswith("./"):
        return "unix:" + os.path.normpath(os.path.join(base, bind))
    return bind


def _check(cfg: Config, source: str) -> None:
    """Rules that span a value's range or several keys."""
    origins = dict(cfg.origins)

    def err(key: str, msg: str, hint: str = "") -> ConfigError:
        origin = origins.get(key, "default")
        if origin not in ("file", "default", key):
            section, _, name = key.partition(".")
            return ConfigError(f"{origin} ([{section}] {name}): {msg}", hint)
        return ConfigError(f"{_where(source, key)}: {msg}", hint)

    app, w, m, li = cfg.app, cfg.workers, cfg.manager, cfg.listen
    if not app.module:
        raise err("app.module", "is required", 'set it like module = "yourapplication:app"')
    mod, sep, attr = app.module.partition(":")
    if not mod or not re.fullmatch(r"[A-Za-z_][\w.]*", mod) or (sep and not attr):
        raise err(
            "app.module", f'cannot read {app.module!r}', 'write "package.module:app" or '
            '"package.module:create_app()"'
        )
    for key in ("count", "max_requests", "max_requests_jitter", "min_spare", "max_spare"):
        if getattr(w, key) < 0:
            raise err(f"workers.{key}", "must not be negative")
    for key in ("timeout", "graceful_timeout", "read_timeout", "write_timeout", "idle_timeout"):
        if getattr(w, key) <= 0:
            raise err(f"workers.{key}", "must be more than 0 seconds")
    for key in ("slow_request", "queue_timeout"):
        if getattr(w, key) < 0:
            raise err(f"workers.{key}", "must not be negative (0 turns it off)")
    if w.count > 1024:
        raise err("workers.count", "more than 1024 workers is not supported")
    if w.mode not in MODES:
        raise err("workers.mode", f"must be one of {', '.join(MODES)}, got {w.mode!r}")
    if w.max_workers < 1 or w.max_workers > 1024:
        raise err("workers.max_workers", "must be between 1 and 1024")
    if w.mode == "dynamic":
        if w.min_spare > w.max_spare:
            raise err("workers.min_spare", f"({w.min_spare}) is above max_spare ({w.max_spare})")
        if w.effective_count > w.max_workers:
            raise err("workers.count", f"({w.effective_count}) is above max_workers "
                      f"({w.max_workers})")
    if w.threads < 1 or w.threads > 1024:
        raise err("workers.threads", "must be between 1 and 1024")
    if m.shutdown_delay < 0:
        raise err("manager.shutdown_delay", "must not be negative (0 turns it off)")
    if m.log_format not in ("text", "json"):
        raise err("manager.log_format", f'must be "text" or "json", got {m.log_format!r}')
    format_error = check_access_format(m.access_format)
    if format_error:
        raise err("manager.access_format", format_error)
    if app.post_fork and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", app.post_fork):
        raise err("app.post_fork", f"cannot read {app.post_fork!r}",
                  'write "package.module:function"')
    if w.max_idle_connections < 0:
        raise err("workers.max_idle_connections", "must not be negative")
    if li.backlog < 1:
        raise err("listen.backlog", "must be at least 1")
    if m.log_level.lower() not in LOG_LEVELS:
        raise err("manager.log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    for key in ("path", "ping_path"):
        value = getattr(cfg.status, key)
        if value and not value.startswith("/"):
            raise err(f"status.{key}", f"must start with '/', got {value!r}")
    if w.max_spawn_rate < 1 or w.max_spawn_rate > 1024:
        raise err("workers.max_spawn_rate", "must be between 1 and 1024")
    if (li.acl_users or li.acl_groups) and not li.bind.startswith("unix:"):
        key = "listen.acl_users" if li.acl_users else "listen.acl_groups"
        raise err(key, f"ACLs are for a unix socket, and listen.bind is {li.bind!r}")
    if cfg.status.listen:
        from .sockets import parse_address

        kind = parse_address(cfg.status.listen, _where(source, "status.listen")).kind
        if kind not in ("unix", "tcp"):
            raise err("status.listen", "must be a unix socket or a TCP address")
        if cfg.status.listen == li.bind:
            raise err("status.listen", "must not be listen.bind: the status socket is "
                                       "another socket, answered by the master itself")
    if app.script_name and not app.script_name.startswith("/"):
        raise err("app.script_name", f"must start with '/' (or be \"\"), got {app.script_name!r}")


def suggest_key(section: str, key: str) -> str:
    """A hint for an unknown ``[section] key``: the section it belongs in, or the closest key.

    ``difflib`` over sorted names makes the answer the same on every run (the first match
    of a set's iteration order was not).
    """
    homes = [s for s, cls in SECTIONS.items() if s != section and key in _field_names(cls)]
    if homes:
        return f"{key} belongs in {' or '.join('[' + h + ']' for h in homes)}"
    names = sorted(_field_names(SECTIONS[section])) if section in SECTIONS else []
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    elsewhere = sorted(f"{s}.{n}" for s, cls in SECTIONS.items() if s != section
                       for n in _field_names(cls))
    close = difflib.get_close_matches(key, [e.split(".", 1)[1] for e in elsewhere], n=1,
                                      cutoff=0.75)
    if close:
        home = next(e.split(".")[0] for e in elsewhere if e.endswith("." + close[0]))
        return f"did you mean {close[0]!r}? it belongs in [{home}]"
    return f"[{section}] knows {', '.join(names)}"


def _field_names(cls: type) -> List[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _suggest_section(name: str) -> str:
    close = difflib.get_close_matches(name, sorted(SECTIONS), n=1, cutoff=0.6)
    listed = ", ".join("[" + s + "]" for s in SECTIONS)
    return f"did you mean [{close[0]}]? sections are {listed}" if close else \
        f"sections are {listed}"


@dataclass(frozen=True)
class Override:
    """One key set from outside the file: by a command-line flag or the environment."""

    section: str
    key: str
    value: Any
    origin: str  # what set it, named in errors: "--workers", "FCGI_MANAGER_WORKERS_COUNT"
    text: bool = False  # an environment value: a TOML value, or else a plain string


ENV_PREFIX = "FCGI_MANAGER_"
# Our own variables in the same namespace, which are not settings.
ENV_RESERVED = ("CONFIG", "RESUME", "RESUME_CONFIG", "RESUME_CWD", "REGISTRY")
# Keys that keep the app from the machine and the socket from strangers: the environment
# may not weaken them where the file sets them (see the module docstring).
SECURITY_KEYS = ("manager.user", "manager.group", "listen.allowed_clients", "app.clear_env")


def settings_environment(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The variables of ``environ`` (default ``os.environ``) that are settings.

    The master keeps this copy from its start: ``app.clear_env`` then empties its own
    environment, and every later re-read of the file (a reload's validation) must see
    the settings the master was started with, not what is left (without it a
    ``manager.user`` given only by the environment was lost, and the reload's import ran
    as root)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items()
            if k.startswith(ENV_PREFIX) or k == "WEB_CONCURRENCY"}


# Whether this process's command line said the environment may weaken SECURITY_KEYS.
_ENV_MAY_WEAKEN = [False]


def allow_env_override(allowed: bool = True) -> None:
    """``--allow-env-override``: environment values may change a security key the file
    sets. Set once from the command line; a reload (same argv) keeps it."""
    _ENV_MAY_WEAKEN[0] = allowed


def env_override_allowed() -> bool:
    """Did the command line say ``--allow-env-override`` (passed on to the masters a pool
    directory's parent starts)?"""
    return _ENV_MAY_WEAKEN[0]


def _weakening(key: str, in_file: Any, value: Any) -> str:
    """How ``value`` from the environment weakens the file's ``in_file`` ('' if not).

    ``app.clear_env`` may only be turned on, and ``listen.allowed_clients`` only narrowed
    (a non-empty subset); ``manager.user`` and ``manager.group`` may not change at all:
    no rule can tell a safer user from a worse one (root)."""
    if key == "app.clear_env":
        return "turns off" if in_file and not value else ""
    if key == "listen.allowed_clients":
        if not in_file:
            return ""  # the file lets every client in: nothing to widen
        if not value:
            return "empties"
        added = [v for v in value if v not in in_file]
        return f"widens (adds {', '.join(added)})" if added else ""
    return "changes" if value != in_file else ""


def _refuse_weakening(source: str, in_file: Dict[str, Any], values: Dict[str, Dict[str, Any]],
                      origins: Dict[str, str]) -> None:
    if _ENV_MAY_WEAKEN[0]:
        return
    for key, old in in_file.items():
        origin = origins.get(key, "")
        if not origin.startswith(ENV_PREFIX):
            continue  # still the file's value, or a flag's
        section, _, name = key.partition(".")
        new = values[section][name]
        how = _weakening(key, old, new)
        if how:
            raise ConfigError(
                f"environment variable {origin} {how} [{section}] {name}, a security key "
                f"that {source or 'the config'} sets ({_shown(old)} -> {_shown(new)})",
                "unset the variable or change the file; or, if this is meant, pass "
                "--allow-env-override")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return f'"{value}"'


def environment_overrides(environ: Optional[Mapping[str, str]] = None) -> List[Override]:
    """``FCGI_MANAGER_<SECTION>_<KEY>`` variables, sorted by name (a stable order)."""
    environ = os.environ if environ is None else environ
    out = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name[len(ENV_PREFIX):] in ENV_RESERVED:
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, sorted(SECTIONS), n=1, cutoff=0.8)
            if close:  # FCGI_MANAGER_WORKER_COUNT: a typo, not someone else's variable
                raise ConfigError(
                    f"environment variable {name}: there is no section [{section}]",
                    f"did you mean {ENV_PREFIX}{close[0].upper()}_{key.upper()}?")
            continue
        if key not in _field_names(SECTIONS[section]):
            hint = suggest_key(section, key) if key else ""
            close = difflib.get_close_matches(key, sorted(_field_names(SECTIONS[section])),
                                              n=1, cutoff=0.6)
            if close and hint.startswith("did you mean"):
                hint = f"did you mean {ENV_PREFIX}{section.upper()}_{close[0].upper()}?"
            raise ConfigError(f"environment variable {name}: [{section}] has no key "
                              f"{key!r}", hint)
        out.append(Override(section, key, environ[name], name, text=True))
    return out


def _parse_env_value(text: str) -> Any:
    """``8`` -> 8, ``true`` -> True, ``["a", "b"]`` -> a list; anything else stays text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, ValueError):
        return text


def _convert_override(item: Override, base: str) -> Any:
    if item.section not in SECTIONS or item.key not in _field_names(SECTIONS[item.section]):
        raise ConfigError(f"{item.origin}: unknown setting [{item.section}] {item.key}",
                          suggest_key(item.section, item.key))
    full = f"{item.section}.{item.key}"
    where = item.origin if item.origin == full else f"{item.origin} ([{item.section}] {item.key})"
    if not item.text:
        return _convert(item.section, item.key, item.value, "", base, where)
    parsed = _parse_env_value(item.value)
    try:
        return _convert(item.section, item.key, parsed, "", base, where)
    except ConfigError:
        if parsed == item.value:
            raise
    try:  # "660" read as the number 660 is not a mode; the text "660" is
        return _convert(item.section, item.key, item.value, "", base, where)
    except ConfigError:
        return _convert(item.section, item.key, parsed, "", base, where)


def build(data: Dict[str, Any], source: str = "", base: str = "",
          flags: Sequence[Override] = (), environ: Optional[Mapping[str, str]] = None
          ) -> Config:
    """Turn parsed TOML (or a dict built by the Python API) into a Config.

    ``flags`` override the environment, which overrides ``data`` (see the module
    docstring). ``environ`` defaults to ``os.environ``.
    """
    base = base or os.getcwd()
    values: Dict[str, Dict[str, Any]] = {s: {} for s in SECTIONS}
    origins: Dict[str, str] = {}
    for section, value in data.items():
        if section not in SECTIONS:
            if not isinstance(value, dict):
                homes = [s for s, cls in SECTIONS.items() if section in _field_names(cls)]
                if homes:
                    raise ConfigError(
                        f"{source or 'config'}: {section} is outside any section",
                        f"{section} belongs in {' or '.join('[' + h + ']' for h in homes)}")
            raise ConfigError(f"{source or 'config'}: unknown section [{section}]",
                              _suggest_section(section))
        if not isinstance(value, dict):
            raise ConfigError(f"{source or 'config'}: [{section}] must be a table")
        names = _field_names(SECTIONS[section])
        for key, item in value.items():
            if key not in names:
                raise ConfigError(f"{_where(source, f'{section}.{key}')}: unknown key",
                                  suggest_key(section, key))
            values[section][key] = _convert(section, key, item, source, base)
            origins[f"{section}.{key}"] = "file"
    in_file = {k: values[k.split(".")[0]][k.split(".")[1]] for k in SECURITY_KEYS
               if origins.get(k) == "file"}
    cwd = os.getcwd()
    for item in [*environment_overrides(environ), *flags]:
        value = _convert_override(item, cwd)
        if (item.section, item.key) == ("app", "env"):  # adds to the environment, as -e does
            value = tuple({**dict(values["app"].get("env", ())), **dict(value)}.items())
        values[item.section][item.key] = value
        origins[f"{item.section}.{item.key}"] = item.origin
    env = os.environ if environ is None else environ
    concurrency = env.get("WEB_CONCURRENCY", "")
    if concurrency and "workers.count" not in origins:
        values["workers"]["count"] = _convert_override(
            Override("workers", "count", concurrency, "WEB_CONCURRENCY", text=True), cwd)
        origins["workers.count"] = "WEB_CONCURRENCY"
    _refuse_weakening(source, in_file, values, origins)
    sections = {s: SECTIONS[s](**values[s]) for s in SECTIONS}
    cfg = Config(source=source, origins=tuple(sorted(origins.items())), **sections)
    cfg = _fill_defaults(cfg, base)
    _check(cfg, source)
    return cfg


def _fill_defaults(cfg: Config, base: str) -> Config:
    """Defaults that depend on other values: pidfile and control socket beside each other."""
    m = cfg.manager
    pidfile = m.pidfile
    if not pidfile:
        name = m.name or _default_name(cfg)
        pidfile = os.path.join(base if cfg.source else _runtime_dir(), f"{name}.pid")
    control = m.control or os.path.splitext(pidfile)[0] + ".ctl"
    manager = dataclasses.replace(m, pidfile=pidfile, control=control,
                                  log_level=m.log_level.lower())
    return cfg.replace(manager=manager)


def _default_name(cfg: Config) -> str:
    if cfg.listen.bind.startswith("fd:") and not cfg.source:
        # Web servers (mod_fcgid, lighttpd bin-path) start several of us on one fd:
        # each needs its own pidfile and control socket.
        return f"fcgi-manager-fd-{os.getpid()}"
    if cfg.source:
        return os.path.splitext(os.path.basename(cfg.source))[0] + ".fcgi-manager"
    # `run` without a file: named after the address, short enough for a unix socket path.
    # A unix socket by its file name (wsgi.sock: fcgi-manager-wsgi-1a2b3c4d) and a digest of
    # the whole path, so two apps' fcgi.sock in different directories do not collide;
    # a TCP address as written (fcgi-manager-127.0.0.1_9000).
    bind = cfg.listen.bind
    if bind.startswith("unix:") or bind.startswith("/"):
        import hashlib

        stem = os.path.splitext(os.path.basename(bind[5:] if bind.startswith("unix:")
                                                 else bind))[0]
        stem = re.sub(r"[^\w.-]+", "_", stem).strip("_")[:32] or "socket"
        return f"fcgi-manager-{stem}-{hashlib.sha1(bind.encode()).hexdigest()[:8]}"
    readable = re.sub(r"[^\w.-]+", "_", bind).strip("_")[:40]
    return "fcgi-manager-" + readable


def _runtime_dir() -> str:
    for d in (os.environ.get("XDG_RUNTIME_DIR", ""), "/run" if os.geteuid() == 0 else "",
              "/tmp"):
        if d and os.path.isdir(d) and os.access(d, os.W_OK):
            return d
    return "/tmp"


# The flags of this process's command line, by config file: a reload re-reads the file
# (in the master, long after the command line was parsed) and the flags still apply.
_COMMAND_LINE: Dict[str, Tuple[Override, ...]] = {}


def read_toml(path: str) -> Dict[str, Any]:
    """The parsed file; ConfigError naming the file when it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist",
                          "pass the right file with -c or $FCGI_MANAGER_CONFIG") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable by this user") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8: {exc}") from None


def load(path: str, flags: Optional[Sequence[Override]] = None,
         environ: Optional[Mapping[str, str]] = None) -> Config:
    """Read and validate a TOML config file, with the environment and ``flags`` over it.

    Without ``flags``, the flags this process was given for the same file apply (a
    reload keeps ``run -c app.toml -w 8`` at 8 workers). ``environ`` defaults to
    ``os.environ``; a master passes the :func:`settings_environment` it started with.
    """
    path = os.path.abspath(path)
    if flags is None:
        flags = _COMMAND_LINE.get(path, ())
    else:
        _COMMAND_LINE[path] = tuple(flags)
    return build(read_toml(path), source=path, base=os.path.dirname(path), flags=flags,
                 environ=environ)


def option_overrides(options: Mapping[str, Any], origin: str = "{section}.{key}"
                     ) -> List[Override]:
    """Keyword options (``bind=...``, ``count=...``) as overrides.

    Each option name is looked up in [listen], [workers], [app], [status], [manager] in
    that order, so ``WSGIServer(app, max_requests=...)``-style callers can pass any key.
    """
    out = []
    for key, value in options.items():
        if value is None:
            continue
        for section in ("listen", "workers", "app", "status", "manager"):
            if key in _field_names(SECTIONS[section]):
                out.append(Override(section, key, value,
                                    origin.format(section=section, key=key)))
                break
        else:
            close = difflib.get_close_matches(
                key, sorted({n for cls in SECTIONS.values() for n in _field_names(cls)}), n=1)
            raise ConfigError(f"unknown option {key!r}",
                              f"did you mean {close[0]!r}?" if close else "")
    return out


def from_options(module: str, **options: Any) -> Config:
    """A Config from keyword options (``run`` and the Python API): ``bind=...``, ``count=...``.

    The options rank as command-line flags: above the environment and the defaults.
    """
    flags = [Override("app", "module", module, "app.module"), *option_overrides(options)]
    return build({}, flags=flags)
