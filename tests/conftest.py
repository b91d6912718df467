"""Fixtures shared by the whole suite (helpers live in ``support.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from support import Manager, Nginx  # noqa: E402

# Every master the suite starts inherits this: an illegal worker-state or phase change in
# the supervisor raises (a bug) instead of being logged, so each test that drives a master
# also checks the transition tables.
os.environ["FCGI_MANAGER_STRICT"] = "1"


@pytest.fixture(scope="session", autouse=True)
def private_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Masters started by the suite register in a private registry (see
    ``fcgi_manager.registry``), not in this user's real one."""
    path = tmp_path_factory.mktemp("registry")
    path.chmod(0o700)
    old = os.environ.get("FCGI_MANAGER_REGISTRY")
    os.environ["FCGI_MANAGER_REGISTRY"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FCGI_MANAGER_REGISTRY", None)
    else:
        os.environ["FCGI_MANAGER_REGISTRY"] = old


@pytest.fixture
def make_manager(tmp_path: Path) -> Iterator[Callable[..., Manager]]:
    """Build :class:`support.Manager` instances; every one is stopped at teardown and
    anything it started that is still alive is killed by PID."""
    made: List[Manager] = []

    def make(*args: Any, tmp: Path = tmp_path, **kwargs: Any) -> Manager:
        manager = Manager(tmp, *args, **kwargs)
        made.append(manager)
        return manager

    yield make
    leaked = []
    for manager in reversed(made):
        leaked += manager.cleanup()
    assert not leaked, f"processes left running after the test (killed now): {leaked}"


@pytest.fixture
def make_nginx(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """Start private nginx instances (see :class:`support.Nginx`); stopped at teardown."""
    made: List[Nginx] = []

    def make(upstream: str, **kwargs: Any) -> Nginx:
        nginx = Nginx(tmp_path / f"n{len(made)}", upstream, **kwargs)
        made.append(nginx)
        return nginx.start()

    yield make
    for nginx in reversed(made):
        nginx.stop()


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start ``test_wsgi.WorkerProcess`` instances (one real worker loop around an app,
    fed by the test); every one is stopped at teardown."""
    from test_wsgi import WorkerProcess

    started: List[Any] = []

    def start(app: Callable, **options: Any) -> Any:
        w = WorkerProcess(tmp_path, app, **options)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
