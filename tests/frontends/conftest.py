"""Fixtures of the deployment tests: a private site tree and the processes started in it.

Both are per test module: a module starts its web servers and fcgi-manager instances
once and runs several checks against them. At the end, every process started (and every
descendant, listed before anything is stopped) is stopped gracefully, then checked by PID;
a process still running then is killed, and the module's last test fails with its name.

A test that is skipped or fails half-way has what it started itself stopped at once, by
PID; that is not a leak (a skip never turns into an error at teardown).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.support import ended_early

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
def procs(site: Site, request: pytest.FixtureRequest) -> Iterator[Procs]:
    tracker = Procs()
    yield tracker
    leaked = tracker.cleanup()
    # A module fixture that was skipped or failed half-way left what it had started.
    module = request.node
    excused = any(ended_early(item) for item in request.session.items
                  if item.getparent(pytest.Module) is module)
    assert not leaked or excused, \
        f"left running after every graceful stop (killed now): {leaked}"


@pytest.fixture(autouse=True)
def _stop_what_a_stopped_test_left(request: pytest.FixtureRequest) -> Iterator[None]:
    if "procs" not in request.fixturenames:
        yield
        return
    tracker: Procs = request.getfixturevalue("procs")
    mark = tracker.checkpoint()
    yield
    if ended_early(request.node):
        tracker.release(mark)
