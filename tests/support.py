"""Shared helpers for tests that drive real processes: fcgi-manager and nginx.

Rules every helper follows, so a failing test never leaves anything behind:

* only loopback addresses and unix sockets in the test's temporary directory;
* every process started is recorded by PID (with its start time, against PID reuse) and
  killed by PID at cleanup if it is still there; nothing is ever killed by name;
* no fixed sleeps: :func:`wait_for` polls a condition against a deadline.

A test that drives a system program declares it up front, ``@pytest.mark.needs("nginx")``
(``conftest.py`` resolves the marker before any fixture runs): a missing program skips the
test, but fails it in CI (``CI=true``), where every program the suite drives is installed on
purpose. ``require_program`` stays in the helpers as a safety net, and fails a test that
calls for a program it did not declare.
"""

from __future__ import annotations

import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple

import psutil
import pytest

TESTS = Path(__file__).resolve().parent
APPS = TESTS / "apps"
ROOT = TESTS.parent
FASTCGI_PARAMS = Path("/etc/nginx/fastcgi_params")

# Time limits: generous enough for a loaded CI machine, small enough to fail fast.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def skip_or_fail(reason: str) -> None:
    """Skip when run by hand on a machine that lacks what the test needs; fail with
    CI=true, where the machine is known to have it (CI can never go green by skipping)."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the CI machine must provide it)")
    pytest.skip(reason)  # by hand only: CI failed above


def need_root(why: str = "needs root") -> None:
    """Skip a test that needs root when run by hand as another user; CI runs as root, so
    there it fails instead (CI can never go green by skipping)."""
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail(f"CI runs as root: this test must run ({why})")
        pytest.skip(why)  # by hand only: CI failed above


# The programs the suite can drive, and what each turns on: the README's test section and
# the hidden-programs step of .ci/run list the same.
PROGRAMS = {
    "nginx": "the nginx front-end, keep-conn and capacity tests",
    "lighttpd": "the lighttpd front-end tests",
    "apache2": "the Apache (mod_fcgid, mod_proxy_fcgi) front-end tests",
    "cgi-fcgi": "requests sent by libfcgi's own client (libfcgi-bin)",
    "spawn-fcgi": "the spawn-fcgi example",
    "wrk": "the load tests of tests/capacity",
    "strace": "the system-call counts of test_syscalls.py",
    "supervisord": "the Supervisor example (supervisord, from the test extra)",
    "supervisorctl": "the Supervisor example (supervisorctl, from the test extra)",
    "unshare": "fcgi-manager as PID 1 of a PID namespace (tests/containers)",
    "nsenter": "commands run inside that namespace (tests/containers)",
    "setpriv": "the container image's unprivileged user (tests/containers)",
    "systemd-socket-activate": "the shipped systemd units under socket activation (systemd)",
    "setfacl": "listen.acl_users/acl_groups on a real socket (acl)",
    "getfacl": "reading back the socket's ACL (acl)",
}

# Programs to treat as missing (comma-separated names): a bare machine, without
# uninstalling anything. Hiding the programs themselves (a mount namespace) is stronger.
HIDE_VARIABLE = "FCGI_MANAGER_TEST_HIDE"

# The programs the running test declared (``needs`` markers); set by conftest.py around
# each test, None outside a test.
declared: Optional[FrozenSet[str]] = None


def hidden_programs() -> FrozenSet[str]:
    return frozenset(n.strip() for n in os.environ.get(HIDE_VARIABLE, "").split(",") if n.strip())


def find_program(name: str) -> Optional[str]:
    """The path of the executable ``name`` (``PATH``, then the sbin directories), or None."""
    if name in hidden_programs():
        return None
    path = shutil.which(name)
    if path is None:
        for d in ("/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/local/bin"):
            candidate = os.path.join(d, name)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    return path


def require_program(name: str) -> str:
    """The path of ``name``, for a helper. The test must have declared the program with a
    ``needs`` marker (so it is skipped before it starts anything); this is the safety net:
    skip if it is missing (fail instead in CI), and fail a test that did not declare it."""
    if declared is not None and name not in declared:
        pytest.fail(f"this test drives {name} without declaring it: "
                    f"mark it @pytest.mark.needs({name!r})")
    path = find_program(name)
    if path is None:
        reason = f"{name} is not installed"
        if in_ci():
            pytest.fail(f"{reason} (CI=true: the CI job must install it)")
        pytest.skip(reason)  # by hand only: in CI it failed above
    return path


def ended_early(node: Any) -> bool:
    """True once the test ``node`` was skipped or failed (in its setup or its body): what
    it started is then stopped without being reported as a leak."""
    return bool(getattr(node, "fcgi_ended_early", False))


class GiveUp(AssertionError):
    """Raised by a :func:`wait_for` predicate when waiting longer cannot help."""


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "a condition",
             interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Exceptions from ``predicate`` count as "not yet" (the last one is shown on timeout),
    except :class:`GiveUp`, which ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    last_exc: Optional[BaseException] = None
    delay = min(interval, 0.01)
    while True:
        try:
            value = predicate()
            if value:
                return value
            last_exc = None
        except GiveUp:
            raise
        except Exception as exc:  # noqa: BLE001 - "not yet"
            last_exc = exc
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_exc!r})" if last_exc is not None else ""
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}{extra}")
        time.sleep(delay)
        delay = min(interval, delay * 2)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (loopback only)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ProcessTracker:
    """PIDs (with their start times) of every process a test started, killed at the end."""

    def __init__(self) -> None:
        self.procs: Dict[int, float] = {}

    def add(self, pid: Optional[int]) -> None:
        if not pid or pid in self.procs:
            return
        try:
            self.procs[pid] = psutil.Process(pid).create_time()
        except psutil.Error:
            pass

    def add_all(self, pids: Iterable[int]) -> None:
        for pid in pids:
            self.add(pid)

    def _same(self, pid: int) -> Optional[psutil.Process]:
        try:
            proc = psutil.Process(pid)
            if proc.create_time() != self.procs[pid] or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    def alive(self) -> List[int]:
        return [pid for pid in self.procs if self._same(pid) is not None]

    def kill_all(self) -> List[int]:
        """SIGKILL every recorded process still running; return their PIDs."""
        killed = []
        for pid in list(self.procs):
            proc = self._same(pid)
            if proc is None:
                continue
            try:
                proc.kill()
                killed.append(pid)
            except psutil.Error:
                pass
        for pid in killed:
            try:
                psutil.Process(pid).wait(5)
            except psutil.TimeoutExpired:
                pass
            except psutil.Error:
                pass
        return killed


def _child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("FCGI_MANAGER_CONFIG", None)
    env.pop("FCGI_MANAGER_RESUME", None)
    env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_PID", None)
    # Tests rewrite app modules between reloads: stale bytecode must never hide a change.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    pythonpath = [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    if extra:
        env.update(extra)
    return env


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def render_toml(sections: Dict[str, Dict[str, Any]]) -> str:
    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        for key, value in values.items():
            out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


class CLIResult:
    """What one ``fcgi-manager`` command did."""

    def __init__(self, args: List[str], proc: subprocess.CompletedProcess, seconds: float):
        self.args = args
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.seconds = seconds

    def __repr__(self) -> str:
        return (f"<fcgi-manager {' '.join(self.args)}: exit {self.returncode} in "
                f"{self.seconds:.2f} s\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}>")


def fcgi_manager(args: List[str], *, cwd: Optional[Path] = None, timeout: float = 60.0,
                 env: Optional[Dict[str, str]] = None, input: Optional[bytes] = None,
                 tracker: Optional[ProcessTracker] = None) -> CLIResult:
    """Run ``python -m fcgi_manager ARGS`` and wait for it (its daemon is not waited for)."""
    cmd = [sys.executable, "-m", "fcgi_manager", *args]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=str(cwd) if cwd else None, env=_child_env(env),
                            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if tracker is not None:
        tracker.add(proc.pid)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"fcgi-manager {' '.join(args)} did not finish in {timeout} s:"
                             f"\n{out.decode(errors='replace')}\n{err.decode(errors='replace')}"
                             ) from None
    done = subprocess.CompletedProcess(cmd, proc.returncode, out.decode("utf-8", "replace"),
                                       err.decode("utf-8", "replace"))
    return CLIResult(args, done, time.monotonic() - started)


class Manager:
    """One fcgi-manager instance for a test: its config, its CLI, and its cleanup.

    ``module`` is ``app.module``; ``sections`` (``app={...}``, ``workers={...}``, ...) are
    merged over the defaults below (a unix socket, pidfile and log in
    ``tmp``, ``count`` workers, the apps in ``tests/apps`` on the path). Pass ``bind`` as
    ``"unix"`` (default), ``"tcp"``, ``"tcp6"`` or an explicit address.
    """

    def __init__(self, tmp: Path, module: str = "combo:app", *, count: int = 2,
                 bind: str = "unix", name: str = "app", path: Optional[List[str]] = None,
                 **sections: Dict[str, Any]) -> None:
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.config = self.tmp / f"{name}.toml"
        self.pidfile = self.tmp / f"{name}.pid"
        self.control = self.tmp / f"{name}.ctl"
        self.log = self.tmp / f"{name}.log"
        self.socket_path: Optional[Path] = None
        if bind == "unix":
            self.socket_path = self.tmp / f"{name}.sock"
            self.bind = f"unix:{self.socket_path}"
        elif bind == "tcp":
            self.port = free_port()
            self.bind = f"127.0.0.1:{self.port}"
        elif bind == "tcp6":
            self.port = free_port("::1")
            self.bind = f"[::1]:{self.port}"
        else:
            self.bind = bind
            if bind.startswith("unix:"):
                self.socket_path = Path(bind[5:])
        self.tracker = ProcessTracker()
        self.sections: Dict[str, Dict[str, Any]] = {
            "app": {"module": module, "path": path if path is not None else [str(APPS)]},
            "listen": {"bind": self.bind},
            "workers": {"count": count, "graceful_timeout": 10},
            "manager": {"pidfile": str(self.pidfile), "control": str(self.control),
                        "log": str(self.log)},
        }
        for section, values in sections.items():
            self.sections.setdefault(section, {}).update(values)
        self.write_config()

    # -- config ---------------------------------------------------------------------

    def write_config(self, text: Optional[str] = None) -> None:
        self.config.write_text(text if text is not None else render_toml(self.sections))

    def update(self, section: str, **values: Any) -> None:
        """Change keys in the config file (the running master sees them on reload)."""
        self.sections.setdefault(section, {}).update(values)
        self.write_config()

    # -- the CLI --------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 60.0, input: Optional[bytes] = None,
            env: Optional[Dict[str, str]] = None) -> CLIResult:
        return fcgi_manager(["-c", str(self.config), *args], cwd=self.tmp, timeout=timeout,
                            env=env, input=input, tracker=self.tracker)

    def start(self, check: bool = True) -> CLIResult:
        result = self.cli("start", timeout=START_TIMEOUT + 30)
        if check:
            assert result.returncode == 0, result
            self.record()
        else:
            pid = self.read_pidfile()
            if pid:
                self.tracker.add(pid)
        return result

    def stop(self, now: bool = False, check: bool = True) -> CLIResult:
        self.record_quietly()
        result = self.cli("stop", *(["--now"] if now else []), timeout=STOP_TIMEOUT + 40)
        if check:
            assert result.returncode == 0, result
        return result

    def status(self) -> Dict[str, Any]:
        result = self.cli("status", "--json", timeout=20)
        assert result.returncode == 0, result
        data = json.loads(result.stdout)
        self._track(data)
        return data

    def status_code(self) -> int:
        return self.cli("status", "--json", timeout=20).returncode

    def _track(self, data: Dict[str, Any]) -> None:
        self.tracker.add(data.get("pid"))
        self.tracker.add_all(w["pid"] for w in data.get("workers", ()))

    def record(self) -> Dict[str, Any]:
        """Read status and remember every PID in it (for the last-resort cleanup)."""
        return self.status()

    def record_quietly(self) -> None:
        try:
            result = self.cli("status", "--json", timeout=20)
            if result.returncode == 0:
                self._track(json.loads(result.stdout))
        except (AssertionError, ValueError):
            pass

    def pid(self) -> int:
        return int(self.status()["pid"])

    def worker_pids(self, data: Optional[Dict[str, Any]] = None) -> List[int]:
        data = data or self.status()
        return sorted(w["pid"] for w in data["workers"])

    def read_pidfile(self) -> Optional[int]:
        try:
            return int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def request(self, path: str, *args: str, timeout: float = 30.0) -> CLIResult:
        return self.cli("request", path, *args, timeout=timeout)

    def wait_workers(self, n: int, timeout: float = 15.0, state: str = "idle",
                     generation: Optional[int] = None) -> Dict[str, Any]:
        """Wait until ``n`` workers are in ``state`` (and of ``generation``), no others."""
        def ready() -> Optional[Dict[str, Any]]:
            data = self.status()
            ws = data["workers"]
            if len(ws) != n or any(w["state"] != state for w in ws):
                return None
            if generation is not None and any(w["generation"] != generation for w in ws):
                return None
            return data
        return wait_for(ready, timeout, f"{n} {state} worker(s)")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        return wait_for(lambda: text in self.log_text() and self.log_text(), timeout,
                        f"{text!r} in {self.log}")

    def all_pids(self) -> List[int]:
        return list(self.tracker.procs)

    def cleanup(self) -> List[int]:
        """Stop the manager if it runs; then SIGKILL, by PID, anything it started that is
        still alive. Returns the PIDs that had to be killed."""
        try:
            if self.pidfile.exists() or self.control.exists():
                self.record_quietly()
                self.cli("stop", "--now", timeout=STOP_TIMEOUT)
        except AssertionError:
            pass
        return self.tracker.kill_all()


# -- a raw FastCGI client (independent of fcgi_manager.wire.protocol) -------------------------

FCGI_HEADER = struct.Struct("!BBHHBx")
FCGI_BEGIN, FCGI_ABORT, FCGI_END, FCGI_PARAMS, FCGI_STDIN, FCGI_STDOUT, FCGI_STDERR = range(1, 8)
FCGI_GET_VALUES, FCGI_GET_VALUES_RESULT, FCGI_UNKNOWN_TYPE = 9, 10, 11


def fcgi_record(rtype: int, rid: int, content: bytes = b"", padding: int = 0) -> bytes:
    return FCGI_HEADER.pack(1, rtype, rid, len(content), padding) + content + b"\0" * padding


def _fcgi_length(n: int) -> bytes:
    return bytes([n]) if n < 128 else struct.pack("!I", n | 0x80000000)


def fcgi_pairs(params: Dict[str, str]) -> bytes:
    out = []
    for name, value in params.items():
        n, v = name.encode("latin-1"), value.encode("latin-1")
        out.append(_fcgi_length(len(n)) + _fcgi_length(len(v)) + n + v)
    return b"".join(out)


def fcgi_stream(rtype: int, rid: int, data: bytes, chunk: int = 65535) -> bytes:
    parts = [fcgi_record(rtype, rid, data[i:i + chunk]) for i in range(0, len(data), chunk)]
    return b"".join(parts) + fcgi_record(rtype, rid)


def fcgi_request_bytes(params: Dict[str, str], body: bytes = b"", rid: int = 1,
                       keep_conn: bool = False) -> bytes:
    begin = struct.pack("!HB5x", 1, 1 if keep_conn else 0)
    return (fcgi_record(FCGI_BEGIN, rid, begin) + fcgi_stream(FCGI_PARAMS, rid, fcgi_pairs(params))
            + fcgi_stream(FCGI_STDIN, rid, body))


def cgi_params(path: str = "/", method: str = "GET", body: bytes = b"",
               script_name: str = "", **extra: str) -> Dict[str, str]:
    """CGI params like nginx sends for ``path`` (SCRIPT_NAME/PATH_INFO split given)."""
    uri_path, _, query = path.partition("?")
    params = {
        "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_SOFTWARE": "tests",
        "REQUEST_METHOD": method, "REQUEST_URI": path, "DOCUMENT_URI": uri_path,
        "QUERY_STRING": query, "SCRIPT_NAME": script_name,
        "PATH_INFO": uri_path[len(script_name):], "SERVER_NAME": "localhost",
        "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "40000", "HTTP_HOST": "localhost",
        "CONTENT_LENGTH": str(len(body)) if body or method == "POST" else "",
        "CONTENT_TYPE": "application/octet-stream" if body else "",
    }
    params.update(extra)
    return params


class FcgiReply:
    """The records of one response, and the CGI response in them."""

    def __init__(self, records: List[Tuple[int, int, bytes]]) -> None:
        self.records = records
        self.stdout = b"".join(c for t, _, c in records if t == FCGI_STDOUT)
        self.stderr = b"".join(c for t, _, c in records if t == FCGI_STDERR)
        end = [c for t, _, c in records if t == FCGI_END]
        self.app_status, self.protocol_status = (
            struct.unpack("!IB3x", end[0]) if end else (None, None))
        head, sep, self.body = self.stdout.partition(b"\r\n\r\n")
        self.headers: List[Tuple[str, str]] = []
        self.status = ""
        if sep:
            for line in head.decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                if name.lower() == "status":
                    self.status = value.strip()
                else:
                    self.headers.append((name.strip(), value.strip()))

    @property
    def status_code(self) -> int:
        return int(self.status[:3]) if self.status[:3].isdigit() else 0

    def header(self, name: str) -> Optional[str]:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def __repr__(self) -> str:
        return (f"<FcgiReply {self.status!r} app_status={self.app_status} "
                f"body={self.body[:200]!r} stderr={self.stderr[:200]!r}>")


def read_fcgi_records(sock: socket.socket, rid: Optional[int] = None,
                      deadline_s: float = 30.0) -> List[Tuple[int, int, bytes]]:
    """Read records until END_REQUEST (for ``rid`` if given) or EOF."""
    sock.settimeout(deadline_s)
    buf = b""
    records: List[Tuple[int, int, bytes]] = []
    while True:
        while len(buf) >= 8:
            _, rtype, r, clen, plen = FCGI_HEADER.unpack(buf[:8])
            if len(buf) < 8 + clen + plen:
                break
            records.append((rtype, r, buf[8:8 + clen]))
            buf = buf[8 + clen + plen:]
            if rtype == FCGI_END and (rid is None or r == rid):
                return records
        data = sock.recv(65536)
        if not data:
            return records
        buf += data


def connect_fcgi(address: str, timeout: float = 30.0) -> socket.socket:
    """Connect to ``unix:/path``, ``/path``, ``host:port`` or ``[v6]:port``."""
    if address.startswith("unix:") or address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address[5:] if address.startswith("unix:") else address)
        return sock
    if address.startswith("["):
        host, _, port = address[1:].partition("]:")
    else:
        host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def fcgi_request(address: str, path: str = "/", method: str = "GET", body: bytes = b"",
                 timeout: float = 30.0, **params: str) -> FcgiReply:
    """One request on a new connection, read to END_REQUEST."""
    with connect_fcgi(address, timeout) as sock:
        sock.sendall(fcgi_request_bytes(cgi_params(path, method, body, **params), body))
        return FcgiReply(read_fcgi_records(sock, 1, timeout))


# -- nginx --------------------------------------------------------------------------------

class HTTPResponse:
    def __init__(self, status: int, reason: str, headers: List[Tuple[str, str]], body: bytes):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return default

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<HTTP {self.status} {self.reason}: {self.body[:300]!r}>"


def http_request(port: int, method: str, path: str, body: Optional[bytes] = None,
                 headers: Optional[Dict[str, str]] = None, timeout: float = 30.0,
                 host: str = "127.0.0.1") -> HTTPResponse:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return HTTPResponse(resp.status, resp.reason, resp.getheaders(), data)
    finally:
        conn.close()


class Nginx:
    """A private nginx (``daemon off``, a child of the test) in front of one FastCGI
    address. Locations:

    * ``/app/...`` -- a sub-path, ``fastcgi_split_path_info ^(/app)(.*)$;`` with PATH_INFO
      and SCRIPT_NAME from it;
    * ``/`` -- the root, as in the Flask guide: ``PATH_INFO $fastcgi_script_name``,
      ``SCRIPT_NAME ""``.

    ``keep_conn=True`` adds ``fastcgi_keep_conn on`` and an upstream ``keepalive``.
    """

    def __init__(self, tmp: Path, upstream: str, *, keep_conn: bool = False,
                 keepalive: int = 8, extra_locations: str = "",
                 read_timeout: int = 60) -> None:
        self.binary = require_program("nginx")
        if not FASTCGI_PARAMS.exists():
            msg = f"{FASTCGI_PARAMS} is missing (Debian's nginx-common ships it)"
            if in_ci():
                pytest.fail(msg)
            pytest.skip(msg)  # by hand only: in CI it failed above
        self.tmp = Path(tmp) / "nginx"
        self.tmp.mkdir(parents=True, exist_ok=True)
        if upstream.startswith("unix:") or upstream.startswith("/"):
            path = upstream[5:] if upstream.startswith("unix:") else upstream
            self.server = f"unix:{path}"
        else:
            self.server = upstream
        self.keep_conn = keep_conn
        self.keepalive = keepalive
        self.extra_locations = extra_locations
        self.read_timeout = read_timeout
        self.port = free_port()
        self.conf = self.tmp / "nginx.conf"
        self.error_log_path = self.tmp / "error.log"
        self.proc: Optional[subprocess.Popen] = None
        self.tracker = ProcessTracker()

    def render(self) -> str:
        # As root, nginx's workers would run as "nobody" and could not reach a socket in
        # the test's private directory: keep them as the test's own user.
        user = f"user {pwd.getpwuid(0).pw_name};" if os.geteuid() == 0 else ""
        temp = "\n".join(f"    {kind}_temp_path {self.tmp / kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        keep = ""
        if self.keep_conn:
            keep = "        fastcgi_keep_conn on;\n"
        keepalive = f"        keepalive {self.keepalive};\n" if self.keep_conn else ""
        return f"""# private nginx for one test
{user}
worker_processes 1;
daemon off;
master_process on;
pid {self.tmp / 'nginx.pid'};
error_log {self.error_log_path} info;

events {{
    worker_connections 512;
}}

http {{
    access_log off;
    default_type application/octet-stream;
{temp}
    client_max_body_size 64m;
    client_body_buffer_size 16k;
    fastcgi_read_timeout {self.read_timeout}s;
    fastcgi_send_timeout {self.read_timeout}s;

    upstream fcgi_backend {{
        server {self.server};
{keepalive}    }}

    server {{
        listen 127.0.0.1:{self.port};
        server_name localhost;

        location /app {{
            include {FASTCGI_PARAMS};
            fastcgi_split_path_info ^(/app)(.*)$;
            fastcgi_param PATH_INFO $fastcgi_path_info;
            fastcgi_param SCRIPT_NAME $fastcgi_script_name;
            fastcgi_pass fcgi_backend;
{keep}        }}
{self.extra_locations}
        location / {{
            include {FASTCGI_PARAMS};
            fastcgi_param PATH_INFO $fastcgi_script_name;
            fastcgi_param SCRIPT_NAME "";
            fastcgi_pass fcgi_backend;
{keep}        }}
    }}
}}
"""

    def start(self) -> Nginx:
        self.conf.write_text(self.render())
        with open(self.tmp / "stderr.log", "wb") as stderr:
            self.proc = subprocess.Popen(
                [self.binary, "-p", str(self.tmp), "-e", str(self.error_log_path),
                 "-c", str(self.conf)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        self.tracker.add(self.proc.pid)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise GiveUp(f"nginx exited with {self.proc.returncode}:\n"
                                     f"{self.error_log()}")
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                pass
            return True

        try:
            wait_for(up, 15, f"nginx on 127.0.0.1:{self.port}")
        except AssertionError:
            self.stop()
            raise
        try:
            self.tracker.add_all(c.pid for c in psutil.Process(self.proc.pid).children())
        except psutil.Error:
            pass
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.tracker.add_all(c.pid for c in psutil.Process(self.proc.pid).children())
        except psutil.Error:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.tracker.kill_all()
        self.proc = None

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None, timeout: float = 30.0) -> HTTPResponse:
        return http_request(self.port, method, path, body, headers, timeout)

    def get(self, path: str, headers: Optional[Dict[str, str]] = None,
            timeout: float = 30.0) -> HTTPResponse:
        return self.request("GET", path, None, headers, timeout)

    def post(self, path: str, data: bytes, headers: Optional[Dict[str, str]] = None,
             timeout: float = 30.0) -> HTTPResponse:
        hdrs = {"Content-Type": "application/octet-stream"}
        hdrs.update(headers or {})
        return self.request("POST", path, data, hdrs, timeout)

    def error_log(self) -> str:
        try:
            return self.error_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


__all__ = [
    "skip_or_fail",
    "need_root",
    "APPS", "CLIResult", "FcgiReply", "GiveUp", "HTTPResponse", "Manager", "Nginx",
    "ProcessTracker", "ROOT", "cgi_params", "connect_fcgi", "fcgi_manager", "fcgi_pairs",
    "fcgi_record", "fcgi_request", "fcgi_request_bytes", "free_port", "has_ipv6_loopback",
    "PROGRAMS", "ended_early", "find_program", "http_request", "in_ci", "pid_alive",
    "read_fcgi_records", "render_toml", "require_program", "wait_for",
]


def describe_event(event: object) -> tuple:
    """A protocol event as a comparable tuple: class name, then every attribute value in
    the order the class declares them: its ``__slots__`` in the pure core; the compiled
    core's native classes keep no ``__slots__`` and list their attributes in
    ``__mypyc_attrs__``."""
    cls = type(event)
    names = getattr(cls, "__slots__", None) or cls.__mypyc_attrs__
    return (cls.__name__,) + tuple(getattr(event, name) for name in names)
