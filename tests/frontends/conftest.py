"""Fixtures of the deployment tests: a private site tree and the processes started in it.

Both are per test module: a module starts its web servers and fcgi-manager instances
once and runs several checks against them. At the end, every process started (and every
descendant, listed before anything is stopped) is stopped gracefully, then checked by PID;
a process still running then is killed, and the module's last test fails with its name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from .support import Procs, Site


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    # Not pytest's tmp_path: its parent is private to us (0700), and web servers running
    # as www-data must reach the app and the sockets.
    root = Path(tempfile.mkdtemp(prefix="fcgi-frontends-", dir="/tmp"))
    yield Site(root)
    if not os.environ.get("FCGI_MANAGER_KEEP_TMP"):
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def procs(site: Site) -> Iterator[Procs]:
    tracker = Procs()
    yield tracker
    leaked = tracker.cleanup()
    assert not leaked, f"left running after every graceful stop (killed now): {leaked}"
