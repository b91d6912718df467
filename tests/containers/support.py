"""Helpers for the container tests: fcgi-manager as PID 1 of a PID namespace of its own.

``docker run`` without ``--init`` (and a Kubernetes container) starts the image's command
as PID 1 of a new PID namespace; ``unshare --pid --fork --mount-proc`` does the same on
this machine without a container engine. The master then sees itself as pid 1, its
workers see pids of that namespace, and every orphan in the namespace is handed to it.

Rules, as in ``tests/support.py``: processes are recorded by PID and cleaned up by PID
(killing the namespace's PID 1 makes the kernel kill everything in it); waits poll
against a deadline; a missing ``unshare`` (or no permission to create a PID namespace)
skips the test by hand and fails it when ``CI=true``.

Pids that the master reports (``status --json``, the app's ``os.getpid()``) are pids of
*its* namespace and mean nothing outside it: the helpers here only ever act on pids
seen from the host, found through ``/proc``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any, Dict, List, Optional

import psutil
import pytest
from support import (
    APPS,
    ROOT,
    GiveUp,
    fcgi_manager,
    fcgi_request,
    in_ci,
    render_toml,
    require_program,
    wait_for,
)

START_TIMEOUT = 30.0


def require_pid_namespace() -> str:
    """The path of ``unshare``, once we know it can make a PID namespace here."""
    unshare = require_program("unshare")
    reason = _namespace_problem(unshare)
    if reason:
        if in_ci():
            pytest.fail(f"{reason} (CI=true: CI runs as root, where this must work)")
        pytest.skip(reason)  # by hand only: in CI it failed above
    return unshare


@cache
def _namespace_problem(unshare: str) -> str:
    if os.geteuid() != 0:
        return "creating a PID namespace needs root"
    probe = subprocess.run([unshare, "--pid", "--fork", "--mount-proc", "true"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare --pid --fork --mount-proc fails here: {probe.stderr.decode()[:300]}"
    return ""


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a process under test: this checkout first on the path, none of
    the variables that would change how fcgi-manager starts."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FCGI_MANAGER_") and k not in
           ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WEB_CONCURRENCY")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + (
        [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    if extra:
        env.update(extra)
    return env


def ns_pid(host_pid: int) -> int:
    """The pid a process has in its own (innermost) PID namespace."""
    with open(f"/proc/{host_pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    raise AssertionError(f"no NSpid line for pid {host_pid}")


def write_config(tmp: Path, name: str, module: str = "combo:app", count: int = 2,
                 **sections: Dict[str, Any]) -> Dict[str, Any]:
    """A config for one instance in ``tmp``: unix socket, control socket, pidfile and log
    there; returns the sections written (with the paths under ``paths``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    paths = {"config": tmp / f"{name}.toml", "socket": tmp / f"{name}.sock",
             "log": tmp / f"{name}.log", "control": tmp / f"{name}.ctl",
             "pidfile": tmp / f"{name}.pid"}
    values: Dict[str, Dict[str, Any]] = {
        "app": {"module": module, "path": [str(APPS)]},
        "listen": {"bind": f"unix:{paths['socket']}"},
        "workers": {"count": count, "graceful_timeout": 10},
        "status": {"ping_path": "/fcgi-ping"},
        "manager": {"pidfile": str(paths["pidfile"]), "control": str(paths["control"]),
                    "log": str(paths["log"])},
    }
    for section, extra in sections.items():
        values.setdefault(section, {}).update(extra)
    paths["config"].write_text(render_toml(values))
    return {"paths": paths, "values": values}


def status(config: Path) -> Dict[str, Any]:
    """``status --json`` of the master running ``config`` (its pids are of its namespace:
    never act on them from here)."""
    result = fcgi_manager(["-c", str(config), "status", "--json"], timeout=20)
    assert result.returncode == 0, result
    return json.loads(result.stdout)


class Pid1Master:
    """``fcgi-manager ARGS`` as PID 1 of a new PID namespace (what a container runs).

    ``argv`` is the command inside the namespace (default: ``python -m fcgi_manager -c
    CONFIG start --foreground``). Its output goes to ``output``. ``--kill-child`` makes the
    kernel kill it if ``unshare`` dies first, so nothing survives the test.
    """

    def __init__(self, config: Path, *, argv: Optional[List[str]] = None,
                 env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None,
                 output: Optional[Path] = None) -> None:
        self.unshare = require_pid_namespace()
        self.config = config
        self.argv = argv or [sys.executable, "-m", "fcgi_manager", "-c", str(config),
                             "start", "--foreground"]
        self.env = env if env is not None else child_env()
        self.cwd = cwd or config.parent
        self.output = output or config.with_suffix(".out")
        self.proc: Optional[subprocess.Popen] = None
        self.master_pid = 0  # seen from the host
        self._master_started = 0.0

    def start(self) -> Pid1Master:
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                [self.unshare, "--pid", "--fork", "--mount-proc", "--kill-child", *self.argv],
                cwd=str(self.cwd), env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)

        def inner() -> int:
            if self.proc.poll() is not None:  # type: ignore[union-attr]
                raise GiveUp(f"unshare exited with {self.proc.returncode}:\n{self.text()}")
            children = psutil.Process(self.proc.pid).children()  # type: ignore[union-attr]
            return children[0].pid if children else 0

        self.master_pid = wait_for(inner, 10, "the namespace's first process")
        self._master_started = psutil.Process(self.master_pid).create_time()
        return self

    def text(self) -> str:
        try:
            return self.output.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def master(self) -> psutil.Process:
        proc = psutil.Process(self.master_pid)
        if proc.create_time() != self._master_started:
            raise psutil.NoSuchProcess(self.master_pid)
        return proc

    def children(self) -> List[psutil.Process]:
        """The master's children (workers and whatever orphans it was handed)."""
        try:
            return self.master().children()
        except psutil.Error:
            return []

    def wait_serving(self, socket_path: Path, workers: int,
                     timeout: float = START_TIMEOUT) -> None:
        """Until ``workers`` workers run and the ping path answers on the socket."""
        def serving() -> bool:
            if self.proc.poll() is not None:  # type: ignore[union-attr]
                raise GiveUp(f"the master exited with {self.proc.returncode}:\n{self.text()}")
            if len(self.children()) < workers:
                return False
            reply = fcgi_request(f"unix:{socket_path}", "/fcgi-ping", timeout=5)
            return reply.status_code == 200
        wait_for(serving, timeout, lambda: f"the master to serve:\n{self.text()}")

    def exec(self, argv: List[str], env: Optional[Dict[str, str]] = None,
             timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the master's PID and mount namespaces (``docker exec``,
        ``kubectl exec``): there the pidfile's pid 1 is the master."""
        nsenter = require_program("nsenter")
        return subprocess.run([nsenter, f"--target={self.master_pid}", "--pid", "--mount",
                               *argv], env=env if env is not None else self.env,
                              cwd=str(self.cwd), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    def signal(self, sig: int) -> None:
        """Signal the master itself, as the container runtime does (not ``unshare``)."""
        self.master().send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """The exit status ``unshare`` passes on: the namespace's PID 1's."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the master did not exit in {timeout:.0f} s:\n"
                                 f"{self.text()}") from None

    def cleanup(self) -> bool:
        """Kill what is left; True if anything was. SIGKILL to the namespace's PID 1 makes
        the kernel kill every process in the namespace."""
        if self.proc is None:
            return False
        killed = False
        try:
            self.master().send_signal(signal.SIGKILL)
            killed = True
        except psutil.Error:
            pass
        if self.proc.poll() is None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                killed = True
        return killed
