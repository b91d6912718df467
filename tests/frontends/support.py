"""Helpers for the deployment tests: a private site tree, the shipped example files rendered
into it, real web servers and supervisors started from them, and clients.

Rules every helper here follows:

* The example files are read from ``examples/`` and only paths, ports, users and the
  program paths are substituted (:meth:`Site.render`); a substitution whose text is not
  in the file fails the test, so examples and tests cannot drift apart.
* Only loopback addresses (127.0.0.0/8) and unix sockets in the test's directory.
* Every process started is recorded by PID (with its start time, against PID reuse); at
  teardown the whole family (recorded processes and their descendants, listed *before*
  anything is stopped, so orphans are still known) is stopped and checked by PID; nothing
  is ever killed by name.
* No fixed sleeps: :func:`wait_for` polls against a deadline.
* A test declares the programs it drives, ``@pytest.mark.needs("nginx")``: it is skipped
  before anything starts when one is missing, and fails when ``CI=true`` (the CI job
  installs every program on purpose). :func:`require_program` stays as a safety net.
"""

from __future__ import annotations

import grp
import http.client as httpclient
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union
from urllib.parse import unquote

import psutil
import pytest

from tests import support as suite
from tests.support import pid_alive, render_toml  # noqa: F401 - re-exported to the tests here

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
APACHE_MODULES = Path("/usr/lib/apache2/modules")
NGINX_FASTCGI_PARAMS = Path("/etc/nginx/fastcgi_params")

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


# -- environment ------------------------------------------------------------------------


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def require(condition: bool, reason: str) -> None:
    """Skip the test unless ``condition`` (fail instead in CI)."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the CI job must provide it)")
    pytest.skip(reason)  # by hand only: in CI it failed above


def require_program(name: str) -> str:
    """The path of ``name`` (see ``tests/support.py``: the test declares it with a ``needs``
    marker; this is the safety net)."""
    return suite.require_program(name)


def fcgi_manager_program() -> str:
    """The ``fcgi-manager`` console script of the Python running the tests (not a shim)."""
    beside = Path(sys.executable).parent / "fcgi-manager"
    if os.access(beside, os.X_OK):
        return str(beside)
    path = suite.find_program("fcgi-manager")
    require(path is not None, "fcgi-manager is not installed (pip install -e .)")
    return str(path)


def is_root() -> bool:
    return os.geteuid() == 0


def me() -> Tuple[str, str]:
    """(user, group) names of the user running the tests."""
    return pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(os.getegid()).gr_name


def web_user() -> Tuple[str, str]:
    """Who the web servers run as: www-data when we are root (Apache refuses root)."""
    if is_root():
        try:
            pwd.getpwnam("www-data")
            grp.getgrnam("www-data")
            return "www-data", "www-data"
        except KeyError:
            pass
    return me()


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    for name in ("FCGI_MANAGER_CONFIG", "FCGI_MANAGER_RESUME", "LISTEN_FDS", "LISTEN_PID",
                 "LISTEN_FDNAMES", "NOTIFY_SOCKET", "FCGI_WEB_SERVER_ADDRS"):
        env.pop(name, None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # This checkout's code, not whatever fcgi_manager the interpreter has installed.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if extra:
        env.update(extra)
    return env


# -- waiting ----------------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0,
             what: Union[str, Callable[[], str]] = "a condition", interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that; exceptions
    count as "not yet" (the last one is shown on timeout). ``what`` may be a callable, to
    describe the state (logs...) at the time of the timeout."""
    deadline = time.monotonic() + timeout
    last: Optional[BaseException] = None
    delay = 0.005
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = None
        except Exception as exc:  # noqa: BLE001 - "not yet"
            last = exc
        if time.monotonic() >= deadline:
            extra = f" (last error: {last!r})" if last is not None else ""
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {described}{extra}")
        time.sleep(delay)
        delay = min(interval, delay * 2)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def unix_listening(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"({path}: {exc.strerror})"
    return f"--- {path} (last {lines} lines)\n" + "\n".join(text.splitlines()[-lines:])


# -- processes --------------------------------------------------------------------------


class Procs:
    """Every process a test module started, by PID and start time; stopped at the end."""

    def __init__(self) -> None:
        self.known: Dict[int, float] = {}
        self.popens: List[subprocess.Popen] = []
        self.stoppers: List[Callable[[], None]] = []

    def add(self, pid: Optional[int]) -> None:
        if not pid or pid in self.known:
            return
        try:
            self.known[pid] = psutil.Process(pid).create_time()
        except psutil.Error:
            pass

    def spawn(self, args: Sequence[str], log: Path, env: Optional[Dict[str, str]] = None,
              cwd: Optional[Path] = None, **kwargs: Any) -> subprocess.Popen:
        """Start ``args`` with stdout and stderr appended to ``log``."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(list(args), stdin=kwargs.pop("stdin", subprocess.DEVNULL),
                                    stdout=out, stderr=subprocess.STDOUT,
                                    env=env if env is not None else child_env(),
                                    cwd=str(cwd) if cwd else None, **kwargs)
        self.popens.append(proc)
        self.add(proc.pid)
        return proc

    def on_cleanup(self, stop: Callable[[], None]) -> None:
        """Run ``stop`` (a graceful stop) first at cleanup, last registered first."""
        self.stoppers.append(stop)

    def _same(self, pid: int, created: float) -> Optional[psutil.Process]:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    def family(self) -> Dict[int, float]:
        """Recorded processes still running, and all their descendants: {pid: started}."""
        found: Dict[int, float] = {}
        for pid, created in self.known.items():
            proc = self._same(pid, created)
            if proc is None:
                continue
            found[pid] = created
            try:
                for child in proc.children(recursive=True):
                    try:
                        found[child.pid] = child.create_time()
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
        return found

    def reap(self) -> None:
        for proc in self.popens:
            proc.poll()

    def survivors(self, family: Dict[int, float]) -> List[psutil.Process]:
        self.reap()
        out = []
        for pid, created in family.items():
            proc = self._same(pid, created)
            if proc is not None:
                out.append(proc)
        return out

    def wait_gone(self, family: Dict[int, float], timeout: float) -> List[psutil.Process]:
        deadline = time.monotonic() + timeout
        while True:
            left = self.survivors(family)
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)

    def checkpoint(self) -> Tuple[int, int]:
        """Where the record stands now, for :meth:`release`."""
        return len(self.known), len(self.stoppers)

    def release(self, mark: Tuple[int, int]) -> None:
        """Stop, by PID, what was started since ``mark`` (a test that was skipped or failed
        half-way), and forget it: it is not reported as a leak at the end."""
        pids = list(self.known)[mark[0]:]
        stoppers = self.stoppers[mark[1]:]
        del self.stoppers[mark[1]:]
        # What the test started and its descendants (not those of what came before).
        mine: Dict[int, float] = {}
        for pid in pids:
            created = self.known[pid]
            proc = self._same(pid, created)
            if proc is None:
                continue
            mine[pid] = created
            try:
                for child in proc.children(recursive=True):
                    mine[child.pid] = child.create_time()
            except psutil.Error:
                pass
        self._stop(mine, stoppers)
        for pid in pids:
            self.known.pop(pid, None)

    def cleanup(self) -> List[str]:
        """Stop everything gracefully; return what went wrong: failed stops, and processes
        still running 2 s after every graceful stop returned (then SIGTERM, then SIGKILL,
        by PID)."""
        family = self.family()
        stoppers, self.stoppers = self.stoppers, []
        return self._stop(family, stoppers)

    def _stop(self, family: Dict[int, float], stoppers: List[Callable[[], None]]) -> List[str]:
        problems = []
        for stop in reversed(stoppers):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                problems.append(f"a graceful stop failed: {exc!r}")
        left = self.wait_gone(family, 2.0)
        for proc in left:
            try:
                problems.append(f"pid {proc.pid}: {' '.join(proc.cmdline())}")
                proc.terminate()
            except psutil.Error:
                pass
        for proc in self.wait_gone(family, 10.0):
            try:
                proc.kill()
            except psutil.Error:
                pass
        self.wait_gone(family, 5.0)
        return problems


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM,
                 timeout: float = STOP_TIMEOUT) -> Optional[int]:
    """Send ``sig`` to a process we started and wait for it; its exit status."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


# -- the site: example files rendered into a private tree -------------------------------


class Site:
    """A private copy of the deployment in a world-readable temporary directory.

    ``/var/www/yourapplication`` is :attr:`app` (a copy of ``examples/flask_app``: the
    guide's yourapplication.py, checked by :func:`check_app`, its .fcgi file and configs),
    ``/run/yourapplication`` is :attr:`run`, ``/var/log/yourapplication`` :attr:`log`,
    ``/etc/yourapplication`` :attr:`etc`; ``/usr/local/bin/fcgi-manager`` is the
    console script of the Python running the tests.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        os.chmod(root, 0o755)  # web servers running as www-data must get in
        self.app = root / "www" / "yourapplication"
        self.run = root / "run"
        self.log = root / "log"
        self.etc = root / "etc"
        self.work = root / "work"
        self.lighttpd_run = root / "lighttpd-run"  # /run/lighttpd: lighttpd's user's
        for d in (root / "www", self.run, self.log, self.etc, self.work, self.lighttpd_run):
            d.mkdir()
            os.chmod(d, 0o755)
        if is_root():
            web = pwd.getpwnam(web_user()[0])
            os.chown(self.lighttpd_run, web.pw_uid, web.pw_gid)
        shutil.copytree(EXAMPLES / "flask_app", self.app)
        for path in [self.app, *self.app.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
        self.fcgi_manager = fcgi_manager_program()
        self.paths = [
            ("/var/www/yourapplication", str(self.app)),
            ("/run/yourapplication", str(self.run)),
            ("/run/lighttpd", str(self.lighttpd_run)),
            ("/var/log/yourapplication", str(self.log)),
            ("/etc/yourapplication", str(self.etc)),
            ("/usr/local/bin/fcgi-manager", self.fcgi_manager),
        ]

    def example(self, name: str) -> str:
        return (EXAMPLES / name).read_text()

    def render(self, name: str, dest: Optional[Path] = None,
               replace: Iterable[Tuple[str, str]] = (), mode: int = 0o644) -> Path:
        """``examples/NAME`` with ``replace`` applied (each must match), then the paths."""
        text = self.example(name)
        text = substitute(text, replace, name)
        for old, new in self.paths:
            text = text.replace(old, new)
        if dest is None:
            dest = self.etc / Path(name).name
        dest.write_text(text)
        os.chmod(dest, mode)
        return dest

    def render_toml(self, name: str, dest: Optional[Path] = None,
                    replace: Iterable[Tuple[str, str]] = (),
                    override: Optional[Dict[str, Dict[str, Any]]] = None) -> Path:
        """A TOML example rendered, then keys of ``override`` changed; every overridden key
        must be in the example (``None`` removes it)."""
        path = self.render(name, dest, replace)
        data = tomllib.loads(path.read_text())
        listen = data.get("listen", {})
        if not is_root() and ("owner" in listen or "group" in listen):
            listen["owner"], listen["group"] = me()  # only root can give the socket away
        for section, values in (override or {}).items():
            table = data.setdefault(section, {})
            for key, value in values.items():
                assert key in table, f"examples/{name}: [{section}] {key} is gone"
                if value is None:
                    del table[key]
                else:
                    table[key] = value
        path.write_text(dump_toml(data))
        return path

    def test_overrides(self) -> Dict[str, Dict[str, Any]]:
        """What the tests change in fcgi-manager's example configs: fewer workers, and the
        workers run as the user running the tests (the interpreter running the tests
        may not be readable by www-data)."""
        user, group = me()
        return {"workers": {"count": 2}, "manager": {"user": user, "group": group}}


def substitute(text: str, replace: Iterable[Tuple[str, str]], name: str = "text") -> str:
    for old, new in replace:
        if old.startswith("re:"):
            text, n = re.subn(old[3:], new, text, flags=re.MULTILINE)
        else:
            n = text.count(old)
            text = text.replace(old, new)
        assert n, f"examples/{name} no longer contains {old!r}: update the test with the example"
    return text


def dump_toml(data: Dict[str, Dict[str, Any]]) -> str:
    return render_toml(data)


def read_toml(path: Path) -> Dict[str, Any]:
    return tomllib.loads(path.read_text())


# -- clients ----------------------------------------------------------------------------


class Reply:
    def __init__(self, status: int, headers: Dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<HTTP {self.status} {self.headers} {self.body[:500]!r}>"


def http_request(port: int, path: str, method: str = "GET", body: Optional[bytes] = None,
         headers: Optional[Dict[str, str]] = None, host: str = "127.0.0.1",
         timeout: float = 15.0) -> Reply:
    conn = httpclient.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def fcgi(address: str, path: str, method: str = "GET", body: bytes = b"",
         script_name: str = "", timeout: float = 15.0) -> Reply:
    """One request straight to a FastCGI socket (``unix:/path`` or ``host:port``)."""
    from fcgi_manager.cli import client
    from fcgi_manager.sockets import parse_address

    params = client.build_params(path, method, {}, len(body), script_name=script_name)
    reply = client.request(parse_address(address), params, body, timeout=timeout)
    return Reply(int(reply.status[:3]), {k.lower(): v for k, v in reply.headers}, reply.body)


def cgi_fcgi(address: str, path: str, script_name: str = "", method: str = "GET",
             body: bytes = b"") -> Reply:
    """One request with libfcgi's ``cgi-fcgi -bind -connect`` (it sends its environment
    as the request's params): ``address`` is a unix socket path or ``host:port``."""
    program = require_program("cgi-fcgi")
    raw_path, _, query = path.partition("?")
    decoded = unquote(raw_path, encoding="latin-1")
    env = {
        "GATEWAY_INTERFACE": "CGI/1.1", "REQUEST_METHOD": method, "REQUEST_URI": path,
        "SCRIPT_NAME": script_name, "PATH_INFO": decoded[len(script_name):],
        "QUERY_STRING": query, "SERVER_NAME": "localhost", "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "localhost",
    }
    if body:
        env.update(CONTENT_LENGTH=str(len(body)), CONTENT_TYPE="application/octet-stream")
    r = subprocess.run([program, "-bind", "-connect", address], input=body, env=env,
                       capture_output=True, timeout=30)
    assert r.returncode == 0, f"cgi-fcgi exited {r.returncode}: {r.stderr!r}"
    head, sep, payload = r.stdout.partition(b"\r\n\r\n")
    assert sep, f"no CGI header block in {r.stdout[:300]!r}"
    headers = {}
    status = 200
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = int(value.strip()[:3])
        else:
            headers[name.strip().lower()] = value.strip()
    return Reply(status, headers, payload)


def check_where(reply: Reply, script_root: str, path: str = "/where", query: str = "") -> None:
    """The Flask app's /where page says it is mounted at ``script_root`` and its links
    (built with url_for) point there."""
    assert reply.status == 200, reply
    data = reply.json()
    assert data["script_root"] == script_root, data
    assert data["path"] == path, data
    assert data["query"] == query, data
    assert data["links"] == {
        "index": script_root + "/",
        "where": script_root + "/where",
        "hello": script_root + "/hello/world",
    }, data


def check_app(get: Callable[[str], Reply], script_root: str) -> None:
    """The guide's app answers its routes correctly when mounted at ``script_root``."""
    index = get(script_root + "/")
    assert index.status == 200, index
    assert f'href="{script_root}/where"' in index.text, index
    check_where(get(script_root + "/where?x=1&y=%C3%A9"), script_root, query="x=1&y=%C3%A9")
    hello = get(script_root + "/hello/fcgi%20manager")
    assert (hello.status, hello.text) == (200, "Hello, fcgi manager!\n"), hello
    missing = get(script_root + "/no/such/page")
    assert missing.status == 404, missing


def unix_connections(pids: Iterable[int], path: str) -> Dict[int, List[int]]:
    """{pid: inodes of the accepted connections on the unix socket ``path`` it holds}
    (from /proc/net/unix: connected, not listening, bound to ``path``)."""
    accepted = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) < 8 or fields[7] != path:
                continue
            flags, state, inode = int(fields[3], 16), int(fields[5], 16), int(fields[6])
            if state == 3 and not flags & 0x10000:  # SS_CONNECTED, not __SO_ACCEPTCON
                accepted.add(inode)
    held: Dict[int, List[int]] = {}
    for pid in pids:
        inodes = []
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in accepted:
                inodes.append(int(target[8:-1]))
        held[pid] = sorted(inodes)
    return held


# -- fcgi-manager -----------------------------------------------------------------------


class Manager:
    """An fcgi-manager instance started with ``fcgi-manager -c CONFIG start`` (background)."""

    def __init__(self, site: Site, procs: Procs, config: Path) -> None:
        self.site = site
        self.procs = procs
        self.config = config
        cfg = read_toml(config)
        self.pidfile = Path(cfg["manager"]["pidfile"])
        self.bind = cfg["listen"]["bind"]
        log = cfg["manager"].get("log")
        self.log = Path(log) if log else self.pidfile.with_suffix(".log")

    def cli(self, *args: str, timeout: float = 60.0,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        return subprocess.run([self.site.fcgi_manager, "-c", str(self.config), *args],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env=child_env(env))

    def start(self) -> Manager:
        r = self.cli("start")
        assert r.returncode == 0, f"{r}\n{tail(self.log)}"
        self.procs.add(self.pid())
        self.procs.on_cleanup(self.stop)
        return self

    def pid(self) -> Optional[int]:
        try:
            return int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if self.pid() is not None:
            r = self.cli("stop")
            assert r.returncode == 0, r

    def status(self) -> Dict[str, Any]:
        r = self.cli("status", "--json")
        assert r.returncode == 0, r
        return json.loads(r.stdout)

    def worker_pids(self) -> List[int]:
        return [w["pid"] for w in self.status()["workers"]]

    def get(self, path: str) -> Reply:
        return fcgi(self.bind, path)


# -- a Python that another user can run (mod_fcgid runs the .fcgi as Apache's user) --------

_CHECK = "import flask, fcgi_manager.server, fcgi_manager.master.shell, fcgi_manager.worker.loop"


def _runs_as(user: str, args: List[str], env: Dict[str, str]) -> bool:
    kwargs: Dict[str, Any] = {}
    if is_root() and user != me()[0]:
        pw = pwd.getpwnam(user)
        kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    try:
        r = subprocess.run(args, env=env, cwd="/", capture_output=True, timeout=60, **kwargs)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def python_for(user: str, work: Path) -> Tuple[str, Dict[str, str]]:
    """(interpreter, extra environment) with which ``user`` can import flask and
    fcgi_manager: the tests' own Python if ``user`` can read it, else a Python of the same
    version from the system with a private copy of the packages (a Python installed under
    root's home, as pyenv does, is not readable by www-data)."""
    base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    if _runs_as(user, [sys.executable, "-c", _CHECK], base):
        return sys.executable, {}
    found = subprocess.run(
        [sys.executable, "-c", _CHECK + "; import sys, json; print(json.dumps("
         "{k: getattr(m, '__file__', None) for k, m in list(sys.modules.items())}))"],
        capture_output=True, text=True, check=True, env=child_env(), cwd="/")
    modules = json.loads(found.stdout)
    stdlib = os.path.dirname(os.__file__)
    site = work / "site-packages"
    site.mkdir(exist_ok=True)
    copied = set()
    for name, filename in modules.items():
        top = name.split(".")[0]
        if not filename or top in copied or top.startswith(("_", "__editable__")):
            continue
        if filename.startswith(stdlib + os.sep) and "site-packages" not in filename:
            continue
        if top not in modules or not modules[top]:
            continue
        src = Path(modules[top])
        if src.name == "__init__.py":
            shutil.copytree(src.parent, site / top, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.suffix == ".py":
            shutil.copy(src, site / src.name)
        else:
            continue
        copied.add(top)
    for path in [site, *site.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    env = dict(base, PYTHONPATH=str(site))
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for candidate in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}",
                      "/usr/bin/python3"):
        if os.access(candidate, os.X_OK) and _runs_as(user, [candidate, "-c", _CHECK], env):
            return candidate, env
    require(False, f"no Python that {user} can run can import flask and fcgi_manager")
    raise AssertionError("unreachable")


# -- web servers ------------------------------------------------------------------------


class Nginx:
    """A private nginx: its own prefix, pid, logs and temp dirs; server blocks included."""

    def __init__(self, site: Site, procs: Procs, name: str = "nginx") -> None:
        self.program = require_program("nginx")
        require(NGINX_FASTCGI_PARAMS.is_file(), f"{NGINX_FASTCGI_PARAMS} is missing")
        self.site = site
        self.procs = procs
        self.dir = site.work / name
        self.dir.mkdir()
        os.chmod(self.dir, 0o755)
        shutil.copy(NGINX_FASTCGI_PARAMS, self.dir / "fastcgi_params")
        self.includes: List[Path] = []
        self.ports: Dict[str, int] = {}
        self.proc: Optional[subprocess.Popen] = None

    def add(self, example: str, replace: Iterable[Tuple[str, str]] = ()) -> int:
        """Include ``examples/EXAMPLE`` with its ``listen 80`` on a free port; the port."""
        port = free_port()
        name = Path(example).name
        path = self.site.render(example, self.dir / name,
                                [("listen 80;", f"listen 127.0.0.1:{port};"), *replace])
        self.includes.append(path)
        self.ports[name] = port
        return port

    def start(self) -> Nginx:
        d = self.dir
        user = f"user {' '.join(web_user())};" if is_root() else ""
        temp = "\n".join(f"    {kind}_temp_path {d}/tmp_{kind};"
                         for kind in ("client_body", "fastcgi", "proxy", "uwsgi", "scgi"))
        includes = "\n".join(f"    include {p};" for p in self.includes)
        (d / "nginx.conf").write_text(f"""
{user}
daemon off;
master_process on;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/access.log;
{temp}
{includes}
}}
""")
        check = subprocess.run([self.program, "-t", "-p", str(d), "-c", str(d / "nginx.conf"),
                                "-e", str(d / "error.log")], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.proc = self.procs.spawn([self.program, "-p", str(d), "-c", str(d / "nginx.conf"),
                                      "-e", str(d / "error.log")], d / "stderr.log")
        self.procs.on_cleanup(self.stop)
        for port in self.ports.values():
            wait_for(lambda p=port: self.proc.poll() is None and port_open(p), START_TIMEOUT,
                     lambda p=port: f"nginx on port {p}\n{self.logs()}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGQUIT)  # graceful

    def logs(self) -> str:
        return tail(self.dir / "error.log") + "\n" + tail(self.dir / "stderr.log")

    def worker_pids(self) -> List[int]:
        assert self.proc is not None
        return [c.pid for c in psutil.Process(self.proc.pid).children()]


class Lighttpd:
    """A private lighttpd (``lighttpd -D -f conf``) including one example file."""

    def __init__(self, site: Site, procs: Procs, example: str,
                 replace: Iterable[Tuple[str, str]] = (), name: str = "lighttpd") -> None:
        self.program = require_program("lighttpd")
        self.site = site
        self.procs = procs
        self.dir = site.work / name
        self.dir.mkdir()
        os.chmod(self.dir, 0o755)
        (self.dir / "htdocs").mkdir()
        self.port = free_port()
        self.include = site.render(example, self.dir / Path(example).name, replace)
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> Lighttpd:
        d = self.dir
        (d / "lighttpd.conf").write_text(f"""
server.document-root = "{d}/htdocs"
server.bind = "127.0.0.1"
server.port = {self.port}
server.pid-file = "{d}/lighttpd.pid"
server.errorlog = "{d}/error.log"
server.breakagelog = "{d}/breakage.log"
include "{self.include}"
""")
        check = subprocess.run([self.program, "-tt", "-f", str(d / "lighttpd.conf")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = self.procs.spawn([self.program, "-D", "-f", str(d / "lighttpd.conf")],
                                     d / "stderr.log")
        self.procs.on_cleanup(self.stop)
        wait_for(lambda: self.proc.poll() is None and port_open(self.port), START_TIMEOUT,
                 lambda: f"lighttpd on port {self.port}\n{self.logs()}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGINT)  # graceful

    def logs(self) -> str:
        return tail(self.dir / "error.log") + "\n" + tail(self.dir / "stderr.log")


class Apache:
    """A private Apache httpd: own ServerRoot, PidFile, Listen, modules, one example."""

    BASE_MODULES = ("mpm_event", "authz_core")

    def __init__(self, site: Site, procs: Procs, example: str, modules: Sequence[str],
                 replace: Iterable[Tuple[str, str]] = (), extra: str = "",
                 name: str = "apache") -> None:
        self.program = require_program("apache2")
        self.site = site
        self.procs = procs
        self.dir = site.work / name
        for sub in ("", "run", "logs"):
            (self.dir / sub).mkdir(exist_ok=True)
            os.chmod(self.dir / sub, 0o755)
        self.modules = list(self.BASE_MODULES) + list(modules)
        for module in self.modules:
            require((APACHE_MODULES / f"mod_{module}.so").is_file(),
                    f"Apache module mod_{module} is not installed")
        self.port = free_port()
        self.include = site.render(example, self.dir / Path(example).name,
                                   [("<VirtualHost *:80>", f"<VirtualHost *:{self.port}>"),
                                    *replace])
        self.extra = extra
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> Apache:
        d = self.dir
        (d / "mime.types").write_text("")
        user, group = web_user()
        who = f"User {user}\nGroup {group}" if is_root() else ""
        modules = "\n".join(f"LoadModule {m}_module {APACHE_MODULES}/mod_{m}.so"
                            for m in self.modules)
        (d / "httpd.conf").write_text(f"""
ServerRoot "{d}"
ServerName localhost
Listen 127.0.0.1:{self.port}
PidFile {d}/run/httpd.pid
DefaultRuntimeDir {d}/run
Mutex file:{d}/run default
ErrorLog {d}/logs/error.log
LogLevel info
{who}
{modules}
<IfModule mod_mime.c>
    TypesConfig {d}/mime.types
</IfModule>
{self.extra}
Include {self.include}
""")
        args = [self.program, "-f", str(d / "httpd.conf")]
        check = subprocess.run(args + ["-t"], capture_output=True, text=True, env=child_env())
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = self.procs.spawn(args + ["-DFOREGROUND"], d / "logs" / "stderr.log")
        self.procs.on_cleanup(self.stop)
        wait_for(lambda: self.proc.poll() is None and port_open(self.port), START_TIMEOUT,
                 lambda: f"apache2 on port {self.port}\n{self.logs()}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM)

    def logs(self) -> str:
        return tail(self.dir / "logs" / "error.log") + "\n" + tail(
            self.dir / "logs" / "stderr.log")
