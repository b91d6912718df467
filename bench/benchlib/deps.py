"""Find, and when allowed install, what a benchmark run needs.

- nginx and wrk are Debian packages: installed with apt-get only when missing and when the
  harness runs as root; otherwise the harness says what to install and stops.
- The peers (flup, uWSGI, gunicorn) go into a throwaway virtualenv, ``bench/.venv-peers``,
  so that they never mix with the project's own environment. uWSGI is compiled by pip.
- fcgi-manager itself runs from the current interpreter and this checkout, so what is
  measured is the code in the working tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

SYSTEM_TOOLS = {"nginx": "nginx", "wrk": "wrk"}  # command -> Debian package
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
PEER_PACKAGES = {"flup": "flup", "uwsgi": "uWSGI", "gunicorn": "gunicorn"}
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


class SetupError(RuntimeError):
    """Something the run needs is missing and could not be installed."""


@dataclass(frozen=True)
class Peers:
    """Where the peers' virtualenv and its programs are."""

    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


def find_tool(name: str) -> Optional[str]:
    """The path of ``name`` on PATH or in an sbin directory (nginx lives in /usr/sbin)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in SBIN_DIRS:
        candidate = Path(directory) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _apt_install(packages: List[str]) -> None:
    """apt-get install ``packages`` without letting their scripts start system services."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    guard = not POLICY_RC_D.exists()
    if guard:  # the Debian way to tell maintainer scripts not to start the nginx service
        POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
    try:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
            env=env,
            check=True,
        )
    except subprocess.CalledProcessError as exc:
        raise SetupError(f"apt-get failed ({exc}); install by hand: {' '.join(packages)}") from exc
    finally:
        if guard:
            POLICY_RC_D.unlink()


def ensure_system_tools(install: bool) -> Dict[str, str]:
    """Paths of nginx and wrk, installing them with apt-get when missing and allowed."""
    missing = [name for name in SYSTEM_TOOLS if find_tool(name) is None]
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing with apt-get: {' '.join(missing)}", flush=True)
        _apt_install([SYSTEM_TOOLS[name] for name in missing])
    tools = {name: find_tool(name) for name in SYSTEM_TOOLS}
    still_missing = sorted(name for name, path in tools.items() if path is None)
    if still_missing:
        packages = " ".join(SYSTEM_TOOLS[name] for name in still_missing)
        raise SetupError(
            f"missing: {', '.join(still_missing)}; install them with "
            f"`sudo apt-get install {packages}` (Debian/Ubuntu) and run again"
        )
    return {name: str(path) for name, path in tools.items()}


def _peer_missing(peers: Peers, peer: str) -> bool:
    """True when ``peer`` is not usable from the virtualenv yet."""
    if peer == "uwsgi":
        argv = [str(peers.bin("uwsgi")), "--version"]
    else:
        argv = [str(peers.python), "-c", f"import {peer}"]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return True
    return done.returncode != 0


def ensure_peers(venv_dir: Path, wanted: Iterable[str], install: bool) -> Peers:
    """The peers' virtualenv with every ``wanted`` peer in it, creating what is missing."""
    peers = Peers(venv_dir)
    wanted = sorted(set(wanted))
    if not wanted:
        return peers
    if not peers.python.exists():
        if not install:
            raise SetupError(f"no virtualenv at {venv_dir}; run without --no-install")
        print(f"creating {venv_dir}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(venv_dir)
    missing = [peer for peer in wanted if _peer_missing(peers, peer)]
    if missing and not install:
        raise SetupError(f"missing in {venv_dir}: {', '.join(missing)}")
    if missing:
        packages = [PEER_PACKAGES[peer] for peer in missing]
        print(f"installing into {venv_dir}: {' '.join(packages)}", flush=True)
        pip = [str(peers.python), "-m", "pip", "install", "-q", *packages]
        if subprocess.run(pip).returncode != 0 or any(_peer_missing(peers, p) for p in missing):
            raise SetupError(f"could not install {' '.join(packages)} into {venv_dir}")
    return peers


def _first_line(argv: List[str]) -> str:
    """The first line a version command prints (nginx prints its version on stderr)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def versions(tools: Dict[str, str], peers: Optional[Peers], peer_names: Iterable[str]) -> Dict:
    """Versions of everything measured, for the report."""
    found: Dict[str, str] = {
        "python": sys.version.split()[0],
        # "nginx version: nginx/1.22.1" and "wrk debian/4.1.0-3 [epoll] Copyright ..."
        "nginx": _first_line([tools["nginx"], "-v"]).rsplit("/", 1)[-1],
        "wrk": " ".join(_first_line([tools["wrk"], "-v"]).split()[1:3]),
    }
    for peer in sorted(set(peer_names)):
        if peers is None:
            continue
        if peer == "uwsgi":
            found["uwsgi"] = _first_line([str(peers.bin("uwsgi")), "--version"])
        else:
            code = f"import importlib.metadata as m; print(m.version({PEER_PACKAGES[peer]!r}))"
            found[peer] = _first_line([str(peers.python), "-c", code])
    return found
