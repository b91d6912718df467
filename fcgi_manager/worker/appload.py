"""Find and import the WSGI application named by ``app.module``.

``"pkg.module:app"`` takes an attribute, ``"pkg.module:create_app()"`` calls a factory
(with literal arguments allowed: ``create_app('production')``), and ``"pkg.module"`` alone
looks for ``application`` then ``app``, as mod_wsgi and gunicorn users expect.
"""

from __future__ import annotations

import ast
import importlib
import os
import sys
import traceback
from typing import Any, Callable, Sequence

from ..errors import AppImportError


def prepare_import(path: Sequence[str], chdir: str) -> None:
    """``app.chdir`` then ``app.path`` (and the current directory) on ``sys.path``."""
    if chdir:
        os.chdir(chdir)
    for entry in reversed(list(path)):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def leave_shell_directory(to: str = "/") -> str:
    """Work in ``to`` and drop the shell's directory from ``sys.path`` (``python -m``
    puts it first): a daemon must find the app through app.chdir and app.path, as it
    will when init or systemd starts it from ``/``. Returns the shell's directory."""
    shell_dir = os.getcwd()
    os.chdir(to)
    sys.path[:] = [p for p in sys.path if p not in ("", shell_dir)]
    return shell_dir


def _hint(exc: BaseException, module: str) -> str:
    if isinstance(exc, ModuleNotFoundError) and module.endswith(".py"):
        name = module[:-3].replace("/", ".")
        return (f"app.module names a module, not a file: drop the .py (module = "
                f"\"{name}:app\"), and put its directory in app.path")
    if isinstance(exc, ModuleNotFoundError) and exc.name and module.startswith(exc.name):
        denied = _denied_path_entry()
        if denied:
            return denied
        return (f"module {exc.name!r} is not on the path: set app.path (or app.chdir) to the "
                f"directory that holds it; sys.path[0:3] was {sys.path[:3]}")
    if isinstance(exc, ModuleNotFoundError):
        return (f"the app imports {exc.name!r}, which this interpreter ({sys.executable}) "
                "cannot find: install it there, or run fcgi-manager from the app's virtualenv")
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return ("the app opened a relative path or a file this user cannot read: set "
                "app.chdir, or check the file's permissions for manager.user")
    if isinstance(exc, KeyError):
        return "the app reads an environment variable that is not set: add it to app.env"
    return "fix the error in the app's code shown above"


def _denied_path_entry() -> str:
    """A directory of ``sys.path`` this user may not read or search: then the module may
    well be there, and the cause is permissions, not the path."""
    import pwd

    for entry in sys.path:
        if not entry or not os.path.isabs(entry) or "site-packages" in entry:
            continue
        directory = _first_denied(entry)
        if directory:
            try:
                user = pwd.getpwuid(os.geteuid()).pw_name
            except KeyError:
                user = f"uid {os.geteuid()}"
            return (f"permission denied for user {user} on {directory} (on the path as "
                    f"{entry}): the module may be there but this user cannot look; let it in "
                    f"(chmod o+rx, or chgrp to manager.group and chmod g+rx) or move the app")
    return ""


def _first_denied(entry: str) -> str:
    """The first directory from ``/`` down to ``entry`` that this user cannot enter (or,
    for ``entry`` itself, list); '' when every one is open (or ``entry`` is missing)."""
    parts = os.path.abspath(entry).split(os.sep)
    current = os.sep
    for part in [p for p in parts if p]:
        if not os.access(current, os.X_OK):
            return current
        current = os.path.join(current, part)
    try:
        os.stat(current)
    except PermissionError:
        return os.path.dirname(current)
    except OSError:
        return ""  # missing: "not on the path" is the right message
    if os.path.isdir(current) and not os.access(current, os.R_OK | os.X_OK):
        return current
    return ""


def load_app(spec: str) -> Callable[..., Any]:
    """Import and return the WSGI callable; raise AppImportError with the app's traceback."""
    module_name, _, expr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # SystemExit in an app's import is an import failure too
        raise AppImportError(
            f"cannot import the app module {module_name!r}: {type(exc).__name__}: {exc}",
            traceback.format_exc(),
            _hint(exc, module_name),
        ) from None
    if not expr:
        for name in ("application", "app"):
            if hasattr(module, name):
                expr = name
                break
        else:
            raise AppImportError(
                f"module {module_name!r} has no 'application' or 'app'",
                hint=f'name the callable: module = "{module_name}:your_app"',
            )
    try:
        app = _evaluate(module, expr)
    except AppImportError:
        raise
    except BaseException as exc:
        raise AppImportError(
            f"{spec}: calling the app factory failed: {type(exc).__name__}: {exc}",
            traceback.format_exc(),
            _hint(exc, module_name),
        ) from None
    if not callable(app):
        raise AppImportError(f"{spec} is a {type(app).__name__}, not a WSGI callable",
                             hint="point app.module at the WSGI application object")
    return app


def _evaluate(module: object, expr: str) -> object:
    try:
        node = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        raise AppImportError(f"cannot read {expr!r} after the ':'",
                             hint='write "module:app" or "module:create_app()"') from None
    if isinstance(node, ast.Name):
        return _attribute(module, node.id)
    if isinstance(node, ast.Attribute):
        return getattr(_evaluate(module, ast.unparse(node.value)), node.attr)
    if isinstance(node, ast.Call):
        try:
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
        except ValueError:
            raise AppImportError(f"the factory call {expr!r} may take literal arguments only"
                                 ) from None
        # Not callable: the TypeError is reported as the factory call's failure.
        factory: Any = _evaluate(module, ast.unparse(node.func))
        return factory(*args, **kwargs)
    raise AppImportError(f"cannot read {expr!r} after the ':'",
                         hint='write "module:app" or "module:create_app()"')


def _attribute(module: object, name: str) -> object:
    try:
        return getattr(module, name)
    except AttributeError:
        raise AppImportError(
            f"module {getattr(module, '__name__', module)!r} has no attribute {name!r}",
            hint="check the name after ':' in app.module",
        ) from None


def run_post_fork(spec: str, worker_id: int) -> None:
    """Call ``app.post_fork`` (``"module:function"``) with the worker id, in a new worker.

    Why it exists: with ``preload``, the app is imported once in the master and its
    database pools, sockets and RNG state are copied into every worker by ``fork``; two
    processes sharing one database connection corrupt each other's replies. The hook is
    where the app reopens them, once per worker, before the worker serves. Any error is
    reported the way an import error is (``start`` prints it; the master does not respawn
    in a loop).
    """
    module_name, _, func_name = spec.partition(":")
    where = f"app.post_fork {spec!r}"
    if not module_name or not func_name:
        raise AppImportError(f"{where}: write it as \"module:function\"")
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:
        raise AppImportError(f"{where}: cannot import {module_name!r}: "
                             f"{type(exc).__name__}: {exc}", traceback.format_exc(),
                             _hint(exc, module_name)) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise AppImportError(f"{where}: module {module_name!r} has no function {func_name!r}",
                             hint="check the name after ':' in app.post_fork")
    try:
        func(worker_id)
    except BaseException as exc:  # SystemExit too: the worker must not start half set up
        raise AppImportError(f"{where} raised {type(exc).__name__}: {exc} in worker "
                             f"{worker_id}", traceback.format_exc(),
                             "fix the hook: the workers cannot serve until it succeeds"
                             ) from None
