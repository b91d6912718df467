"""The command line when ``-c`` names a directory: ``run``, ``start``, ``stop``, ``reload``,
``status`` and ``restart``, on every app of the directory or on the names given.

The parent (:mod:`pooldir`) is asked which apps there are and in what state; each app's
master is asked for its own workers and does its own reload, so ``status NAME`` and
``reload NAME`` say exactly what they say for a single app.

Exit statuses: as for one app; ``status`` is 0 when every app (or every app named) runs,
3 when one does not, 4 when an app name is unknown or the parent does not answer.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional

from .. import status as status_mod
from ..errors import ControlError, FcgiManagerError, format_error
from ..master import daemon, pooldir
from ..wire import control

LSB_RUNNING, LSB_NOT_RUNNING, LSB_UNKNOWN = 0, 3, 4
POOL_COMMANDS = ("run", "start", "stop", "restart", "reload", "status")


def names_of(args: argparse.Namespace) -> List[str]:
    names = list(getattr(args, "names", None) or [])
    if args.command == "run" and getattr(args, "app", None):
        names.insert(0, args.app)  # `run DIR NAME...`: the first name took run's MODULE:APP
    return names


def main(args: argparse.Namespace) -> int:
    """Run one command on the pool directory ``args.config``."""
    if args.command not in POOL_COMMANDS:
        print(f"Error: `{args.command}` acts on one app, and {args.config} is a pool "
              f"directory\nhint: pass one of its files: -c {args.config}/NAME.toml",
              file=sys.stderr)
        return 2
    pidfile = getattr(args, "pidfile", None) or getattr(args, "set_pidfile", None) or \
        pooldir.default_pidfile(args.config)
    pool = Pool(os.path.abspath(args.config), os.path.abspath(pidfile))
    names = names_of(args)
    if args.command in ("run", "start"):
        pool.watch = float(getattr(args, "pool_watch", None) or 0.0)
        if pool.watch < 0:
            print("Error: --watch must be a number of seconds", file=sys.stderr)
            return 2
    try:
        if args.command == "run":
            flags = [k for k, v in vars(args).items()
                     if k.startswith("set_") and k != "set_pidfile" and v is not None]
            if flags:
                print("Error: the flags of `run` set one app's keys; with a pool directory, "
                      "set them in the apps' files", file=sys.stderr)
                return 2
            return pool.run(names)
        if args.command == "start":
            return pool.start(names, args.foreground)
        if args.command == "stop":
            return pool.stop(names, bool(args.now))
        if args.command == "restart":
            pool.stop(names, False)
            return pool.start(names, False)
        if args.command == "reload":
            return pool.reload(names)
        return pool.status(names, bool(args.json))
    except FcgiManagerError as exc:
        print(format_error(exc), file=sys.stderr)
        return LSB_UNKNOWN if args.command == "status" else 1


class Pool:
    """One pool directory as the command line sees it: its parent's files."""

    def __init__(self, directory: str, pidfile: str) -> None:
        self.directory = directory
        self.pidfile = pidfile
        self.control = pooldir.control_path(pidfile)
        self.answered = False  # did the parent answer the last question?
        self.watch = 0.0  # run/start --watch SECONDS

    def parent_pid(self) -> Optional[int]:
        state = daemon.inspect_pidfile(self.pidfile)
        return state.pid if state.live else None

    def call(self, command: str, args: Optional[Dict[str, Any]] = None,
             timeout: float = 10.0) -> Dict[str, Any]:
        return control.call(self.control, command, args, timeout=timeout)

    # -- run and start --------------------------------------------------------------

    def _parent(self, names: List[str]) -> pooldir.PoolParent:
        from ..master import procctl, proctitle

        parent = pooldir.PoolParent(self.directory, self.pidfile, names, self.watch)
        parent.prepare()
        proctitle._set_cmdline(f"fcgi-manager: pool ({self.directory})")
        procctl.set_name("fcgi-mgr pool")
        return parent

    def run(self, names: List[str]) -> int:
        """In the foreground, logging to stderr (systemd, Supervisor, containers)."""
        parent = self._parent(names)

        def ready(ok: bool, text: str) -> None:
            if not ok:
                print(f"Error: {text}", file=sys.stderr)

        return parent.run(ready)

    def start(self, names: List[str], foreground: bool) -> int:
        if foreground:
            return self.run(names)
        pid = self.parent_pid()
        if pid is not None:
            if not names:
                print(f"the pool {self.directory} is already running (pid {pid})")
                return 0
            try:
                self.call("start", {"names": names}, timeout=600.0)
            except ControlError as exc:
                print(f"Error: {exc.message}", file=sys.stderr)
                self._print_table(names)
                return 1
            self._print_table(names)
            return 0
        is_daemon, fd = daemon.daemonize()
        if is_daemon:  # pragma: no cover - the daemon, measured by the tests' processes
            self._daemon(fd, names)
        ok, text = daemon.wait_for_report(fd, timeout=600.0)
        if not ok:
            print((text.rstrip() or "Error: the pool's parent exited before it was ready")
                  + f"\nhint: see its log {pooldir.log_path(self.pidfile)}", file=sys.stderr)
            return 1
        print(f"fcgi-manager pool started: pid {text}, {self.directory}")
        rows = self._print_table(names)
        bad = [r for r in rows if r["state"] != "running" and (not names or r["name"] in names)]
        for r in bad:
            print(f"warning: {r['name']} is {r['state']}: {r['error'] or 'see the log'}",
                  file=sys.stderr)
        return 0

    def _daemon(self, fd: int, names: List[str]) -> None:
        from .. import fsafe

        code = 1
        try:
            log = fsafe.open_append(pooldir.log_path(self.pidfile), 0o640)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.close(log)
            parent = self._parent(names)
            code = parent.run(lambda ok, text: daemon.report(fd, ok, text))
        except FcgiManagerError as exc:
            daemon.report(fd, False, format_error(exc))
        except BaseException:  # noqa: BLE001 - whatever it is, `start` must hear it
            import traceback

            text = traceback.format_exc()
            try:
                os.write(2, text.encode("utf-8", "replace"))
            except OSError:
                pass
            daemon.report(fd, False, text)
        finally:
            os._exit(code)

    # -- stop and reload -------------------------------------------------------------

    def stop(self, names: List[str], now: bool) -> int:
        if names:
            try:
                self.call("stop", {"names": names, "now": now}, timeout=3600.0)
            except ControlError as exc:
                print(f"Error: {exc.message}", file=sys.stderr)
                return 1
            print(f"stopped: {', '.join(names)}")
            return 0
        deadline_s = 300.0
        try:
            result, pid = control.call_with_peer(self.control, "stop", {"now": now})
            deadline_s = float(result.get("deadline_s") or deadline_s) + 10.0
        except ControlError:
            pid = self.parent_pid()
            if pid is None:
                print(f"the pool {self.directory} is not running")
                return 0
            os.kill(pid, signal.SIGINT if now else signal.SIGTERM)
        if pid is None:
            print("fcgi-manager pool stopped")
            return 0
        deadline = time.monotonic() + deadline_s
        while daemon.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if daemon.pid_alive(pid):
            print(f"Error: the pool's parent (pid {pid}) did not stop within "
                  f"{deadline_s:.0f} s", file=sys.stderr)
            return 1
        print("fcgi-manager pool stopped")
        return 0

    def reload(self, names: List[str]) -> int:
        try:
            result = self.call("reload", {"names": names}, timeout=600.0)
        except ControlError as exc:
            pid = self.parent_pid()
            if pid is None or "cannot connect" not in exc.message and \
                    "not running" not in exc.message:
                print(f"Error: {exc.message if pid else 'the pool is not running'}",
                      file=sys.stderr)
                return 1
            os.kill(pid, signal.SIGHUP)
            print(f"sent SIGHUP to the pool's parent (pid {pid}); the outcome is in its log")
            return 0
        code = 0
        states = {a["name"]: a for a in result.get("apps") or []}
        for name, error in sorted((result.get("errors") or {}).items()):
            print(f"Error: {name}: {error}", file=sys.stderr)
            code = 1
        for name in result.get("started", []) + result.get("restarted", []):
            app = states.get(name) or {}
            if app.get("state") == "running":
                print(f"{name}: started (pid {app.get('pid')})")
            else:
                print(f"Error: {name}: {app.get('state')}: {app.get('error')}",
                      file=sys.stderr)
                code = 1
        for name in result.get("stopped", []):
            print(f"{name}: stopping gracefully (its file is gone)")
        for item in result.get("reload", []):
            try:
                done = control.call(item["control"], "reload", timeout=600.0)
            except ControlError as exc:
                print(f"Error: {item['name']}: {exc.message}", file=sys.stderr)
                code = 1
                continue
            print(f"{item['name']}: reloaded: generation {done.get('generation')}, "
                  f"{done.get('workers')} worker(s)")
        for name in result.get("unchanged", []):
            print(f"{name}: unchanged")
        return code

    # -- status --------------------------------------------------------------------

    def _apps(self) -> List[Dict[str, Any]]:
        """The parent's table, or (no parent) the files as stopped apps."""
        try:
            apps = list(self.call("status", timeout=5.0).get("apps") or [])
            self.answered = True
            return apps
        except ControlError:
            self.answered = False
            files, errors = pooldir.scan(self.directory)
            rows = [{"name": f.name, "state": "stopped", "pid": None, "error": None,
                     "file": f.path, "control": f.control} for f in files]
            rows += [{"name": e.name, "state": "stopped", "pid": None, "error": e.error,
                      "file": e.path, "control": None} for e in errors]
            return sorted(rows, key=lambda r: r["name"])

    def rows(self, names: List[str]) -> List[Dict[str, Any]]:
        rows = []
        for app in self._apps():
            if names and app["name"] not in names:
                continue
            row = {"name": app["name"], "state": app["state"], "pid": app.get("pid"),
                   "workers": None, "requests": None, "error": app.get("error")}
            if app["state"] in ("running", "reloading") and app.get("control"):
                try:
                    data = control.call(app["control"], "status", timeout=2.0)
                except ControlError:
                    data = {}
                workers = data.get("workers")
                if workers is not None:
                    row["workers"] = {"busy": sum(1 for w in workers
                                                  if w.get("state") == "busy"),
                                      "total": len(workers)}
                    row["requests"] = (data.get("totals") or {}).get("accepted")
            rows.append(row)
        return rows

    def _print_table(self, names: List[str]) -> List[Dict[str, Any]]:
        rows = self.rows(names)
        print(render_table(rows), end="")
        return rows

    def status(self, names: List[str], as_json: bool) -> int:
        if len(names) == 1:
            return self._status_one(names[0], as_json)
        rows = self.rows(names)
        running = self.answered
        missing = [n for n in names if n not in {r["name"] for r in rows}]
        if missing:
            print(f"Error: no app named {', '.join(missing)} in {self.directory}",
                  file=sys.stderr)
            return LSB_UNKNOWN
        if as_json:
            print(json.dumps({"apps": rows}, indent=2))
        else:
            if not running:
                print(f"the pool {self.directory} is not running")
            print(render_table(rows), end="")
        ok = running and rows and all(r["state"] == "running" for r in rows)
        return LSB_RUNNING if ok else LSB_NOT_RUNNING

    def _status_one(self, name: str, as_json: bool) -> int:
        """``status NAME``: the app's master's own full status, or why it has none."""
        rows = {r["name"]: r for r in self._apps()}
        app = rows.get(name)
        if app is None:
            print(f"Error: no app named {name} in {self.directory} (apps: "
                  f"{', '.join(sorted(rows)) or 'none'})", file=sys.stderr)
            return LSB_UNKNOWN
        data = None
        if app.get("control") and app["state"] in ("running", "reloading"):
            try:
                data = control.call(app["control"], "status", timeout=5.0)
            except ControlError:
                data = None
        if data is None:
            row = {"name": name, "state": app["state"], "pid": app.get("pid"),
                   "workers": None, "requests": None, "error": app.get("error")}
            if as_json:
                print(json.dumps({"apps": [row]}, indent=2))
            else:
                print(render_table([row]), end="")
            return LSB_NOT_RUNNING
        if as_json:
            data["pool"] = {"name": name, "state": app["state"], "error": app.get("error")}
            print(status_mod.render_json(data), end="")
        else:
            print(f"app {name}: {app['state']}"
                  + (f" ({app['error']})" if app.get("error") else ""))
            print(status_mod.render_text(data), end="")
        return LSB_RUNNING if app["state"] == "running" else LSB_NOT_RUNNING


def render_table(rows: List[Dict[str, Any]]) -> str:
    """One line per app: NAME STATE PID WORKERS (busy/total) REQUESTS, then its error."""
    table = [("NAME", "STATE", "PID", "WORKERS", "REQUESTS")]
    for r in rows:
        workers = r.get("workers")
        table.append((r["name"], r["state"], str(r.get("pid") or "-"),
                      f"{workers['busy']}/{workers['total']}" if workers else "-",
                      "-" if r.get("requests") is None else str(r["requests"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    errors = [""] + [str(r.get("error") or "") for r in rows]  # none for the heading
    for row, error in zip(table, errors):
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
        if error:
            line += f"  {error}"
        lines.append(line)
    return "\n".join(lines) + "\n"
