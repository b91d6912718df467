"""Per-app process limits, as php-fpm pools have them: ``manager.rlimit_files``,
``manager.rlimit_core`` and ``manager.priority`` (the workers' nice value).

They are set in each worker (and in the zygote that imports the app for the workers it
forks) after fork and before the privilege drop and the app's import: raising a hard
limit needs root, and the app should start with the limits it will run under. The master
keeps its own. ``check`` runs in the master at start, so a limit that cannot be set is a
config error naming the key there, not a worker that fails to boot.
"""

from __future__ import annotations

import os
import resource
from typing import Any, List, Optional, Tuple

from .errors import ConfigError


def _wanted(manager: Any) -> List[Tuple[str, int, int]]:
    """(key, resource, value) for each limit the config sets ("" = inherited)."""
    out = []
    for key, which in (("rlimit_files", resource.RLIMIT_NOFILE),
                       ("rlimit_core", resource.RLIMIT_CORE)):
        value = getattr(manager, key, "")
        if value != "":
            out.append((key, which, resource.RLIM_INFINITY if value == "unlimited"
                        else int(value)))
    return out


def _priority(manager: Any) -> Optional[int]:
    value = getattr(manager, "priority", "")
    return None if value == "" else int(value)


def check(manager: Any) -> None:
    """ConfigError naming the key if a limit cannot be set (not root, above the hard
    limit; or above the kernel's ceiling for open files)."""
    for key, which, value in _wanted(manager):
        _, hard = resource.getrlimit(which)
        raising = hard != resource.RLIM_INFINITY and (value == resource.RLIM_INFINITY
                                                      or value > hard)
        if raising and os.geteuid() != 0:
            raise ConfigError(f"manager.{key} = {_show(value)}: above this user's hard "
                              f"limit ({_show(hard)})",
                              "start fcgi-manager as root, or raise the limit of the "
                              "service (systemd: LimitNOFILE= / LimitCORE=)")
        if which == resource.RLIMIT_NOFILE and value != resource.RLIM_INFINITY:
            try:
                with open("/proc/sys/fs/nr_open") as f:
                    ceiling = int(f.read())
            except (OSError, ValueError):
                continue
            if value > ceiling:
                raise ConfigError(f"manager.rlimit_files = {value}: above the kernel's "
                                  f"ceiling fs.nr_open ({ceiling})")
        if which == resource.RLIMIT_NOFILE and value == resource.RLIM_INFINITY:
            raise ConfigError("manager.rlimit_files: open files cannot be unlimited",
                              "give a number, e.g. 65536")
    priority = _priority(manager)
    if priority is not None and priority < os.getpriority(os.PRIO_PROCESS, 0) \
            and os.geteuid() != 0:
        raise ConfigError(f"manager.priority = {priority}: only root can lower the nice "
                          "value", "start fcgi-manager as root, or remove manager.priority")


def apply(manager: Any) -> None:
    """In a worker or the zygote, before the drop: set the limits and the nice value."""
    for _, which, value in _wanted(manager):
        resource.setrlimit(which, (value, value))
    priority = _priority(manager)
    if priority is not None:
        os.setpriority(os.PRIO_PROCESS, 0, priority)


def _show(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)
