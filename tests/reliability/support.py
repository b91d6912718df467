"""Helpers for the reliability tests (the suite-wide ones live in ``tests/support.py``).

Every figure a test measures goes through :func:`figure`: it is printed (visible with
``-s`` or in the report of a failing test) and the returned text goes into the assertion
message, so a failure always says what was measured.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import psutil
from support import (
    ProcessTracker,
    fcgi_request,
    pid_alive,
    wait_for,
)

from fcgi_manager.wire import control

HERE = Path(__file__).resolve().parent
RELAPPS = HERE / "apps"
ROOT = HERE.parents[1]


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment for fcgi-manager processes: this checkout first on the path, no
    inherited ``FCGI_MANAGER_*``/``LISTEN_*`` variables, no stale bytecode."""
    env = dict(os.environ)
    for name in ("FCGI_MANAGER_CONFIG", "FCGI_MANAGER_RESUME", "LISTEN_FDS", "LISTEN_PID"):
        env.pop(name, None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if extra:
        env.update(extra)
    return env


def start_with_limit(manager: Any, limit: int, value: int) -> None:
    """``fcgi-manager start`` with one resource limit (``resource.RLIMIT_*``) lowered to
    ``value``; the master and its workers inherit it. Their PIDs are recorded."""
    import resource

    def lower() -> None:
        resource.setrlimit(limit, (value, value))

    result = subprocess.run(
        [sys.executable, "-m", "fcgi_manager", "-c", str(manager.config), "start"],
        cwd=str(manager.tmp), env=child_env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60, preexec_fn=lower)
    assert result.returncode == 0, result
    status(manager)


def figure(name: str, value: Any, unit: str = "") -> str:
    """Print one measured figure; return the same text for an assertion message."""
    if isinstance(value, float):
        value = f"{value:.3f}"
    text = f"[figure] {name} = {value}{' ' + unit if unit else ''}"
    print(text, flush=True)
    return text


def rel_manager(make_manager: Callable[..., Any], *, app: str = "relapp:app",
                workers: int = 2, extra_path: Iterable[str] = (),
                worker_opts: Optional[Dict[str, Any]] = None, **sections: Any) -> Any:
    """A :class:`support.Manager` serving the reliability app (``apps/relapp.py``);
    ``worker_opts`` go into ``[workers]`` beside ``count``."""
    path = [*map(str, extra_path), str(RELAPPS)]
    manager = make_manager(app, path=path, **sections)
    manager.update("workers", count=workers, **(worker_opts or {}))
    return manager


def ctl(manager: Any, command: str, args: Optional[Dict[str, Any]] = None,
        timeout: float = 10.0) -> Dict[str, Any]:
    """One control-socket command, in-process (far cheaper than running the CLI)."""
    return control.call(str(manager.control), command, args, timeout=timeout)


def status(manager: Any) -> Dict[str, Any]:
    """``status`` over the control socket; every PID in it is recorded for cleanup."""
    data = ctl(manager, "status")
    manager.tracker.add(data.get("pid"))
    manager.tracker.add_all(w["pid"] for w in data.get("workers", ()))
    return data


def worker_pids(data: Dict[str, Any]) -> List[int]:
    return sorted(w["pid"] for w in data["workers"])


def wait_pool(manager: Any, n: int, timeout: float = 20.0,
              exclude: Iterable[int] = ()) -> Dict[str, Any]:
    """Wait for ``n`` idle-or-busy workers of the current generation, none in ``exclude``."""
    excluded = set(exclude)

    def ready() -> Optional[Dict[str, Any]]:
        data = status(manager)
        ws = [w for w in data["workers"] if w["state"] in ("idle", "busy")
              and w["generation"] == data["generation"]]
        if len(ws) == n == len(data["workers"]) and not excluded & set(worker_pids(data)):
            return data
        return None

    return wait_for(ready, timeout, f"{n} ready worker(s)")


def cpu_percent(pids: Iterable[int], seconds: float) -> Dict[int, float]:
    """CPU use of each process over a measuring window (percent of one core)."""
    procs = {}
    before = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            t = p.cpu_times()
            procs[pid] = p
            before[pid] = t.user + t.system
        except psutil.Error:
            pass
    started = time.monotonic()
    time.sleep(seconds)  # the measuring window itself
    wall = time.monotonic() - started
    out = {}
    for pid, p in procs.items():
        try:
            t = p.cpu_times()
            out[pid] = 100.0 * (t.user + t.system - before[pid]) / wall
        except psutil.Error:
            pass
    return out


def process_cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def wait_closed(sock: socket.socket, timeout: float) -> float:
    """Read (and discard) until the peer closes; the seconds it took. AssertionError if
    the connection is still open after ``timeout``."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the server kept the connection open for {timeout} s")
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
        if not data:
            return time.monotonic() - started


def unix_path(address: str) -> str:
    return address[5:] if address.startswith("unix:") else address


def connect(address: str, timeout: float = 10.0) -> socket.socket:
    if address.startswith("unix:") or address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(unix_path(address))
        return sock
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


class LoadClient(threading.Thread):
    """A well-behaved FastCGI client: one request per connection, in a loop, until
    :meth:`stop`. Every request must answer 200 with ``expect`` in the body; anything
    else is a failure (kept with its reason)."""

    def __init__(self, address: str, path: str = "/", timeout: float = 10.0,
                 expect: bytes = b"ok from", pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.path = path
        self.timeout = timeout
        self.expect = expect
        self.pause = pause
        self.latencies: List[float] = []
        self.failures: List[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            started = time.monotonic()
            try:
                reply = fcgi_request(self.address, self.path, timeout=self.timeout)
                if reply.status_code != 200 or self.expect not in reply.body:
                    raise AssertionError(repr(reply))
                self.latencies.append(time.monotonic() - started)
            except Exception as exc:  # every way a request can fail is counted
                self.failures.append(f"{time.monotonic() - started:.2f} s: {exc!r}")
            if self.pause:
                self._stop_event.wait(self.pause)

    def stop(self) -> LoadClient:
        self._stop_event.set()
        self.join(self.timeout + 5)
        return self

    @property
    def done(self) -> int:
        return len(self.latencies)

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("inf")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> str:
        return (f"{self.done} ok, {len(self.failures)} failed, p50 "
                f"{self.percentile(0.5) * 1000:.1f} ms, p99 {self.percentile(0.99) * 1000:.1f} "
                f"ms, max {max(self.latencies, default=0) * 1000:.1f} ms; first failures: "
                f"{self.failures[:3]}")


class Foreground:
    """``fcgi-manager start --foreground`` as a child of the test, stderr to a file;
    stopped (and anything it started killed) by PID at :meth:`close`."""

    def __init__(self, manager: Any, env: Optional[Dict[str, str]] = None) -> None:
        self.manager = manager
        self.stderr_path = manager.tmp / "foreground.stderr"
        self.tracker = ProcessTracker()
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fcgi_manager", "-c", str(manager.config), "start",
                 "--foreground"], cwd=str(manager.tmp), env=child_env(env),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        self.tracker.add(self.proc.pid)

    def wait_ready(self, workers: int, timeout: float = 30.0) -> Dict[str, Any]:
        def ready() -> Optional[Dict[str, Any]]:
            if self.proc.poll() is not None:
                raise AssertionError(f"the foreground master exited with {self.proc.returncode}:"
                                     f"\n{self.stderr()}")
            data = status(self.manager)
            self.tracker.add_all(worker_pids(data))
            ok = [w for w in data["workers"] if w["state"] in ("idle", "busy")]
            return data if len(ok) == workers else None

        return wait_for(ready, timeout, "the foreground master and its workers")

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self) -> Optional[int]:
        if self.proc.poll() is None:
            try:
                self.tracker.add_all(worker_pids(status(self.manager)))
            except Exception:
                pass
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.tracker.kill_all()
        return self.proc.returncode


def alive(pids: Iterable[int]) -> List[int]:
    return [pid for pid in pids if pid_alive(pid)]


def env_seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, "") or default)
    except ValueError:
        return default


class LoadProcesses:
    """``n`` load generators (``loadgen.py``), each a process of its own; stopped by
    closing their stdin, killed by PID if they do not exit."""

    def __init__(self, address: str, n: int, tmp: Path, timeout: float = 30.0) -> None:
        self.outs = [tmp / f"load{i}.json" for i in range(n)]
        self.tracker = ProcessTracker()
        self.procs = []
        for out in self.outs:
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "loadgen.py"), address, "--out", str(out),
                 "--timeout", str(timeout)], env=child_env(), stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.tracker.add(proc.pid)
            self.procs.append(proc)

    def counts(self) -> List[Dict[str, Any]]:
        import json

        out = []
        for path in self.outs:
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                out.append({"ok": 0, "failed": 0, "failures": []})
        return out

    def wait_started(self, timeout: float = 20.0) -> None:
        wait_for(lambda: all(c["ok"] > 0 for c in self.counts()), timeout,
                 "every load generator served")

    def stop(self) -> List[Dict[str, Any]]:
        for proc in self.procs:
            try:
                proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                pass
        self.tracker.kill_all()
        for proc in self.procs:
            if proc.stderr is not None:
                proc.stderr.close()
        return self.counts()

    def __enter__(self) -> LoadProcesses:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _socket_inode(path: str) -> Optional[int]:
    """The inode of the listening unix socket bound at ``path`` (from /proc/net/unix)."""
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == path and parts[5] == "01":
                return int(parts[6])
    return None


def watches_listener(pid: int, address: str) -> bool:
    """Whether worker ``pid`` still has the listening socket in its epoll set (it stops
    watching it when it stops accepting)."""
    inode = _socket_inode(unix_path(address))
    fds = {}
    epolls = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        fds[fd] = link
        if link == "anon_inode:[eventpoll]":
            epolls.append(fd)
    listen_fds = {fd for fd, link in fds.items() if link == f"socket:[{inode}]"}
    for ep in epolls:
        with open(f"/proc/{pid}/fdinfo/{ep}") as f:
            for line in f:
                if line.startswith("tfd:") and line.split()[1] in listen_fds:
                    return True
    return False
