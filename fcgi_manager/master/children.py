"""The master's children: forking a worker, and the reload's throwaway check process.

Both start the same way (:func:`leave_master`): signal handlers back to their defaults,
the master's wakeup pipe detached, and every descriptor that belongs to the master
closed -- its selector, the control socket and connections, the other workers' pipes,
the pidfile, the log file.

A worker then points stdout/stderr at its output pipe (the master logs it line by line),
drops privileges for good, imports the app unless it was preloaded, and says ready or
sends its boot error on its notify pipe (format in ``notify``). With ``preload`` as root
and ``manager.user``, workers are forked by the zygote (``zygote.py``, started by
:func:`start_zygote`), which imported the app after dropping privileges. The check
process closes every descriptor but its pipe, loads the new config, drops privileges for
good, imports the new code, and writes the error text to its pipe if anything fails; an
empty pipe and exit status 0 mean the reload may go ahead.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import stat
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, Optional, Tuple

from .. import fdutil, fsafe, limits, logs, sockets
from .. import status as status_mod
from ..config import Config
from ..errors import AppImportError, FcgiManagerError, format_error
from ..privileges import apply_environment, resolve_user
from ..scoreboard import Scoreboard, SlotWriter
from ..wire import notify
from ..wire.codes import EXIT_BOOT_ERROR
from ..worker import outpipe
from ..worker.appload import load_app, prepare_import, run_post_fork
from ..worker.handoff import Gate
from ..worker.threaded import build_worker
from . import procctl, proctitle
from .zygote import Zygote

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGHUP,
                   signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
MAX_ERROR_TEXT = 60000


@dataclass
class MasterFds:
    """What a child must let go of: the master's selector and descriptors."""

    selector: selectors.BaseSelector
    fds: List[int] = field(default_factory=list)
    log_handler: Any = None  # the master's log file: the app must not be able to write it


def close_quietly(fd: Optional[int]) -> None:
    if fd is None or fd < 0:
        return
    try:
        os.close(fd)
    except OSError:
        pass


def leave_master(master: MasterFds) -> None:
    """In a freshly forked child: drop the master's signal handling and descriptors."""
    signal.set_wakeup_fd(-1)
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    master.selector.close()
    for fd in master.fds:
        close_quietly(fd)
    if master.log_handler is not None:
        master.log_handler.close()


def _log_file_opener(path: str) -> Optional[Callable[[], int]]:
    """How a worker opens ``manager.log`` to write its lines to it itself, or None when the
    log is the master's stderr. Called before the worker drops privileges, so the file's
    owner (the master's user) is trusted as the master trusts it; anything but a regular
    file (a terminal, a pipe behind ``/dev/stdout``) is refused: the master relays those
    lines, where a writer that blocks cannot hold up a request."""
    if path in ("", "-"):
        return None
    owners = (os.geteuid(),)

    def open_log() -> int:
        fd = fsafe.open_append(path, owners=owners, create=False)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", path)
        return fd
    return open_log


def _run_child(body: Callable[[], int]) -> None:  # pragma: no cover - runs in the child
    """Run ``body`` in a forked child and exit with its status; never returns."""
    code = 1
    try:
        code = body()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        try:
            traceback.print_exc()
        except Exception:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        os._exit(code)


# -- workers ------------------------------------------------------------------------------

@dataclass
class WorkerSetup:
    """Everything a worker needs from the master, passed explicitly to the child."""

    cfg: Config
    app: Optional[Callable]
    listener: Any  # socket.socket
    board: Scoreboard
    death_r: int
    user: Any  # privileges.User
    master_pid: int
    client_filter: Any = None  # sockets.ClientFilter, parsed once by the master
    handoff: Any = None  # handoff.HandoffChannel: idle kept connections, worker to worker
    generation: int = 0  # the generation forked with this setup (and its hand-off channel)
    previous: Any = None  # the channel of the generation a reload replaces: taken from too
    previous_generation: int = 0


def fork_worker(setup: WorkerSetup, slot: int, max_requests: int,
                master: MasterFds) -> Tuple[int, int, int]:
    """Fork a worker for ``slot``; (pid, output pipe, notify pipe), read ends non-blocking.
    OSError if the fork fails (nothing is left open then)."""
    out_r, out_w = os.pipe()
    note_r, note_w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        for fd in (out_r, out_w, note_r, note_w):
            os.close(fd)
        raise
    if pid == 0:  # pragma: no cover - the child never returns
        os.close(out_r)
        os.close(note_r)
        _run_child(lambda: _worker_main(setup, slot, out_w, note_w, max_requests, master))
    os.close(out_w)
    os.close(note_w)
    os.set_blocking(out_r, False)
    os.set_blocking(note_r, False)
    return pid, out_r, note_r


def _worker_main(setup: WorkerSetup, slot: int, out_w: int, note_w: int, max_requests: int,
                 master: Optional[MasterFds]) -> int:  # pragma: no cover - in the child
    """In the forked worker: clean up what belongs to the master, then serve.

    "Did the master die between fork and here?" compares the parent with the master's
    own pid, not with 1: in a container without an init the master *is* pid 1.
    """
    if master is not None:  # (a zygote-forked worker left the master in the zygote)
        leave_master(master)
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    os.close(out_w)
    devnull = os.open(os.devnull, os.O_RDONLY)
    if setup.listener.fileno() != 0:
        os.dup2(devnull, 0)
    os.close(devnull)
    worker_id = setup.board.worker_id(slot)  # its predecessor's id (the master chose it)
    json_lines, pid = setup.cfg.manager.log_format == "json", os.getpid()
    # Never blocks on the master (see outpipe.py); to a log file, without the master.
    output = outpipe.install(
        1, open_log=_log_file_opener(setup.cfg.manager.log), epoch=setup.board.log_epoch,
        tag=lambda lines: logs.worker_lines(json_lines, worker_id, pid, lines))
    logs.setup_worker(setup.cfg.manager.log_level, setup.cfg.manager.log_format)
    proctitle.set_worker(worker_id, proctitle.title_name(setup.cfg))
    limits.apply(setup.cfg.manager)  # before the drop (a hard limit needs root) and the app
    setup.user.drop()
    # After the uid change: the kernel clears the parent-death signal on it.
    procctl.set_pdeathsig(signal.SIGTERM)
    if os.getppid() != setup.master_pid:
        return 0  # the master died between fork and here
    app = setup.app
    post_fork = setup.cfg.app.post_fork
    if app is None or post_fork:
        try:
            if app is None:
                app = load_app(setup.cfg.app.module)
            if post_fork:  # before build_worker: a threaded worker starts its threads in run()
                run_post_fork(post_fork, worker_id)
        except AppImportError as exc:
            text = format_error(exc, prefix="")
            os.write(note_w, notify.encode(notify.BOOT_ERROR, text.encode("utf-8", "replace")))
            return EXIT_BOOT_ERROR
    cfg, board = setup.cfg, setup.board
    if setup.handoff is not None:  # after the drop: our uid is the generation's
        setup.handoff.gate = Gate(board, setup.generation, os.getuid(), setup.client_filter,
                                  setup.listener)
    previous = setup.previous
    if previous is not None:  # taken from, never sent on: only its old workers may
        previous.send_sock.close()
        previous.gate = Gate(board, setup.previous_generation, previous.uid,
                             setup.client_filter, setup.listener, ended=True)

    def status_page(query: str) -> tuple:
        return status_mod.render_page(status_mod.snapshot(cfg, board), query)

    slot_writer = SlotWriter(board, slot)
    output.on_lost = slot_writer.set_lost_lines
    worker = build_worker(board, slot, app=app, config=cfg, listener=setup.listener,
                          slot=slot_writer, worker_id=worker_id,
                          master_fd=setup.death_r, notify_fd=note_w, max_requests=max_requests,
                          status_page=status_page, client_filter=setup.client_filter,
                          handoff=setup.handoff, previous=previous)
    return worker.run()


def start_zygote(setup: WorkerSetup, master: MasterFds, timeout: float) -> Zygote:
    """Import the app in a child that dropped privileges for good and forks the workers
    (zygote.py): no app code ever runs in the root master, nor in a re-executed one.
    Returns at once; the master's selector hears when the import is done (or
    :meth:`Zygote.wait_ready` waits for it, at the first start)."""
    if not procctl.set_child_subreaper() and os.getpid() != 1:
        raise FcgiManagerError("preload with manager.user needs PR_SET_CHILD_SUBREAPER "
                               "(Linux) to import the app without root",
                               "set app.preload = false")

    def prepare_child() -> None:
        proctitle.set_zygote(proctitle.title_name(setup.cfg))
        leave_master(master)
        limits.apply(setup.cfg.manager)  # the workers it forks inherit them
        setup.user.drop()
        if setup.previous is not None:  # its workers only take from the old channel
            setup.previous.send_sock.close()

    def load() -> None:
        setup.app = load_app(setup.cfg.app.module)  # in the zygote, for the workers it forks

    def spawn(slot: int, out_w: int, note_w: int, max_requests: int) -> None:
        _run_child(lambda: _worker_main(setup, slot, out_w, note_w, max_requests, None))

    return Zygote.start(prepare_child, load, spawn, setup.death_r, timeout, setup.generation)


# -- the reload's check -------------------------------------------------------------------

def fork_validation(load_config: Callable[[], Config], base_modules: Iterable[str],
                    master: MasterFds) -> Tuple[int, int]:
    """Fork the process that checks a reload's config and code; (pid, its pipe's read end,
    non-blocking). The pipe stays empty if all is well."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(r)
        _run_child(lambda: _validate(load_config, frozenset(base_modules), w, master))
    os.close(w)
    os.set_blocking(r, False)
    return pid, r


def _validate(load_config: Callable[[], Config], base_modules: frozenset, w: int,
              master: MasterFds) -> int:  # pragma: no cover - runs in the child
    try:
        leave_master(master)
        # The import may leave processes behind: they get none of the master's
        # descriptors (death pipe, listener, control socket, scoreboard).
        fdutil.close_all_but([w])
        cfg = load_config()
        user = resolve_user(cfg.manager.user, cfg.manager.group)
        sockets.ClientFilter.from_config(cfg.listen.allowed_clients)
        apply_environment(cfg.app)
        prepare_import(cfg.app.path, cfg.app.chdir)
        for name in [m for m in sys.modules if m not in base_modules]:
            del sys.modules[name]
        user.drop()  # for good: no app code with uid 0
        load_app(cfg.app.module)
        return 0
    except FcgiManagerError as exc:
        text = format_error(exc, prefix="")
    except BaseException:
        text = traceback.format_exc()
    os.write(w, text.encode("utf-8", "replace")[-MAX_ERROR_TEXT:])
    return 1
