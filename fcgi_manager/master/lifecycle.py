"""One master's life in this process: refuse a second one, open the log, run, clean up.

``fcgi-manager run``/``start`` (``cli``) and the flup-compatible ``WSGIServer``
(``server``) both call :func:`serve`, so the library API never loads the command line.
It raises :class:`~.errors.FcgiManagerError` for what the caller prints; it prints only
what the operator must see when no log is there yet (an app that could not start in the
foreground).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional

from .. import logs, rundir, webusers
from ..config import Config
from ..errors import FcgiManagerError, format_error
from . import daemon, registry, resume

log = logging.getLogger("fcgi_manager.master")


def log_path(cfg: Config, background: bool) -> str:
    """Where the master logs: ``manager.log``, else beside the pidfile in the background,
    else stderr (``-``)."""
    if cfg.manager.log:
        return cfg.manager.log
    if background:
        return os.path.splitext(cfg.manager.pidfile)[0] + ".log"
    return "-"


def check_not_running(cfg: Config) -> Optional[int]:
    """The pid of a live master for this config, after clearing a stale pidfile."""
    state = daemon.inspect_pidfile(cfg.manager.pidfile)
    if state.live and state.pid != os.getpid():
        return state.pid
    daemon.remove_stale_pidfile(state)  # its master is gone (or the pid is another's now)
    return None


def serve(cfg: Config, app: Any = None, background: bool = False,
          report_fd: int = -1) -> int:
    """Run a master in this process until it stops (foreground, or as the daemon)."""
    from .shell import Master  # the shell and everything it drives, only when serving

    resuming = resume.resuming()
    if not resuming:
        running = check_not_running(cfg)
        if running:
            raise FcgiManagerError(f"already running (pid {running}, pidfile "
                                   f"{cfg.manager.pidfile})", "stop it first, or use reload")
    path = log_path(cfg, background)
    try:
        if not resuming:
            # The missing runtime directory (/run/NAME after a reboot) is created, and a
            # directory where another user could swap our files for links is refused.
            rundir.prepare(cfg, path)
        os.umask(cfg.manager.umask)  # the log is created with it, like every file after it
        handler = logs.setup_master(path, cfg.manager.log_level, cfg.manager.log_format)
        os.environ.setdefault("FCGI_MANAGER_RESUME_CWD", os.getcwd())
        if handler.open_error and not resuming:
            raise FcgiManagerError(f"manager.log: {handler.open_error}",
                                   "fix the path, or set manager.log to another file")
        master = Master(cfg, app, handler)
    except FcgiManagerError as exc:
        if report_fd >= 0:
            daemon.report(report_fd, False, format_error(exc))
        raise
    master.pidfile_fd = daemon.take_carried_pidfile_fd()
    if report_fd >= 0:
        master.child_close_fds.append(report_fd)
    pidfile = cfg.manager.pidfile
    try:
        master.prepare()
    except FcgiManagerError as exc:
        if report_fd >= 0:
            daemon.report(report_fd, False, format_error(exc))
        master.abandon()
        raise

    def ready(ok: bool, text: str) -> None:
        if ok:
            try:
                master.pidfile_fd = daemon.write_pidfile(pidfile, os.getpid())
            except OSError as exc:
                text = f"cannot write the pidfile {pidfile}: {exc.strerror}"
                ok = False
                master.pidfile_failed(text)
        if report_fd >= 0:
            daemon.report(report_fd, ok, text)
        if ok:
            log_ready(master)
        elif report_fd < 0:
            print(text.rstrip() + "\nError: the app could not start", file=sys.stderr)

    entry = _register(cfg)
    try:
        code: int = master.run(ready)
    finally:
        daemon.remove_pidfile(pidfile, os.getpid())
        if entry:
            registry.unregister(entry)
    return code


def _register(cfg: Config) -> str:
    """Put this master in the user's registry (``status --all``); '' if that failed."""
    m = cfg.manager
    name = m.name or (os.path.splitext(os.path.basename(cfg.source))[0] if cfg.source
                      else cfg.app.module)
    try:
        return registry.register(name=name, config=cfg.source, pidfile=m.pidfile,
                                 control=m.control, bind=cfg.listen.bind,
                                 graceful_timeout=cfg.workers.graceful_timeout,
                                 shutdown_delay=cfg.manager.shutdown_delay)
    except OSError as exc:
        log.warning("not listed by `status --all`: %s", exc)
        return ""


def log_ready(master: Any) -> None:
    """The master's first line once its workers serve, and what the operator should fix."""
    log.info("ready: %d worker(s) serving %s", len(master.workers), master.address)
    for line in webusers.socket_warnings(master.cfg, running=True):
        log.warning("%s", line)
    if os.geteuid() == 0 and not master.cfg.manager.user:
        from ..privileges import ROOT_WARNING

        log.info("%s", ROOT_WARNING)  # start, check and status say it to the operator
