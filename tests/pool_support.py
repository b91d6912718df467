"""A pool directory for a test: app files, the parent's CLI, nginx in front, load, cleanup.

The directory is one the unprivileged user can read (pytest's tmp_path is root-only), so
one app can run as ``nobody``. Every process the pool starts (parent, masters, workers)
is recorded by PID and killed by PID if a test leaves it behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

import psutil

from tests.support import (
    FASTCGI_PARAMS,
    CLIResult,
    Nginx,
    ProcessTracker,
    fcgi_manager,
    http_request,
    render_toml,
    wait_for,
)

APP = textwrap.dedent('''
    """One pool app: says its name, pid and uid; ?s=N sleeps N seconds first."""
    import json
    import os
    import time
    from urllib.parse import parse_qs

    NAME = os.environ.get("POOL_APP", "?")
    VERSION = os.environ.get("POOL_VERSION", "1")


    def app(environ, start_response):
        seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("s", ["0"])[0])
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.02)
        body = json.dumps({"app": NAME, "version": VERSION, "pid": os.getpid(),
                           "uid": os.getuid()}).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]
''')


class Pool:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fcgi-pool-"))
        self.root.chmod(0o1777)  # sticky, like /tmp: readable by the app's user
        self.dir = self.root / "pool.d"
        self.dir.mkdir()
        self.dir.chmod(0o755)
        (self.root / "poolapp.py").write_text(APP)
        (self.root / "poolapp.py").chmod(0o644)
        self.pidfile = self.root / "pool.pid"
        self.log = self.root / "pool.log"
        self.tracker = ProcessTracker()

    # -- files --------------------------------------------------------------------

    def socket(self, name: str) -> Path:
        return self.root / f"{name}.sock"

    def sections(self, name: str, module: str = "poolapp:app", count: int = 2,
                 **extra: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
        sections: Dict[str, Dict[str, Any]] = {
            "app": {"module": module, "chdir": str(self.root), "path": [str(self.root)],
                    "env": {"POOL_APP": name}},
            "listen": {"bind": f"unix:{self.socket(name)}"},
            "workers": {"count": count, "graceful_timeout": 15},
            "manager": {"pidfile": str(self.root / f"{name}.pid"),
                        "log": str(self.root / f"{name}.log")},
        }
        for section, values in extra.items():
            sections.setdefault(section, {}).update(values)
        return sections

    def write(self, name: str, file: Optional[str] = None, **kwargs: Any) -> Path:
        path = self.dir / f"{file or name}.toml"
        path.write_text(render_toml(self.sections(name, **kwargs)))
        return path

    # -- the CLI --------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 120.0) -> CLIResult:
        verb, rest = args[0], list(args[1:])
        out = fcgi_manager(["-c", str(self.dir), verb, "--pidfile", str(self.pidfile),
                            *rest], timeout=timeout, tracker=self.tracker)
        self.track()
        return out

    def start(self) -> CLIResult:
        out = self.cli("start")
        assert out.returncode == 0, out
        return out

    def status(self, *names: str) -> Dict[str, Any]:
        out = self.cli("status", "--json", *names)
        assert out.returncode in (0, 3), out
        return json.loads(out.stdout)

    def apps(self) -> Dict[str, Dict[str, Any]]:
        return {a["name"]: a for a in self.status()["apps"]}

    def parent_pid(self) -> int:
        return int(self.pidfile.read_text().split()[0])

    def track(self) -> None:
        """Record the parent and everything under it (masters, zygotes, workers)."""
        try:
            pid = self.parent_pid()
            proc = psutil.Process(pid)
            self.tracker.add(pid)
            self.tracker.add_all(c.pid for c in proc.children(recursive=True))
        except (OSError, ValueError, psutil.Error):
            pass

    def wait_state(self, name: str, state: str, timeout: float = 60.0) -> Dict[str, Any]:
        return wait_for(lambda: (self.apps().get(name) or {}).get("state") == state
                        and self.apps()[name], timeout, f"{name} {state}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> List[int]:
        self.track()
        if self.pidfile.exists():
            fcgi_manager(["-c", str(self.dir), "stop", "--pidfile", str(self.pidfile)],
                         timeout=90)
        leaked = [p for p in self.tracker.alive()]
        self.tracker.kill_all()
        shutil.rmtree(self.root, ignore_errors=True)
        return leaked


class PoolNginx(Nginx):
    """nginx with one location per app: ``/NAME/...`` goes to that app's socket."""

    def __init__(self, tmp: Path, pool: Pool, names: List[str]) -> None:
        extra = "".join(f"""
        location /{n}/ {{
            include {FASTCGI_PARAMS};
            fastcgi_param SCRIPT_NAME "";
            fastcgi_param PATH_INFO $fastcgi_script_name;
            fastcgi_pass unix:{pool.socket(n)};
        }}
""" for n in names)
        super().__init__(tmp, f"unix:{pool.socket(names[0])}", extra_locations=extra)


class Load:
    """Threads sending requests to ``/NAME/`` through nginx until stopped; every answer
    that is not a 200 from that app counts as a failure."""

    def __init__(self, port: int, names: List[str], threads_each: int = 2,
                 query: str = "") -> None:
        self.port = port
        self.stop_event = threading.Event()
        self.ok: Dict[str, int] = {n: 0 for n in names}
        self.failures: List[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(n, query), daemon=True)
                        for n in names for _ in range(threads_each)]

    def _run(self, name: str, query: str) -> None:
        while not self.stop_event.is_set():
            try:
                r = http_request(self.port, "GET", f"/{name}/x{query}", timeout=30)
                good = r.status == 200 and r.json()["app"] == name
                what = f"{name}: {r.status} {r.body[:200]!r}"
            except Exception as exc:  # noqa: BLE001 - any failure is counted
                good, what = False, f"{name}: {exc!r}"
            with self.lock:
                if good:
                    self.ok[name] += 1
                else:
                    self.failures.append(what)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        wait_for(lambda: all(self.ok.values()), 30, "the first answers under load")
        return self

    def served(self) -> Dict[str, int]:
        with self.lock:
            return dict(self.ok)

    def __exit__(self, *exc: Any) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(60)


def can_drop_privileges() -> bool:
    return os.geteuid() == 0
