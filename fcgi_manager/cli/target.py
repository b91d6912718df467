"""Which running master a command talks to: by config file, by ``--pidfile``, or by what
the master registered about itself.

``status``, ``stop``, ``scale``, ``reopen-logs`` and ``request`` need only the master's
control socket and pidfile, not a valid config: when the config on disk is broken (the
moment an operator most needs them), the master that runs from the old one is found by
its registry entry (see ``registry``), else by the paths the file names or implies, and
the command warns that the file is invalid. ``reload`` does need a valid config and
refuses with its error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

from .. import config as config_mod
from ..errors import ConfigError, FcgiManagerError
from ..master import daemon, registry


@dataclass
class Target:
    """The paths of one master, and the config they came from (if it is valid)."""

    control: str
    pidfile: str
    config: Optional[config_mod.Config] = None
    config_path: str = ""
    config_error: Optional[ConfigError] = None
    entry: Optional[registry.Entry] = None

    @property
    def graceful_timeout(self) -> float:
        if self.config is not None:
            return self.config.workers.graceful_timeout
        if self.entry is not None:
            return self.entry.graceful_timeout
        return config_mod.WorkersConfig().graceful_timeout

    @property
    def shutdown_delay(self) -> float:
        if self.config is not None:
            return self.config.manager.shutdown_delay
        if self.entry is not None:
            return self.entry.shutdown_delay
        return 0.0

    def warning(self) -> str:
        """The warning to print when the master is reached despite a broken config."""
        if self.config_error is None:
            return ""
        text = f"warning: the config on disk is invalid: {self.config_error.message}"
        if self.config_error.hint:
            text += f" ({self.config_error.hint})"
        how = "its registry entry" if self.entry is not None else "the paths in the file"
        return text + f"\nwarning: using the running master's own paths ({how}): control " \
                      f"socket {self.control}"


def by_pidfile(pidfile: str) -> Target:
    """``--pidfile PATH``: a ``run`` or ``WSGIServer`` master needs no config file."""
    pidfile = os.path.abspath(pidfile)
    entry = registry.find(pidfile=pidfile)
    if entry is None:
        pid = daemon.read_pidfile(pidfile)
        entry = registry.find(pid=pid) if pid else None
    if entry is not None:
        return Target(entry.control, pidfile, config_path=entry.config, entry=entry)
    return Target(os.path.splitext(pidfile)[0] + ".ctl", pidfile)


def by_config(path: str) -> Target:
    """The master of the config file at ``path``, even when that file is now broken."""
    path = os.path.abspath(path)
    try:
        cfg = config_mod.load(path)
    except ConfigError as exc:
        if "does not exist" in exc.message and not registry.find(config=path):
            raise
        return _broken(path, exc)
    running = registry.find_all(config=path)
    if len(running) == 1 and running[0].control != cfg.manager.control:
        # Its master was started with other settings (a flag, a variable): talk to it
        # where it listens, not where the file alone would put it.
        entry = running[0]
        return Target(entry.control, entry.pidfile, cfg, path, entry=entry)
    return Target(cfg.manager.control, cfg.manager.pidfile, cfg, path)


def _broken(path: str, error: ConfigError) -> Target:
    entry = registry.find(config=path)
    if entry is not None:
        return Target(entry.control, entry.pidfile, None, path, error, entry)
    pidfile, control = _paths_from_text(path)
    return Target(control, pidfile, None, path, error)


def _paths_from_text(path: str) -> tuple:
    """The pidfile and control socket a broken file names, or the defaults it implies."""
    base = os.path.dirname(path)
    manager: Dict[str, Any] = {}
    try:
        data = config_mod.read_toml(path)
        if isinstance(data.get("manager"), dict):
            manager = data["manager"]
    except ConfigError:
        pass

    def text(key: str) -> str:
        value = manager.get(key, "")
        value = os.environ.get(f"FCGI_MANAGER_MANAGER_{key.upper()}", value)
        return value if isinstance(value, str) else ""

    name = text("name") or os.path.splitext(os.path.basename(path))[0] + ".fcgi-manager"
    pidfile = text("pidfile")
    pidfile = _absolute(pidfile, base) if pidfile else os.path.join(base, f"{name}.pid")
    control = text("control")
    control = _absolute(control, base) if control else os.path.splitext(pidfile)[0] + ".ctl"
    return pidfile, control


def _absolute(path: str, base: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def resolve(config_path: Optional[str], pidfile: Optional[str]) -> Target:
    """The master a command addresses: ``--pidfile`` wins over ``-c``."""
    if pidfile:
        return by_pidfile(pidfile)
    if not config_path:
        raise FcgiManagerError(
            "no config file given",
            "pass -c app.toml (or set $FCGI_MANAGER_CONFIG), or --pidfile PATH for a master "
            "started by `run` or WSGIServer; `fcgi-manager status --all` lists every master",
        )
    return by_config(config_path)
