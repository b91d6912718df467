"""The ``fcgi-manager`` command: parse arguments, run one command, exit with its status.

Only this module prints to the user and exits the process. Errors read
``Error: <what>`` with a ``hint:`` line where there is something to do about it; no
Python traceback is shown unless it is the app's own.

Exit statuses: 0 success; 1 failure (``start``, ``reload``, ``check``, ...); 2 usage
errors; ``status`` follows LSB (0 running, 1 dead but pidfile exists, 3 not running,
4 unknown).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from . import __version__, control, daemon
from . import config as config_mod
from . import status as status_mod
from .errors import AppImportError, ControlError, FcgiManagerError
from .sockets import parse_address

EXIT_USAGE = 2
LSB_RUNNING, LSB_DEAD_PIDFILE, LSB_NOT_RUNNING, LSB_UNKNOWN = 0, 1, 3, 4

DESCRIPTION = """\
A prefork FastCGI process manager for Python WSGI apps.

commands:
  run MODULE:APP    serve an app in the foreground, no config file needed
  start             start the master in the background (--foreground: stay)
  stop              graceful stop (--now: within 5 s)
  restart           stop, then start
  reload            re-read the config, replace workers with fresh code
  status            show the master and its workers (--json, --watch)
  scale N|+1|-1     change the number of workers
  reopen-logs       reopen the log file (logrotate)
  check             validate the config and run one request through the app
  request PATH      send a FastCGI request to the running socket and print the answer
"""


def _error(exc: FcgiManagerError) -> str:
    text = ""
    if isinstance(exc, AppImportError) and exc.traceback_text:
        text += exc.traceback_text.rstrip() + "\n"
    text += f"Error: {exc.message}"
    if exc.hint:
        text += f"\nhint: {exc.hint}"
    return text


def _print_error(exc: FcgiManagerError) -> None:
    print(_error(exc), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fcgi-manager", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=os.environ.get("FCGI_MANAGER_CONFIG"),
                   help="TOML config file (default: $FCGI_MANAGER_CONFIG)")
    p.add_argument("--version", action="version", version=f"fcgi-manager {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="serve MODULE:APP in the foreground")
    run.add_argument("app", metavar="MODULE:APP")
    run.add_argument("--bind", "-b", default="127.0.0.1:9000",
                     help="unix:/path, HOST:PORT, [::1]:PORT, fd:0 (default 127.0.0.1:9000)")
    run.add_argument("--workers", "-w", type=int, default=None,
                     help="number of workers (default: number of CPUs)")
    run.add_argument("--chdir", default=None, help="directory to import the app from")
    run.add_argument("--log-level", default="info")

    start = sub.add_parser("start", help="start the master")
    start.add_argument("--foreground", "-f", action="store_true",
                       help="stay in the foreground (Supervisor, systemd, containers)")
    stop = sub.add_parser("stop", help="graceful stop")
    stop.add_argument("--now", action="store_true", help="stop within 5 s")
    sub.add_parser("restart", help="stop, then start")
    sub.add_parser("reload", help="replace every worker with freshly imported code")
    st = sub.add_parser("status", help="show the master and its workers")
    st.add_argument("--json", action="store_true", help="one JSON object")
    st.add_argument("--watch", action="store_true", help="refresh every second, like top")
    sc = sub.add_parser("scale", help="change the number of workers: N, +1, -1")
    sc.add_argument("value", metavar="N|+N|-N")
    sub.add_parser("reopen-logs", help="reopen the log file")
    sub.add_parser("check", help="validate config, import the app, run one request")
    rq = sub.add_parser("request", help="send one FastCGI request and print the response")
    rq.add_argument("path", metavar="PATH")
    rq.add_argument("--method", "-X", "-m", default=None)
    rq.add_argument("--data", "-d", default=None, metavar="FILE",
                    help="body from FILE ('-' = stdin)")
    rq.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'")
    rq.add_argument("--bind", "-b", default=None, help="address to send to (default: config)")
    rq.add_argument("--include", "-i", action="store_true", help="print status and headers")
    rq.add_argument("--timeout", type=float, default=30.0)
    # Every command also accepts -c after its name, and --version.
    for sp in sub.choices.values():
        if sp is not run:
            sp.add_argument("-c", "--config", dest="config_after", default=None,
                            help=argparse.SUPPRESS)
        sp.add_argument("--version", action="version", version=f"fcgi-manager {__version__}",
                        help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config_after", None):
        args.config = args.config_after
    resume_config = os.environ.pop("FCGI_MANAGER_RESUME_CONFIG", "")
    if resume_config and os.environ.get("FCGI_MANAGER_RESUME"):
        args.config = resume_config  # a reload re-executed us: same file, absolute path
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] = COMMANDS[args.command]
    try:
        return handler(args)
    except FcgiManagerError as exc:
        _print_error(exc)
        return LSB_UNKNOWN if args.command == "status" else 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"Error: {exc.strerror or exc}{where}", file=sys.stderr)
        return LSB_UNKNOWN if args.command == "status" else 1


def _load(args: argparse.Namespace) -> config_mod.Config:
    if not args.config:
        raise FcgiManagerError(
            "no config file given",
            "pass -c app.toml (or set $FCGI_MANAGER_CONFIG), or use `fcgi-manager run "
            "MODULE:APP` to serve without one",
        )
    return config_mod.load(args.config)


def _log_path(cfg: config_mod.Config, background: bool) -> str:
    if cfg.manager.log:
        return cfg.manager.log
    if background:
        return os.path.splitext(cfg.manager.pidfile)[0] + ".log"
    return "-"


def _check_not_running(cfg: config_mod.Config) -> Optional[int]:
    """The pid of a live master for this config, after clearing a stale pidfile."""
    pid = daemon.read_pidfile(cfg.manager.pidfile)
    if pid is None:
        return None
    if daemon.pid_alive(pid) and daemon.is_our_master(pid) and pid != os.getpid():
        return pid
    try:
        os.unlink(cfg.manager.pidfile)  # stale: its master is gone
    except OSError:
        pass
    return None


# -- serving ------------------------------------------------------------------------------

def serve(cfg: config_mod.Config, app: Any = None, background: bool = False,
          report_fd: int = -1) -> int:
    """Run a master in this process until it stops (foreground, or as the daemon)."""
    from . import logs
    from .master import RESUME_ENV, Master

    resuming = bool(os.environ.get(RESUME_ENV))
    if not resuming:
        running = _check_not_running(cfg)
        if running:
            raise FcgiManagerError(f"already running (pid {running}, pidfile "
                                   f"{cfg.manager.pidfile})", "stop it first, or use reload")
    log_path = _log_path(cfg, background)
    handler = logs.setup_master(log_path, cfg.manager.log_level)
    master = Master(cfg, app, handler)
    if report_fd >= 0:
        master.child_close_fds.append(report_fd)
    pidfile = cfg.manager.pidfile
    try:
        master.prepare()
    except FcgiManagerError as exc:
        if report_fd >= 0:
            daemon.report(report_fd, False, _error(exc))
        master.abandon()
        raise

    def ready(ok: bool, text: str) -> None:
        if ok:
            try:
                daemon.write_pidfile(pidfile, os.getpid())
            except OSError as exc:
                text = f"cannot write the pidfile {pidfile}: {exc.strerror}"
                ok = False
                master.stop(now=True)
                master.exit_code = 1
        if report_fd >= 0:
            daemon.report(report_fd, ok, text)
        if ok:
            master_log_ready(master)
        elif report_fd < 0:
            print(text.rstrip() + "\nError: the app could not start", file=sys.stderr)

    try:
        code = master.run(ready)
    finally:
        daemon.remove_pidfile(pidfile, os.getpid())
    return code


def master_log_ready(master: Any) -> None:
    import logging

    logging.getLogger("fcgi_manager.master").info(
        "ready: %d worker(s) serving %s", len(master.workers), master.address)


def cmd_run(args: argparse.Namespace) -> int:
    options: Dict[str, Any] = {"bind": args.bind, "log_level": args.log_level}
    if args.workers is not None:
        options["count"] = args.workers
    if args.chdir:
        options["chdir"] = os.path.abspath(args.chdir)
    cfg = config_mod.from_options(args.app, **options)
    return serve(cfg)


def cmd_start(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.foreground:
        return serve(cfg)
    if os.environ.get("FCGI_MANAGER_RESUME"):
        return serve(cfg, background=True)  # a reload re-executed the daemonized master
    running = _check_not_running(cfg)
    if running:
        print(f"fcgi-manager is already running (pid {running})")
        return 0
    keep = []
    address = parse_address(cfg.listen.bind)
    if address.kind == "fd":
        keep.append(address.fd)
    is_daemon, fd = daemon.daemonize(keep)
    if is_daemon:
        code = 1
        pipe = os.fstat(fd).st_ino
        try:
            code = serve(cfg, background=True, report_fd=fd)
        except FcgiManagerError:
            code = 1
        except BaseException:
            import logging
            import traceback

            text = traceback.format_exc()
            logging.getLogger("fcgi_manager.master").critical("the master crashed:\n%s", text)
            try:  # once ready, the handshake pipe is closed and its number maybe reused
                still_ours = os.fstat(fd).st_ino == pipe
            except OSError:
                still_ours = False
            if still_ours:
                daemon.report(fd, False, text)
        finally:
            os._exit(code)
    ok, text = daemon.wait_for_report(fd, timeout=300.0)
    if ok:
        n = cfg.workers.effective_count if cfg.workers.mode != "ondemand" else 0
        print(f"fcgi-manager started: pid {text}, {n} worker(s) on {cfg.listen.bind}")
        return 0
    if ok is False:
        print(text.rstrip(), file=sys.stderr)
        return 1
    log_path = _log_path(cfg, True)
    print(f"Error: the master exited before it was ready{': ' + text if text else ''}\n"
          f"hint: see the log {log_path}", file=sys.stderr)
    return 1


def _master_pid(cfg: config_mod.Config) -> Optional[int]:
    pid = daemon.read_pidfile(cfg.manager.pidfile)
    if pid is not None and daemon.pid_alive(pid):
        return pid
    return None


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        if not daemon.pid_alive(pid):
            return True
        time.sleep(delay)
        delay = min(0.1, delay * 2)
    return not daemon.pid_alive(pid)


def cmd_stop(args: argparse.Namespace) -> int:
    cfg = _load(args)
    pid = None
    drain = 0.0 if args.now else cfg.manager.shutdown_delay  # what the master will wait
    try:
        result = control.call(cfg.manager.control, "stop", {"now": bool(args.now)})
        pid = int(result.get("pid") or 0) or None
        drain = float(result.get("drain_s", drain) or 0.0)
    except ControlError:
        pid = _master_pid(cfg)
        if pid is None:
            _check_not_running(cfg)  # clears a stale pidfile
            print("fcgi-manager is not running")
            return 0
        os.kill(pid, signal.SIGINT if args.now else signal.SIGTERM)
    if pid is None:
        pid = _master_pid(cfg)
    if pid is None:
        print("fcgi-manager stopped")
        return 0
    if drain:
        print(f"draining for {drain:.0f} s (manager.shutdown_delay: the ping path answers "
              f"503), then stopping gracefully")
        sys.stdout.flush()
    grace = 5.0 if args.now else drain + cfg.workers.graceful_timeout + 5.0
    if not _wait_gone(pid, grace):
        print(f"fcgi-manager (pid {pid}) did not stop in {grace:.0f} s: killing it",
              file=sys.stderr)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_gone(pid, 5.0)
        daemon.remove_pidfile(cfg.manager.pidfile, pid)
    print("fcgi-manager stopped")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    args.now = False
    cmd_stop(args)
    args.foreground = False
    return cmd_start(args)


def cmd_reload(args: argparse.Namespace) -> int:
    cfg = _load(args)
    try:
        result = control.call(cfg.manager.control, "reload", timeout=300.0)
    except ControlError as exc:
        if "not running" not in exc.message and "cannot connect" not in exc.message:
            print(f"Error: {exc.message}", file=sys.stderr)
            return 1
        pid = _master_pid(cfg)
        if pid is None:
            print("Error: fcgi-manager is not running", file=sys.stderr)
            return 1
        os.kill(pid, signal.SIGHUP)
        print(f"sent SIGHUP to pid {pid} (no control socket, so the result is in the log)")
        return 0
    print(f"reloaded: generation {result.get('generation')}, {result.get('workers')} worker(s)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args)
    except FcgiManagerError as exc:
        _print_error(exc)
        return LSB_UNKNOWN
    while True:
        try:
            data = control.call(cfg.manager.control, "status", timeout=5.0)
        except ControlError as exc:
            return _status_without_master(cfg, exc, args.json)
        if args.json:
            print(status_mod.render_json(data), end="")
        elif args.watch:
            sys.stdout.write("\033[H\033[2J" + status_mod.render_text(data))
            sys.stdout.flush()
        else:
            print(status_mod.render_text(data), end="")
        if not args.watch:
            return LSB_RUNNING
        time.sleep(1.0)


def _status_without_master(cfg: config_mod.Config, exc: ControlError, as_json: bool) -> int:
    pid = daemon.read_pidfile(cfg.manager.pidfile)
    if pid is None:
        state, code = "not running", LSB_NOT_RUNNING
    elif daemon.pid_alive(pid):
        state, code = f"running (pid {pid}) but its control socket does not answer: " \
                      f"{exc.message}", LSB_UNKNOWN
    else:
        state, code = f"dead, but the pidfile {cfg.manager.pidfile} says pid {pid}", \
            LSB_DEAD_PIDFILE
    if as_json:
        print(json.dumps({"running": code == LSB_RUNNING, "state": state, "pid": pid}))
    else:
        print(f"fcgi-manager is {state}")
    return code


def cmd_scale(args: argparse.Namespace) -> int:
    cfg = _load(args)
    result = control.call(cfg.manager.control, "scale", {"value": args.value})
    print(f"scaled from {result.get('was')} to {result.get('workers')} worker(s)")
    return 0


def cmd_reopen_logs(args: argparse.Namespace) -> int:
    cfg = _load(args)
    try:
        control.call(cfg.manager.control, "reopen-logs")
    except ControlError as exc:
        if "not running" not in exc.message and "cannot connect" not in exc.message:
            print(f"Error: {exc.message}", file=sys.stderr)
            return 1
        pid = _master_pid(cfg)
        if pid is None:
            print("Error: fcgi-manager is not running", file=sys.stderr)
            return 1
        os.kill(pid, signal.SIGUSR1)
    print("log reopened")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .check import run_check

    cfg = _load(args)
    return run_check(cfg)


def cmd_request(args: argparse.Namespace) -> int:
    from . import client

    if args.bind:
        address = parse_address(args.bind, "--bind")
        script_name = ""
    else:
        cfg = _load(args)
        address = parse_address(cfg.listen.bind)
        script_name = ""
    body = b""
    if args.data is not None:
        if args.data == "-":
            body = sys.stdin.buffer.read()
        else:
            try:
                with open(args.data, "rb") as f:
                    body = f.read()
            except OSError as exc:
                print(f"Error: cannot read --data {args.data}: {exc.strerror}", file=sys.stderr)
                return 1
    headers = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep:
            print(f"Error: -H {item!r}: write it as 'Name: value'", file=sys.stderr)
            return EXIT_USAGE
        headers[name.strip()] = value.strip()
    method = args.method or ("POST" if args.data is not None else "GET")
    params = client.build_params(args.path, method, headers, len(body), script_name=script_name)
    try:
        reply = client.request(address, params, body, timeout=args.timeout)
    except (OSError, Exception) as exc:  # noqa: BLE001 - any failure is "no response"
        print(f"Error: no response from {address}: {exc}", file=sys.stderr)
        return 1
    if args.include or sys.stdout.isatty():
        print(f"Status: {reply.status}")
        for name, value in reply.headers:
            print(f"{name}: {value}")
        print()
    sys.stdout.flush()
    sys.stdout.buffer.write(reply.body)
    sys.stdout.flush()
    if reply.stderr:
        sys.stderr.write(reply.stderr.decode("utf-8", "replace"))
    return 0


COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "start": cmd_start,
    "stop": cmd_stop,
    "restart": cmd_restart,
    "reload": cmd_reload,
    "status": cmd_status,
    "scale": cmd_scale,
    "reopen-logs": cmd_reopen_logs,
    "check": cmd_check,
    "request": cmd_request,
}

if __name__ == "__main__":
    raise SystemExit(main())
