"""Fixtures shared by the whole suite (helpers live in ``support.py``)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, FrozenSet, Iterator, List, Optional, Tuple

import pytest

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from support import (  # noqa: E402
    PROGRAMS,
    Manager,
    Nginx,
    ProcessTracker,
    ended_early,
    find_program,
    in_ci,
    need_root,
)

# Every master the suite starts inherits this: an illegal worker-state or phase change in
# the supervisor raises (a bug) instead of being logged, so each test that drives a master
# also checks the transition tables.
os.environ["FCGI_MANAGER_STRICT"] = "1"


# -- what a test needs, resolved before any of its fixtures runs -------------------------
#
# ``@pytest.mark.needs("nginx", "cgi-fcgi")`` on a test, class or module (``pytestmark``)
# declares the system programs it drives, ``modules=("name",)`` the optional Python modules
# it imports. A test missing one is skipped before it starts anything (it fails in CI,
# which installs everything). Every test that names a program also gets the marker
# ``needs_program``: ``-m needs_program`` selects every test that can need one.

# Fixtures that start a program: a test using one needs it without saying so again.
FIXTURE_NEEDS = {"make_nginx": ("nginx",)}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs(*programs, modules=()): the system programs (and optional Python "
        "modules) the test drives; skipped before it starts when one is missing, failed in CI")
    config.addinivalue_line(
        "markers", "needs_program: set on every test that names a program in needs(...)")


def needs_of(item: pytest.Item) -> Tuple[FrozenSet[str], FrozenSet[str]]:
    """(programs, modules) the test declared, with what its fixtures imply."""
    programs = set()
    modules = set()
    for mark in item.iter_markers("needs"):
        programs.update(mark.args)
        modules.update(mark.kwargs.get("modules", ()))
    for fixture in getattr(item, "fixturenames", ()):
        programs.update(FIXTURE_NEEDS.get(fixture, ()))
    return frozenset(programs), frozenset(modules)


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    for item in items:
        programs = needs_of(item)[0]
        unknown = sorted(programs - set(PROGRAMS))
        if unknown:
            raise pytest.UsageError(
                f"{item.nodeid}: needs {', '.join(unknown)}: add it to PROGRAMS in "
                "tests/support.py (the README and .ci/run list the same programs)")
        if programs:
            item.add_marker(pytest.mark.needs_program)


def _declare(programs: Optional[FrozenSet[str]]) -> None:
    # The helpers' safety net (require_program) checks against this; the frontends
    # import this file's helpers as ``tests.support``, a second module object.
    for name in ("support", "tests.support"):
        module = sys.modules.get(name)
        if module is not None:
            module.declared = programs


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    programs, modules = needs_of(item)
    _declare(programs)
    missing = sorted(p for p in programs if find_program(p) is None)
    missing += sorted(m for m in modules if importlib.util.find_spec(m) is None)
    if missing:
        reason = f"needs {', '.join(missing)} (not installed)"
        if in_ci():
            pytest.fail(f"{reason}; CI=true: the CI job must install it", pytrace=False)
        pytest.skip(reason)  # by hand only: in CI it failed above


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when in ("setup", "call") and (report.skipped or report.failed):
        item.fcgi_ended_early = True  # see support.ended_early


def pytest_runtest_logfinish() -> None:
    _declare(None)


@pytest.fixture(scope="session", autouse=True)
def private_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Masters started by the suite register in a private registry (see
    ``fcgi_manager.master.registry``), not in this user's real one."""
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
def make_manager(tmp_path: Path,
                 request: pytest.FixtureRequest) -> Iterator[Callable[..., Manager]]:
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
    # A skipped or failed test stopped half-way: what it left is stopped, not a leak.
    assert not leaked or ended_early(request.node), \
        f"processes left running after the test (killed now): {leaked}"


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


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A sticky directory (like /tmp) the unprivileged user can read and write in:
    pytest's tmp_path is root-only, and fcgi-manager refuses 0777 without the sticky bit."""
    need_root("dropping privileges needs root")
    path = Path(tempfile.mkdtemp(prefix="fcgi-shared-"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tracker() -> Iterator[ProcessTracker]:
    """Processes a test starts by hand (decoys, a fake master): killed by PID at the end."""
    t = ProcessTracker()
    yield t
    t.kill_all()
