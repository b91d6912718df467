"""``fcgi-manager check``: the "premature end of script headers" debugger.

It does what the master and a worker would do, in the foreground, and says where it
breaks: read the config; import the app as ``manager.user``, in ``app.chdir``, with
``app.env``; start one real worker on a private unix socket; send one request through the
whole FastCGI path with our own client; print the status line and headers, or the
traceback with a hint.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any

from . import client, logs
from .appload import load_app, prepare_import
from .config import Config
from .errors import AppImportError, FcgiManagerError
from .privileges import apply_environment, resolve_user
from .scoreboard import Scoreboard, SlotWriter
from .sockets import Address


def _say(text: str) -> None:
    print(text, flush=True)


def run_check(cfg: Config) -> int:
    _say(f"config   {cfg.source}: ok")
    _say(f"app      {cfg.app.module}  (python {sys.version.split()[0]} at {sys.executable})")
    user = resolve_user(cfg.manager.user, cfg.manager.group)
    apply_environment(cfg.app)
    try:
        prepare_import(cfg.app.path, cfg.app.chdir)
    except OSError as exc:
        print(f"Error: app.chdir {cfg.app.chdir}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        with user.effective():
            app = load_app(cfg.app.module)
    except AppImportError as exc:
        if exc.traceback_text:
            print(exc.traceback_text.rstrip(), file=sys.stderr)
        print(f"Error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 1
    _say(f"import   ok (cwd {os.getcwd()}{', as ' + cfg.manager.user if user.switching else ''})")
    return _one_request(cfg, app, user)


def _one_request(cfg: Config, app: Any, user: Any) -> int:
    from .worker import Worker

    tmp = tempfile.mkdtemp(prefix="fcgi-manager-check-")
    path = os.path.join(tmp, "check.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    if user.switching and user.uid is not None:
        os.chown(tmp, user.uid, user.gid if user.gid is not None else -1)
        os.chown(path, user.uid, user.gid if user.gid is not None else -1)
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
            user.drop()
            worker = Worker(app=app, config=cfg, listener=listener, slot=SlotWriter(board, 0),
                            worker_id=1, master_fd=death_r, notify_fd=note_w, max_requests=0)
            code = worker.run()
        finally:
            os._exit(code)
    os.close(death_r)
    os.close(note_w)
    try:
        os.read(note_r, 16)  # wait until the worker is ready (or died)
        script = cfg.app.script_name or ""
        target = (script or "") + "/"
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
        os.close(death_w)
        os.close(note_r)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        listener.close()
        shutil.rmtree(tmp, ignore_errors=True)
