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
from typing import Any, Callable, Dict, List, Optional, Tuple

from .. import config as config_mod
from .. import run_flags
from .. import status as status_mod
from ..errors import ControlError, FcgiManagerError, format_error
from ..master import daemon, registry, resume
from ..master.lifecycle import check_not_running, log_path, serve
from ..sockets import parse_address
from ..version import __version__
from ..wire import control
from ..worker import appload
from . import progress, target

EXIT_USAGE = 2
LSB_RUNNING, LSB_DEAD_PIDFILE, LSB_NOT_RUNNING, LSB_UNKNOWN = 0, 1, 3, 4

DESCRIPTION = """\
A prefork FastCGI process manager for Python WSGI apps.

commands:
  run MODULE:APP    serve an app in the foreground (gunicorn's flags; -c optional)
  start             start the master in the background (--foreground: stay)
  stop              graceful stop (--now: within 5 s)
  restart           stop, then start
  reload            re-read the config, replace workers with fresh code
  status            show the master and its workers (--json, --watch, --all)
  scale N|+1|-1     change the number of workers
  reopen-logs       reopen the log files (logrotate)
  config            print the effective configuration as TOML
  check             validate the config and run one request through the app
  request PATH      send a FastCGI request to the running socket and print the answer

Settings come from flags > environment (FCGI_MANAGER_<SECTION>_<KEY>, WEB_CONCURRENCY)
> the config file > defaults. The environment may not weaken manager.user, manager.group,
listen.allowed_clients or app.clear_env where the file sets them, unless
--allow-env-override is given. `fcgi-manager COMMAND --help` says more, with exit statuses.

-c DIR (a directory): every DIR/*.toml is one app with its own master; run, start, stop,
restart, reload and status act on all of them, or on the app names given after the command.
"""

ALLOW_ENV_HELP = ("let FCGI_MANAGER_* variables change manager.user or manager.group, "
                  "widen listen.allowed_clients or turn off app.clear_env where the config "
                  "file sets them (a config error otherwise)")

# What each command does and how it exits, for its --help (summary, description, exits).
HELP: Dict[str, Tuple[str, str, str]] = {
    "run": (
        "serve MODULE:APP in the foreground",
        "Serve MODULE:APP in the foreground until Ctrl-C or SIGTERM: no config file needed "
        "(the quick start). With -c, the file is loaded and these flags override it. The "
        "flags are gunicorn's; each sets one config key.",
        "0 after a clean stop\n1 the app, the address or the pidfile failed\n"
        "2 usage error"),
    "start": (
        "start the master in the background",
        "Start the master in the background and return when every worker is ready, or "
        "print why it could not start (the app's traceback, a bind or permission error). "
        "Creates the missing last directory of the pidfile and sockets (/run/NAME after a "
        "reboot) when its parent is safe; warns about web-server users that cannot connect. "
        "Under socket activation (LISTEN_FDS) it serves the passed socket that is "
        "listen.bind. "
        "--foreground stays in the foreground, for Supervisor, systemd and containers.",
        "0 started, or already running\n1 failed (the reason is printed)\n2 usage error"),
    "stop": (
        "graceful stop",
        "With manager.shutdown_delay, first drain for that long: the ping path answers "
        "503 \"draining\" while requests are still served. Then stop accepting, let "
        "requests in flight finish within workers.graceful_timeout, "
        "then kill what is left; wait until the master has exited. On a terminal, shows "
        "what it waits for. Works with a broken config file (the running master's own "
        "paths are used) and with --pidfile for `run` and WSGIServer masters.",
        "0 stopped, or was not running\n1 the master could not be found or stopped"),
    "restart": (
        "stop, then start",
        "Stop the master (gracefully), then start it again with the config on disk.",
        "0 started\n1 failed (the reason is printed)\n2 usage error"),
    "reload": (
        "replace every worker with freshly imported code",
        "Re-read the config and replace every worker with one running freshly imported "
        "code, without closing the listening socket and without failing a request. A "
        "config or import error keeps the old workers serving and is printed. On a "
        "terminal, shows what it waits for.",
        "0 reloaded\n1 refused (the config or the app is broken; old workers keep "
        "serving), or not running"),
    "status": (
        "show the master and its workers",
        "Show the master and each worker with its current request. --all lists every "
        "master this user can reach. Works with a broken config file and with --pidfile.",
        "0 running\n1 dead, but the pidfile exists\n3 not running\n"
        "4 unknown: no answer, or no way to tell (these are the LSB codes)"),
    "scale": (
        "change the number of workers: N, +1, -1",
        "Change the number of workers at run time. A reload keeps the scaled count unless "
        "workers.count changed in the file, which then wins (the log says so).",
        "0 scaled\n1 refused, or not running"),
    "reopen-logs": (
        "reopen the log files",
        "Reopen the log and access log files (logrotate's postrotate; SIGUSR1 does the "
        "same).",
        "0 reopened\n1 failed, or not running"),
    "config": (
        "print the effective configuration as TOML",
        "Print every key with the value in force after defaults, the config file, the "
        "environment (FCGI_MANAGER_<SECTION>_<KEY>, WEB_CONCURRENCY) and the flags, which "
        "are those of `run`. A key not set by the file says what set it.",
        "0 printed\n1 the configuration has an error (printed)"),
    "check": (
        "validate the config, import the app, run one request",
        "Validate the config; make the directory checks start makes (and say which "
        "missing runtime directory start will create); check that the bind address can be "
        "used; name each web-server user (nginx's, Apache's, lighttpd's) that could not "
        "connect to the unix socket, with the fix; import the app as manager.user, in "
        "app.chdir (else /, as start's daemon: never the shell's directory), with app.env; "
        "pass one request through a real worker "
        "and the full FastCGI path; print the response (status, headers, the first 2 KiB "
        "of the body) or the traceback, and what to fix.",
        "0 healthy\n1 not (the reason is printed)"),
    "request": (
        "send one FastCGI request and print the response",
        "Be a FastCGI client of the running socket, with curl's habits: -d sends a body "
        "(@file, @- for stdin), -X sets the method, -H adds headers, -i prints the status "
        "and headers, --fail exits 22 on a status of 400 or more.",
        "0 got a response\n1 no response\n2 usage error\n22 --fail and a status >= 400"),
}


def _print_error(exc: FcgiManagerError) -> None:
    print(format_error(exc), file=sys.stderr)


class VersionAction(argparse.Action):
    """``--version``: the version and which request core runs, e.g. ``fcgi-manager 0.3.0
    (compiled core)``; the core is looked up only when asked (it imports it)."""

    def __init__(self, option_strings: List[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS,
                 help: str = "show the version and the request core, then exit") -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any,
                 option_string: Optional[str] = None) -> None:
        from .. import compiled

        sys.stdout.write(f"fcgi-manager {__version__} ({compiled.describe()})\n")
        parser.exit()


def _subparser(sub: Any, name: str) -> argparse.ArgumentParser:
    import textwrap

    summary, description, exits = HELP[name]
    exits = "\n".join("  " + line for line in exits.splitlines())
    p = sub.add_parser(name, help=summary, description=textwrap.fill(description, 88),
                       epilog=f"exit status:\n{exits}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", dest="config_after", default=None, metavar="CONFIG",
                   help="TOML config file (default: $FCGI_MANAGER_CONFIG)")
    p.add_argument("--allow-env-override", dest="allow_env_after", action="store_true",
                   help=ALLOW_ENV_HELP)
    p.add_argument("--version", action=VersionAction, help=argparse.SUPPRESS)
    return p


def _names_option(p: argparse.ArgumentParser, watch: bool = False) -> None:
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="with -c DIR (a pool directory): only these apps")
    if watch:
        p.add_argument("--watch", dest="pool_watch", type=float, default=None,
                       metavar="SECONDS", help="with -c DIR: look at the directory every "
                       "SECONDS and reload it when its files change")


def _pidfile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pidfile", default=None, metavar="PATH",
                   help="the master whose pidfile is PATH (a `run` or WSGIServer master "
                        "needs no config file)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fcgi-manager", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=os.environ.get("FCGI_MANAGER_CONFIG"),
                   help="TOML config file (default: $FCGI_MANAGER_CONFIG)")
    p.add_argument("--allow-env-override", action="store_true", help=ALLOW_ENV_HELP)
    p.add_argument("--version", action=VersionAction)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = _subparser(sub, "run")
    run.add_argument("app", metavar="MODULE:APP", nargs="?", default=None,
                     help="the WSGI app (optional with -c: the file's app.module)")
    _names_option(run, watch=True)
    run_flags.add_to(run)

    start = _subparser(sub, "start")
    start.add_argument("--foreground", "-f", action="store_true",
                       help="stay in the foreground (Supervisor, systemd, containers)")
    _names_option(start, watch=True)
    _pidfile_option(start)
    stop = _subparser(sub, "stop")
    stop.add_argument("--now", action="store_true", help="stop within 5 s (no shutdown_delay)")
    _names_option(stop)
    _pidfile_option(stop)
    _names_option(_subparser(sub, "restart"))
    reload = _subparser(sub, "reload")
    _names_option(reload)
    _pidfile_option(reload)
    st = _subparser(sub, "status")
    _names_option(st)
    st.add_argument("--json", action="store_true", help="one JSON object")
    st.add_argument("--watch", action="store_true",
                    help="live view (q quits); piped: one snapshot per interval")
    st.add_argument("--interval", "-n", type=float, default=1.0, metavar="SECONDS",
                    help="--watch: seconds between refreshes (default 1)")
    st.add_argument("--all", action="store_true",
                    help="every master this user can reach (name, pid, bind, workers, busy, "
                         "generation, config)")
    _pidfile_option(st)
    sc = _subparser(sub, "scale")
    sc.add_argument("value", metavar="N|+N|-N")
    _pidfile_option(sc)
    ro = _subparser(sub, "reopen-logs")
    _pidfile_option(ro)
    cf = _subparser(sub, "config")
    cf.add_argument("app", metavar="MODULE:APP", nargs="?", default=None,
                    help="as for run: sets app.module")
    run_flags.add_to(cf)
    ck = _subparser(sub, "check")
    ck.add_argument("--path", default="/", metavar="PATH",
                    help="the path of the test request (default /)")
    rq = _subparser(sub, "request")
    rq.add_argument("path", metavar="PATH")
    rq.add_argument("--request", "-X", "--method", "-m", dest="method", default=None,
                    metavar="METHOD", help="the request method (default GET, POST with -d)")
    rq.add_argument("--data", "-d", action="append", default=None, metavar="DATA",
                    help="the request body: DATA, @FILE, or @- for stdin (repeated: joined "
                         "with &)")
    rq.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'")
    rq.add_argument("--bind", "-b", default=None, help="address to send to (default: config)")
    _pidfile_option(rq)
    rq.add_argument("--include", "-i", action="store_true", help="print status and headers")
    rq.add_argument("--fail", "-f", action="store_true",
                    help="exit 22 when the status is 400 or more")
    rq.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                    help="give up when no complete response came in this long (default 30)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config_after", None):
        args.config = args.config_after
    config_mod.allow_env_override(args.allow_env_override or
                                  getattr(args, "allow_env_after", False))
    resume_config = resume.take_config_path()
    if resume_config:
        args.config = resume_config  # a reload re-executed us: same file, absolute path
    _same_directory_as_at_start()
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.config and os.path.isdir(args.config):
        from . import pools

        return pools.main(args)  # a pool directory: one master per file
    if getattr(args, "names", None) or getattr(args, "pool_watch", None) is not None or (
            args.command == "start" and args.pidfile):
        given = "app names" if getattr(args, "names", None) else "--pidfile or --watch"
        print(f"Error: {args.command}: {given} are for a pool directory (-c DIR)\nhint: "
              "with one config file, its [manager] pidfile says where the master is",
              file=sys.stderr)
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


def _same_directory_as_at_start() -> None:
    """A master re-executed by a reload may sit in ``app.chdir``: read relative paths in
    its flags and environment from the directory it was started in, as the first time."""
    if resume.resuming():
        start_dir = os.environ.get("FCGI_MANAGER_RESUME_CWD", "")
        if start_dir:
            try:
                os.chdir(start_dir)
            except OSError:
                pass
    else:
        os.environ.pop("FCGI_MANAGER_RESUME_CWD", None)


def _load(args: argparse.Namespace) -> config_mod.Config:
    if not args.config:
        raise FcgiManagerError(
            "no config file given",
            "pass -c app.toml (or set $FCGI_MANAGER_CONFIG), or use `fcgi-manager run "
            "MODULE:APP` to serve without one",
        )
    return config_mod.load(args.config)


def _load_with_flags(args: argparse.Namespace) -> config_mod.Config:
    """``run`` and ``config``: the file (if any) under the environment under the flags."""
    flags = run_flags.overrides(args)
    if args.config:
        return config_mod.load(args.config, flags)
    if not args.app and not os.environ.get("FCGI_MANAGER_APP_MODULE"):
        raise FcgiManagerError(
            "no app given", "name it: `fcgi-manager run yourapplication:app`, or pass -c "
            "app.toml")
    return config_mod.build({}, flags=flags)


def _warn_root(cfg: config_mod.Config) -> None:
    """Started as root without manager.user: the workers run as root; say so."""
    if os.geteuid() == 0 and not cfg.manager.user:
        from ..privileges import ROOT_WARNING

        print(f"warning: {ROOT_WARNING}")


def _warn_web_users(cfg: config_mod.Config) -> None:
    """The web server cannot connect to the socket: say who, and the fix (webusers)."""
    from .. import webusers

    for line in webusers.socket_warnings(cfg, running=True):
        print(f"warning: {line}")


def cmd_run(args: argparse.Namespace) -> int:
    if not args.config and not args.app and not os.environ.get("FCGI_MANAGER_APP_MODULE"):
        print("Error: no app given\nhint: name it: `fcgi-manager run yourapplication:app`, "
              "or pass -c app.toml", file=sys.stderr)
        return EXIT_USAGE  # a usage error, as --help says
    return serve(_load_with_flags(args))


def cmd_config(args: argparse.Namespace) -> int:
    from .config_toml import render

    try:
        cfg = _load_with_flags(args)
    except FcgiManagerError as exc:
        _print_error(exc)
        return 1
    sys.stdout.write(render(cfg))
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.foreground:
        return serve(cfg)
    if resume.resuming():
        appload.leave_shell_directory()  # as the first time (below)
        return serve(cfg, background=True)  # a reload re-executed the daemonized master
    running = check_not_running(cfg)
    if running:
        print(f"fcgi-manager is already running (pid {running})")
        return 0
    keep = []
    address = parse_address(cfg.listen.bind)
    if address.kind == "fd":
        keep.append(address.fd)
    elif address.kind in ("systemd", "unix", "tcp") and \
            os.environ.get("LISTEN_FDS", "").isdigit():
        keep += range(3, 3 + int(os.environ["LISTEN_FDS"]))  # sd_listen_fds(3)
    os.environ.setdefault("FCGI_MANAGER_RESUME_CWD", os.getcwd())
    is_daemon, fd = daemon.daemonize(keep)
    if is_daemon:
        # A daemon works in "/", where init scripts and systemd start it anyway: the app
        # is found through app.chdir and app.path, never through the shell's directory
        # (which `check` says when that is all that made an import work).
        appload.leave_shell_directory()
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
        _warn_root(cfg)
        _warn_web_users(cfg)
        return 0
    if ok is False:
        print(text.rstrip(), file=sys.stderr)
        return 1
    print(f"Error: the master exited before it was ready{': ' + text if text else ''}\n"
          f"hint: see the log {log_path(cfg, True)}", file=sys.stderr)
    return 1


def _master_pid(pidfile: str) -> Optional[int]:
    """The master's pid if the pidfile proves it (never a reused pid)."""
    state = daemon.inspect_pidfile(pidfile)
    return state.pid if state.live else None


def _not_running(pidfile: str) -> None:
    """No live master: clear a stale pidfile (never signalling its pid) and say so."""
    state = daemon.inspect_pidfile(pidfile)
    if state.stale:
        daemon.remove_stale_pidfile(state)
        print(f"fcgi-manager is not running (removed the stale pidfile {state.path}: "
              f"{state.reason})")
    else:
        print("fcgi-manager is not running")


def _signal_master(pid: int, sig: int, what: str) -> None:
    """Signal the master; a master of another user is an error that says whose it is."""
    try:
        os.kill(pid, sig)
    except PermissionError:
        import pwd

        try:
            uid = os.stat(f"/proc/{pid}").st_uid
            owner = pwd.getpwuid(uid).pw_name
        except (OSError, KeyError):
            owner = "another user"
        raise FcgiManagerError(
            f"cannot {what} the master (pid {pid}): it runs as {owner}, and this user "
            f"(uid {os.geteuid()}) may not signal it",
            f"run the command as {owner} (e.g. sudo fcgi-manager ... {what})") from None


def _unreachable(exc: ControlError) -> bool:
    """Whether the control socket is missing or nobody answers on it (a signal may do
    instead); any other error is said here."""
    if "not running" in exc.message or "cannot connect" in exc.message:
        return True
    print(f"Error: {exc.message}", file=sys.stderr)
    return False


def _signal_instead(exc: ControlError, pidfile: str, sig: int, what: str) -> Optional[int]:
    """The control call failed with ``exc``: send ``sig`` to the master the pidfile proves
    instead; its pid, or None once the error (or that no master runs) is said."""
    if not _unreachable(exc):
        return None
    pid = _master_pid(pidfile)
    if pid is None:
        print("Error: fcgi-manager is not running", file=sys.stderr)
        return None
    _signal_master(pid, sig, what)
    return pid


def _wait_gone(pid: int, timeout: float, waiting: Optional[Callable[[], None]] = None) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.01
    next_show = time.monotonic() + progress.POLL_INTERVAL
    while time.monotonic() < deadline:
        if not daemon.pid_alive(pid):
            return True
        if waiting is not None and time.monotonic() >= next_show:
            waiting()
            next_show = time.monotonic() + progress.POLL_INTERVAL
        time.sleep(delay)
        delay = min(0.1, delay * 2)
    return not daemon.pid_alive(pid)


def _target(args: argparse.Namespace) -> target.Target:
    """The master this command talks to (see ``target``)."""
    return target.resolve(args.config, getattr(args, "pidfile", None))


def _warn_broken(tgt: target.Target) -> None:
    """Once the master is reached: say that the config on disk is broken, and how."""
    if tgt.config_error is not None:
        print(tgt.warning(), file=sys.stderr)


def _not_found(tgt: target.Target) -> int:
    """No master reachable: with a broken config we cannot tell where one would be."""
    if tgt.config_error is not None:
        print(f"Error: no running master found for {tgt.config_path}, and its config is "
              f"invalid: {tgt.config_error.message}", file=sys.stderr)
        return 1
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    tgt = _target(args)
    pid = None
    drain = 0.0 if args.now else tgt.shutdown_delay  # what the master will wait
    try:
        # The pid to wait for (and maybe kill) is the one the kernel says answered.
        result, pid = control.call_with_peer(tgt.control, "stop", {"now": bool(args.now)})
        drain = float(result.get("drain_s", drain) or 0.0)
    except ControlError as exc:
        if not _unreachable(exc):
            return 1
        pid = _master_pid(tgt.pidfile)
        if pid is None:
            if tgt.config_error is not None:
                return _not_found(tgt)
            _not_running(tgt.pidfile)
            return 0
        _signal_master(pid, signal.SIGINT if args.now else signal.SIGTERM, "stop")
    _warn_broken(tgt)
    start = daemon.process_start_ticks(pid) if pid else None
    if pid is None or start is None:
        print("fcgi-manager stopped")
        return 0
    if drain:
        print(f"draining for {drain:.0f} s (manager.shutdown_delay: the ping path answers "
              f"503), then stopping gracefully")
        sys.stdout.flush()
    grace = 5.0 if args.now else drain + tgt.graceful_timeout + 5.0
    line = progress.Line()
    started = time.monotonic()

    def waiting() -> None:
        data = progress.snapshot(tgt.control)
        line.show(progress.stop_text(data, pid, started, 0.0 if args.now else grace - 5.0,
                                     drain))

    gone = _wait_gone(pid, grace, waiting if line.enabled else None)
    line.clear()
    if not gone:
        if not daemon.same_process(pid, start):
            print("fcgi-manager stopped")
            return 0
        if _master_pid(tgt.pidfile) != pid:
            print(f"Error: pid {pid} answered on {tgt.control} but did not stop in "
                  f"{grace:.0f} s; the pidfile {tgt.pidfile} does not name it, so it is "
                  f"not killed", file=sys.stderr)
            return 1
        print(f"fcgi-manager (pid {pid}) did not stop in {grace:.0f} s: killing it",
              file=sys.stderr)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_gone(pid, 5.0)
        daemon.remove_pidfile(tgt.pidfile, pid)
    print("fcgi-manager stopped")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    args.now = False
    args.pidfile = None
    cmd_stop(args)
    args.foreground = False
    return cmd_start(args)


def cmd_reload(args: argparse.Namespace) -> int:
    tgt = target.resolve(args.config, args.pidfile)
    error = tgt.config_error  # (with --pidfile, the master checks its own file and flags)
    if error is not None:
        print(f"Error: reload refused, the config on disk is invalid: {error.message}"
              + (f"\nhint: {error.hint}" if error.hint else "")
              + "\nthe running master and its workers are untouched", file=sys.stderr)
        return 1
    try:
        result = _reload_with_progress(tgt.control)
    except ControlError as exc:
        pid = _signal_instead(exc, tgt.pidfile, signal.SIGHUP, "reload")
        if pid is None:
            return 1
        print(f"sent SIGHUP to pid {pid} (no control socket, so the result is in the log)")
        return 0
    print(f"reloaded: generation {result.get('generation')}, {result.get('workers')} worker(s)")
    return 0


def _reload_with_progress(control_path: str) -> Dict[str, Any]:
    """The reload command; on a terminal, what it waits for is shown meanwhile."""
    line = progress.Line()
    if not line.enabled:
        return control.call(control_path, "reload", timeout=300.0)
    import threading

    before = progress.snapshot(control_path)
    old_generation = int(before.get("generation") or 0) if before else 0
    outcome: Dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["result"] = control.call(control_path, "reload", timeout=300.0)
        except ControlError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(progress.POLL_INTERVAL)
    while thread.is_alive():
        line.show(progress.reload_text(progress.snapshot(control_path), old_generation))
        thread.join(progress.POLL_INTERVAL)
    line.clear()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result", {})


def cmd_status(args: argparse.Namespace) -> int:
    if args.all:
        return _status_all(args.json)
    try:
        tgt = _target(args)
    except FcgiManagerError as exc:
        _print_error(exc)
        return LSB_UNKNOWN
    if args.watch:
        return _watch(tgt, args)
    try:
        data = control.call(tgt.control, "status", timeout=5.0)
    except ControlError as exc:
        if tgt.config_error is not None and _master_pid(tgt.pidfile) is None:
            _not_found(tgt)
            return LSB_UNKNOWN
        _warn_broken(tgt)
        return _status_without_master(tgt.pidfile, exc, args.json)
    _warn_broken(tgt)
    if args.json:
        print(status_mod.render_json(data), end="")
    else:
        print(status_mod.render_text(data), end="")
    return LSB_RUNNING


def _watch(tgt: target.Target, args: argparse.Namespace) -> int:
    """``status --watch``: curses on a terminal, snapshots when piped (see watch.py)."""
    from . import watch

    if not args.interval > 0:
        print("Error: --interval must be more than 0 seconds", file=sys.stderr)
        return EXIT_USAGE

    def fetch() -> Dict[str, Any]:
        return control.call(tgt.control, "status", timeout=5.0)

    if tgt.config_error is not None:
        if _master_pid(tgt.pidfile) is None:
            _not_found(tgt)
            return LSB_UNKNOWN
        _warn_broken(tgt)  # before the view takes the screen
    try:
        return watch.run(fetch, args.interval, args.json)
    except ControlError as exc:  # piped, and no master (any more)
        return _status_without_master(tgt.pidfile, exc, args.json)


def _status_without_master(pidfile: str, exc: ControlError, as_json: bool) -> int:
    proof = daemon.inspect_pidfile(pidfile)
    pid = proof.pid
    if proof.live:
        state, code = f"running (pid {pid}) but its control socket does not answer: " \
                      f"{exc.message}", LSB_UNKNOWN
    elif proof.stale:
        state, code = f"dead, but the pidfile {pidfile} is left ({proof.reason})", \
            LSB_DEAD_PIDFILE
    else:
        state, code = "not running", LSB_NOT_RUNNING
    if as_json:
        print(json.dumps({"running": code == LSB_RUNNING, "state": state, "pid": pid}))
    else:
        print(f"fcgi-manager is {state}")
    return code


def _status_all(as_json: bool) -> int:
    """Every master in the registry, one line each (``supervisorctl status``)."""
    rows: List[Dict[str, Any]] = []
    for entry in registry.entries():
        try:
            data: Optional[Dict[str, Any]] = control.call(entry.control, "status", timeout=2.0)
        except ControlError:
            data = None
        workers = (data or {}).get("workers") or []
        rows.append({
            "name": entry.name, "pid": entry.pid, "bind": entry.bind,
            "workers": len(workers) if data else None,
            "busy": sum(1 for w in workers if w.get("state") == "busy") if data else None,
            "generation": data.get("generation") if data else None,
            "config": entry.config or None, "pidfile": entry.pidfile,
            "control": entry.control, "answering": data is not None,
        })
    if as_json:
        print(json.dumps(rows, indent=2))
        return LSB_RUNNING if rows else LSB_NOT_RUNNING
    if not rows:
        print("no fcgi-manager master is running for this user")
        return LSB_NOT_RUNNING
    table = [("NAME", "PID", "BIND", "WORKERS", "BUSY", "GEN", "CONFIG")]
    for row in rows:
        shown = {k: "?" if row[k] is None else str(row[k])
                 for k in ("workers", "busy", "generation")}
        table.append((row["name"], str(row["pid"]), row["bind"], shown["workers"],
                      shown["busy"], shown["generation"],
                      row["config"] or f"(no file; --pidfile {row['pidfile']})"))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return LSB_RUNNING


def cmd_scale(args: argparse.Namespace) -> int:
    tgt = _target(args)
    result = control.call(tgt.control, "scale", {"value": args.value})
    _warn_broken(tgt)
    print(f"scaled from {result.get('was')} to {result.get('workers')} worker(s)")
    return 0


def cmd_reopen_logs(args: argparse.Namespace) -> int:
    tgt = _target(args)
    try:
        control.call(tgt.control, "reopen-logs")
    except ControlError as exc:
        if _signal_instead(exc, tgt.pidfile, signal.SIGUSR1, "reopen-logs") is None:
            return 1
    _warn_broken(tgt)
    print("log reopened")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .check import run_check

    cfg = _load(args)
    return run_check(cfg, args.path)


def _request_address(args: argparse.Namespace) -> Any:
    if args.bind:
        return parse_address(args.bind, "--bind")
    tgt = _target(args)
    _warn_broken(tgt)
    if tgt.config is not None:
        return parse_address(tgt.config.listen.bind)
    if tgt.entry is not None:
        return parse_address(tgt.entry.bind)
    try:
        data = control.call(tgt.control, "status", timeout=5.0)
    except ControlError as exc:
        raise FcgiManagerError(f"cannot find the master's address: {exc.message}",
                               "pass --bind ADDR") from None
    return parse_address(str((data.get("listen") or {}).get("bind", "")))


def _request_body(items: List[str]) -> bytes:
    """curl's ``-d``: ``DATA``, ``@FILE`` or ``@-`` (stdin); several are joined with ``&``."""
    parts = []
    for item in items:
        if item == "@-":
            parts.append(sys.stdin.buffer.read())
        elif item.startswith("@"):
            try:
                with open(item[1:], "rb") as f:
                    parts.append(f.read())
            except OSError as exc:
                raise FcgiManagerError(f"-d {item}: cannot read {item[1:]}: {exc.strerror}"
                                       ) from None
        else:
            parts.append(os.fsencode(item))
    return b"&".join(parts)


def cmd_request(args: argparse.Namespace) -> int:
    from . import client

    address = _request_address(args)
    if address.kind in ("fd", "systemd"):
        print(f"Error: listen.bind is {address}: the socket was passed in by the program that "
              "started fcgi-manager and has no address of its own here\n"
              "hint: pass --bind with the address that program gives it (Supervisor's "
              "socket =, the .socket unit's ListenStream=, spawn-fcgi's -s or -p)",
              file=sys.stderr)
        return EXIT_USAGE
    body = _request_body(args.data) if args.data is not None else b""
    headers = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep:
            print(f"Error: -H {item!r}: write it as 'Name: value'", file=sys.stderr)
            return EXIT_USAGE
        headers[name.strip()] = value.strip()
    if args.data is not None and not any(h.lower() == "content-type" for h in headers):
        headers["Content-Type"] = "application/x-www-form-urlencoded"  # as curl -d sends
    method = args.method or ("POST" if args.data is not None else "GET")
    params = client.build_params(args.path, method, headers, len(body))
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
    code = int(reply.status[:3]) if reply.status[:3].isdigit() else 0
    if args.fail and code >= 400:
        print(f"Error: the server answered {reply.status}", file=sys.stderr)
        return 22  # curl --fail's exit status
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
    "config": cmd_config,
    "check": cmd_check,
    "request": cmd_request,
}

if __name__ == "__main__":
    raise SystemExit(main())
