"""The pool parent's rules without processes: conflicts, reload plans, restarts, fatal."""

from __future__ import annotations

import pytest

from fcgi_manager.master.pooldir import last_error
from fcgi_manager.rules.pooldir import (
    App,
    AppFile,
    AppState,
    plan_reload,
    refuse_conflicts,
    stop_deadline,
)


def _file(name: str, path: str = "", digest: str = "d", sock: str = "") -> AppFile:
    return AppFile(name=name, path=path or f"/p/{name}.toml", digest=digest,
                   claims=(("socket", sock or f"unix:/s/{name}.sock"),
                           ("pidfile", f"/s/{name}.pid")))


def test_two_files_on_one_socket_are_both_refused_the_rest_kept() -> None:
    ok, refused = refuse_conflicts([_file("a", sock="unix:/x"), _file("b", sock="unix:/x"),
                                    _file("c")])
    assert [f.name for f in ok] == ["c"]
    assert {e.name for e in refused} == {"a", "b"}
    assert all("also claimed by" in e.error and "both are refused" in e.error
               for e in refused)


def test_one_name_in_two_files_is_refused() -> None:
    ok, refused = refuse_conflicts([_file("a", path="/p/1.toml"),
                                    _file("a", path="/p/2.toml", sock="unix:/other")])
    assert not ok and len(refused) == 2


def test_reload_plan_starts_stops_reloads_and_keeps() -> None:
    known = {"same": _file("same"), "edited": _file("edited"), "gone": _file("gone"),
             "moved": _file("moved"), "broken": _file("broken")}
    now = [_file("same"), _file("edited", digest="new"), _file("moved", path="/p/m2.toml"),
           _file("fresh")]
    plan = plan_reload(known, now, broken_names=["broken"])
    assert plan.start == ("fresh",)
    assert plan.stop == ("gone",)  # "broken" has a file: it keeps running
    assert plan.reload == ("edited",)
    assert plan.restart == ("moved",)
    assert set(plan.keep) == {"same", "broken"}


def _running(app: App, now: float = 0.0, pid: int = 100) -> None:
    app.start()
    app.spawned(pid, now)
    app.notified("READY=1\nMAINPID=100")


def test_ready_master_killed_is_restarted_at_once() -> None:
    app = App(_file("a"))
    _running(app)
    assert app.state is AppState.RUNNING
    app.exited(60.0, None, "was killed by signal 9 (SIGKILL)", "")
    assert app.state is AppState.STARTING and app.due(60.0)
    assert "SIGKILL" in app.error


def test_import_failures_back_off_then_fatal_with_the_error() -> None:
    app = App(_file("a"))
    app.start()
    now = 0.0
    delays = []
    while app.state is not AppState.FATAL:
        assert app.due(now), (now, app)
        app.spawned(1, now)
        now += 0.5
        app.exited(now, 1, "exited with code 1", "ModuleNotFoundError: No module named 'x'")
        if app.state is AppState.STARTING:
            delays.append(round(app.next_start_at - now, 3) if app.next_start_at else 0.0)
            now = max(now, app.next_start_at)
    assert delays == [0.0, 0.2, 0.4, 0.8]  # the workers' backoff
    assert "No module named 'x'" in app.error and not app.wanted


def test_exit_0_after_ready_is_a_stop_not_a_crash() -> None:
    app = App(_file("a"))
    _running(app)
    app.notified("STOPPING=1")
    app.exited(10.0, 0, "exited with code 0", "")
    assert app.state is AppState.STOPPED and not app.due(99.0)


def test_stop_then_reload_state_names() -> None:
    app = App(_file("a"))
    _running(app)
    app.notified("RELOADING=1")
    assert app.state.shown == "reloading"
    app.notified("READY=1")
    app.stop()
    assert app.state.shown == "stopped"
    app.exited(5.0, 0, "exited with code 0", "")
    assert app.state is AppState.STOPPED


def test_restart_after_stop_starts_again() -> None:
    app = App(_file("a"))
    _running(app)
    app.stop()
    app.restart_after_stop = True
    app.exited(1.0, 0, "exited with code 0", "")
    assert app.state is AppState.STARTING and app.due(1.0)


def test_stop_deadline_is_the_largest_graceful_timeout() -> None:
    apps = [App(AppFile("a", "/a", "d", graceful_timeout=3)),
            App(AppFile("b", "/b", "d", graceful_timeout=40))]
    assert stop_deadline(apps, margin=10) == 50


@pytest.mark.parametrize("lines, expected", [
    (["Traceback (most recent call last):", "  File x", "ImportError: boom",
      "Error: cannot import the app module 'm': ImportError: boom", "hint: fix it"],
     "cannot import the app module 'm': ImportError: boom"),
    (["Traceback (most recent call last):", "ValueError: bad", ""], "ValueError: bad"),
    (["just a line"], "just a line"),
    ([], ""),
])
def test_last_error_picks_the_line_that_says_why(lines: list, expected: str) -> None:
    assert last_error(lines) == expected
