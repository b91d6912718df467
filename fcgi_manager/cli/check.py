"""``fcgi-manager check``: the "premature end of script headers" debugger.

It does what the master and a worker would do, in the foreground, and says where it
breaks: read the config; check that the bind address can be used (its directory exists
and is writable, the socket owner can be set, no other live process holds it); drop to
``manager.user`` for good (when root) and import the app, in ``app.chdir``, with
``app.env``; start one real worker on a private unix socket; send one request through the
whole FastCGI path with our own client; print the status line, headers and the start of
the body, or the traceback with a hint.
A healthy app gets no warning: the worker is stopped the way the master stops one.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any, List, Optional, Tuple

from .. import fsafe, logs, rundir, sockets, webusers
from ..config import Config
from ..errors import AppImportError, FcgiManagerError, format_error
from ..master import daemon
from ..privileges import ROOT_WARNING, apply_environment, resolve_user
from ..scoreboard import Scoreboard, SlotWriter
from ..sockets import Address, parse_address
from ..worker.appload import leave_shell_directory, load_app, prepare_import
from ..worker.loop import Worker  # at the top: imported before the drop, while root can read it
from ..worker.parts import WorkerParts
from . import client

BODY_SHOWN = 2048  # bytes of the response body printed


def _say(text: str) -> None:
    print(text, flush=True)


def run_check(cfg: Config, path: str = "/") -> int:
    _say(f"config   {cfg.source}: ok")
    try:
        # The same directory checks start makes, so check never says healthy where
        # start refuses (a world-writable directory, a runtime directory it cannot make).
        dir_notes = rundir.prepare(cfg, _log_path(cfg), create_dirs=False)
    except FcgiManagerError as exc:
        print(format_error(exc), file=sys.stderr)
        return 1
    problems, notes = bind_problems(cfg)
    if problems:
        for problem, hint in problems:
            print(f"Error: {problem}", file=sys.stderr)
            if hint:
                print(f"hint: {hint}", file=sys.stderr)
        return 1
    for note in dir_notes:
        _say(f"dir      {note}")
    for note in notes:
        _say(f"bind     {note}")
    for warning in webusers.socket_warnings(cfg):
        _say(f"warning  {warning}")
    user = resolve_user(cfg.manager.user, cfg.manager.group)
    log_errors = log_problems(cfg, user.uid)
    for error in log_errors:
        print(f"Error: {error}", file=sys.stderr)
    if log_errors:
        return 1
    _say(f"app      {cfg.app.module}  (python {sys.version.split()[0]} at {sys.executable})")
    apply_environment(cfg.app)
    try:
        # Where start imports from: app.chdir, else "/" -- the daemon's directory, and
        # the one init scripts and systemd start it in -- never the shell's.
        shell_dir = leave_shell_directory(cfg.app.chdir or "/")
        prepare_import(cfg.app.path, "")
    except OSError as exc:
        print(f"Error: app.chdir {cfg.app.chdir}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        sockets.ClientFilter.from_config(cfg.listen.allowed_clients)
    except FcgiManagerError as exc:
        print(f"Error: {exc.message}", file=sys.stderr)
        return 1
    as_user = f", as {cfg.manager.user}" if user.switching and cfg.manager.user else ""
    user.drop()  # for good, before any app code: this process never becomes root again
    if os.geteuid() == 0:
        _say(f"warning  {ROOT_WARNING}")
    try:
        app = load_app(cfg.app.module)
    except AppImportError as exc:
        print(format_error(_shell_dir_hint(exc, cfg, shell_dir)), file=sys.stderr)
        return 1
    _say(f"import   ok (cwd {os.getcwd()}{as_user})")
    return _one_request(cfg, app, user, path)


def _log_path(cfg: Config) -> str:
    """The master's log as ``start`` (a daemon) places it."""
    if cfg.manager.log:
        return cfg.manager.log
    return os.path.splitext(cfg.manager.pidfile)[0] + ".log"


def _shell_dir_hint(exc: AppImportError, cfg: Config, shell_dir: str) -> AppImportError:
    """The import failed from start's directory; say so if the shell's would have worked
    (the app was only found because of where the command was typed)."""
    top = cfg.app.module.partition(":")[0].split(".")[0]
    if cfg.app.chdir or shell_dir == os.getcwd() or not _findable(top, shell_dir):
        return exc
    hint = (f"{top!r} is found in your shell's directory {shell_dir}, but start imports "
            f"from {os.getcwd()} (app.chdir is not set): set app.chdir = \"{shell_dir}\" "
            f"or app.path = [\"{shell_dir}\"]")
    return AppImportError(exc.message, exc.traceback_text, hint)


def _findable(top: str, directory: str) -> bool:
    import importlib.machinery

    try:
        return importlib.machinery.PathFinder.find_spec(top, [directory]) is not None
    except (ImportError, OSError, ValueError):
        return False


Problem = Tuple[str, str]  # what is wrong, what to do


def log_problems(cfg: Config, app_uid: Optional[int]) -> List[str]:
    """The log files ``start`` would refuse as they are now (a planted FIFO, another
    user's file, one every user can write): the log (or the background default beside
    the pidfile) and the access log, which ``manager.user`` writes too."""
    m = cfg.manager
    found = []
    logs = [("manager.log", _log_path(cfg), ()),
            ("manager.access_log", m.access_log, (app_uid,))]
    for key, path, owners in logs:
        if path in ("", "-"):
            continue
        why = fsafe.log_file_problem(path, owners)
        if why:
            found.append(f"{key}: cannot use {path}: {why}")
    return found


def bind_problems(cfg: Config) -> Tuple[List[Problem], List[str]]:
    """Whether ``listen.bind`` can be used by a master started now: (problems, notes)."""
    address = parse_address(cfg.listen.bind)
    proof = daemon.inspect_pidfile(cfg.manager.pidfile)
    ours = proof.pid if proof.live else None
    if address.kind == "unix":
        return _unix_problems(cfg, address.path, ours)
    if address.kind == "tcp":
        return _tcp_problems(address, ours)
    return [], [f"{cfg.listen.bind}: the socket is passed in at start; nothing to check"]


def _unix_problems(cfg: Config, path: str, ours: Any) -> Tuple[List[Problem], List[str]]:
    directory = os.path.dirname(path) or "."
    li = cfg.listen
    if not os.path.isdir(directory):
        return [], []  # start creates it (rundir.prepare said so, or refused already)
    if not os.access(directory, os.W_OK | os.X_OK):
        return [(f"listen.bind {path}: this user (uid {os.geteuid()}) cannot create files in "
                 f"{directory}", "start as the directory's owner, or choose a directory "
                 "this user can write to")], []
    problems: List[Problem] = []
    if li.owner and os.geteuid() != 0:
        try:
            import pwd

            uid = pwd.getpwnam(li.owner).pw_uid if not li.owner.isdigit() else int(li.owner)
        except KeyError:
            uid = -1
        if uid != os.geteuid():
            problems.append((f"listen.owner = {li.owner!r}: only root can give the socket to "
                             "another user", "remove listen.owner and set listen.group to "
                             "the web server's group (if you are a member), or start as root"))
    if li.group and os.geteuid() != 0:
        import grp

        try:
            gid = grp.getgrnam(li.group).gr_gid if not li.group.isdigit() else int(li.group)
        except KeyError:
            gid = -1
        if gid != os.getegid() and gid not in os.getgroups():
            problems.append((f"listen.group = {li.group!r}: this user is not a member, so "
                             "it cannot give the socket to that group",
                             f"add this user to {li.group}, or start as root"))
    notes = [f"{path}: ok (directory {directory} exists and is writable)"]
    if os.path.exists(path):
        if _unix_live(path):
            if ours:
                notes = [f"{path}: served by this config's running master (pid {ours})"]
            else:
                problems.append((f"listen.bind {path}: held by another live process",
                                 "stop it, or choose another path"))
        else:
            notes.append(f"{path}: a stale socket file; it will be replaced at start")
    return problems, notes


def _unix_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except socket.timeout:
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _tcp_problems(address: Address, ours: Any) -> Tuple[List[Problem], List[str]]:
    host = address.host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    where = f"{address}"
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, address.port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            if ours:
                return [], [f"{where}: served by this config's running master (pid {ours})"]
            return [(f"listen.bind {where}: the address is in use by another process",
                     "stop it, or choose another port")], []
        if exc.errno == errno.EACCES:
            return [(f"listen.bind {where}: ports below 1024 need root",
                     "use a port of 1024 or more, or start as root")], []
        if exc.errno == errno.EADDRNOTAVAIL:
            return [(f"listen.bind {where}: {host} is not an address of this host",
                     "use 127.0.0.1, ::1 or one of this host's addresses")], []
        return [(f"listen.bind {where}: {exc.strerror or exc}", "")], []
    finally:
        probe.close()
    return [], [f"{where}: ok (free)"]


def _one_request(cfg: Config, app: Any, user: Any, request_path: str = "/") -> int:
    tmp = tempfile.mkdtemp(prefix="fcgi-manager-check-")
    path = os.path.join(tmp, "check.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    death_r, death_w = os.pipe()
    note_r, note_w = os.pipe()
    board = Scoreboard(1)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(death_w)
            os.close(note_r)
            logs.setup_worker(cfg.manager.log_level)
            worker = Worker(WorkerParts(app=app, config=cfg, listener=listener,
                                        slot=SlotWriter(board, 0), worker_id=1,
                                        master_fd=death_r, notify_fd=note_w, max_requests=0))
            code = worker.run()
        finally:
            os._exit(code)
    os.close(death_r)
    os.close(note_w)
    try:
        os.read(note_r, 16)  # wait until the worker is ready (or died)
        script = cfg.app.script_name or ""
        if not request_path.startswith("/"):
            request_path = "/" + request_path
        target = script + request_path
        params = client.build_params(target, "GET", {"User-Agent": "fcgi-manager check"},
                                     script_name=script)
        try:
            reply = client.request(Address("unix", path=path), params, timeout=cfg.workers.timeout)
        except (OSError, FcgiManagerError, Exception) as exc:  # noqa: BLE001
            print(f"Error: the worker gave no response: {exc}", file=sys.stderr)
            print("hint: the app may crash the interpreter; run it under python -X "
                  "faulthandler to see where", file=sys.stderr)
            return 1
        _say(f"request  GET {target} -> {reply.status}  ({reply.seconds * 1000:.1f} ms, "
             f"{len(reply.body)} bytes)")
        for name, value in reply.headers:
            _say(f"         {name}: {value}")
        _show_body(reply.body)
        if reply.stderr:
            _say("stderr   " + reply.stderr.decode("utf-8", "replace").rstrip())
        code = 0 if reply.status[:1] in "123" or reply.status[:3] == "404" else 1
        if code:
            print("Error: the app answered with an error (its traceback is above)",
                  file=sys.stderr)
            print("hint: common causes: a module not on app.path, relative file paths "
                  "(set app.chdir), missing environment variables (app.env), or the wrong "
                  "interpreter/virtualenv", file=sys.stderr)
        else:
            _say("healthy")
        return code
    finally:
        # Stop the worker as the master does (TERM), and only then close its pipe to us:
        # the other way round it would see "the master process is gone" and warn.
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        os.close(death_w)
        os.close(note_r)
        listener.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _show_body(body: bytes) -> None:
    if not body:
        _say("         (empty body)")
        return
    _say("")
    text = body[:BODY_SHOWN].decode("utf-8", "replace")
    for line in text.splitlines() or [""]:
        _say("         " + line)
    if len(body) > BODY_SHOWN:
        _say(f"         ... ({len(body) - BODY_SHOWN} more bytes)")
