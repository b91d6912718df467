"""Process titles, so ``ps``, ``top`` and ``pgrep`` tell the master from each worker.

Two names per process:

* ``/proc/PID/comm`` (what ``top`` and ``ps -o comm`` show, 15 bytes at most), set with
  ``prctl(PR_SET_NAME)`` (procctl), always: ``fcgi-mgr master``, ``fcgi-worker 3``
  (and ``fcgi-mgr zygote`` for the child that imports the app for preload as root).
* ``/proc/PID/cmdline`` (what ``ps aux`` shows), the full title
  ``fcgi-manager: master [NAME] (CONFIG)`` or ``fcgi-manager: worker 3 [NAME]``, only when
  the optional ``setproctitle`` package is importable (``pip install
  'fcgi-manager[setproctitle]'``): rewriting the argument block needs C, and a missing
  title is no reason to fail.

Nothing here runs per request; a failure to set a title is ignored.
"""

from __future__ import annotations

import sys
from typing import Any

from .procctl import COMM_MAX
from .procctl import set_name as _prctl_set_name


def _set_cmdline(title: str) -> bool:
    try:
        import setproctitle  # the optional extra
    except ImportError:
        return False
    try:
        setproctitle.setproctitle(title)
    except Exception:  # noqa: BLE001 - a title is cosmetic: never fail because of it
        return False
    return True


def master_title(name: str, config: str) -> str:
    title = "fcgi-manager: master"
    if name:
        title += f" [{name}]"
    if config:
        title += f" ({config})"
    return title


def worker_title(worker_id: int, name: str) -> str:
    return f"fcgi-manager: worker {worker_id}" + (f" [{name}]" if name else "")


def worker_comm(worker_id: int) -> str:
    comm = f"fcgi-worker {worker_id}"
    return comm if len(comm) <= COMM_MAX else f"fcgi-w {worker_id}"


def set_master(name: str, config: str) -> None:
    """Name the master: ``fcgi-manager: master [NAME] (CONFIG)``."""
    _set_cmdline(master_title(name, config))
    _prctl_set_name("fcgi-mgr master")  # after setproctitle, which may set comm itself


def set_worker(worker_id: int, name: str) -> None:
    """Name a worker, right after the fork: ``fcgi-manager: worker ID [NAME]``."""
    _set_cmdline(worker_title(worker_id, name))
    _prctl_set_name(worker_comm(worker_id))


def set_zygote(name: str) -> None:
    """Name the child that imports the app for preload as root and forks the workers."""
    _set_cmdline("fcgi-manager: zygote" + (f" [{name}]" if name else ""))
    _prctl_set_name("fcgi-mgr zygote")


def title_name(cfg: Any) -> str:
    """The ``[NAME]`` of a title: ``manager.name``, else the app (``module:app``)."""
    return cfg.manager.name or cfg.app.module


def title_config(cfg: Any) -> str:
    """The ``(CONFIG)`` of the master's title: the config file, else the ``.fcgi`` script
    that runs ``WSGIServer`` (mod_fcgid and lighttpd start it by that path)."""
    if cfg.source:
        return cfg.source
    script = sys.argv[0] if sys.argv else ""
    if script and not script.endswith(("__main__.py", "fcgi-manager")) and script != "-c":
        return script
    return ""
