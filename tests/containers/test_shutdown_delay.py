"""``[manager] shutdown_delay``: on a stop request (TERM, QUIT, ``stop``) the ping path
answers 503 ``draining`` at once while every other request is still served for that long;
then the graceful stop. ``stop --now`` and INT skip the delay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable

import pytest
from support import Manager, fcgi_manager, fcgi_request, pid_alive, wait_for

from .support import child_env

DELAY = 4.0


def _manager(make_manager: Callable[..., Manager], delay: float = DELAY) -> Manager:
    manager = make_manager("combo:app", count=2, status={"ping_path": "/fcgi-ping"},
                           manager={"shutdown_delay": delay})
    manager.start()
    return manager


def _ping(manager: Manager):
    return fcgi_request(manager.bind, "/fcgi-ping", timeout=10)


def _draining(manager: Manager) -> bool:
    reply = _ping(manager)
    return reply.status_code == 503 and reply.body.strip() == b"draining"


@pytest.mark.parametrize("how", ["stop", "SIGTERM", "SIGQUIT"])
def test_ping_answers_503_while_requests_are_served(
        make_manager: Callable[..., Manager], how: str) -> None:
    manager = _manager(make_manager)
    reply = _ping(manager)
    assert (reply.status_code, reply.body.strip()) == (200, b"pong"), reply
    pid = manager.pid()
    began = time.monotonic()
    stopper = None
    if how == "stop":
        stopper = subprocess.Popen(
            [sys.executable, "-m", "fcgi_manager", "-c", str(manager.config), "stop"],
            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        manager.tracker.add(stopper.pid)
    else:
        manager.tracker.add(pid)
        os.kill(pid, getattr(signal, how))
    wait_for(lambda: _draining(manager), 2.0, "the ping path to answer 503 draining")
    answered_503_after = time.monotonic() - began
    assert answered_503_after < DELAY / 2, answered_503_after
    # Everything else is still served while draining, on new connections too.
    served = 0
    while time.monotonic() - began < DELAY - 2.0:
        reply = fcgi_request(manager.bind, f"/hello/during-{served}", timeout=10)
        assert reply.status_code == 200, reply
        served += 1
    assert served > 5
    assert _draining(manager)
    assert pid_alive(pid), "the master is still there during the delay"
    wait_for(lambda: not pid_alive(pid), DELAY + 15, "the master to stop after the delay")
    took = time.monotonic() - began
    assert took >= DELAY, f"stopped after {took:.1f} s, before shutdown_delay ({DELAY} s)"
    log = manager.log_text()
    assert f"draining: the ping path answers 503 for {DELAY:.1f} s" in log, log
    assert "shutdown_delay is over: stopping gracefully" in log, log
    if stopper is not None:
        out, err = stopper.communicate(timeout=30)
        assert stopper.returncode == 0, (out, err)
        assert f"draining for {DELAY:.0f} s".encode() in out, (out, err)
        assert b"fcgi-manager stopped" in out, (out, err)


def test_stop_now_skips_the_delay(make_manager: Callable[..., Manager]) -> None:
    manager = _manager(make_manager, delay=60.0)
    pid = manager.pid()
    result = manager.stop(now=True)
    assert result.seconds < 15, result
    assert "draining" not in result.stdout, result
    assert not pid_alive(pid)
    assert "draining" not in manager.log_text()


def test_int_cuts_the_drain_short(make_manager: Callable[..., Manager]) -> None:
    manager = _manager(make_manager, delay=60.0)
    pid = manager.pid()
    manager.tracker.add(pid)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: _draining(manager), 2.0, "the ping path to answer 503 draining")
    # A second TERM changes nothing; a reload is refused; INT stops now.
    os.kill(pid, signal.SIGTERM)
    manager.wait_log("already draining: the graceful stop begins in")
    reload = manager.cli("reload")
    assert reload.returncode == 1 and "stopping" in reload.stderr, reload
    assert _draining(manager)
    began = time.monotonic()
    os.kill(pid, signal.SIGINT)
    wait_for(lambda: not pid_alive(pid), 10, "the master to stop at once on INT")
    assert time.monotonic() - began < 10


def test_stop_help_tells_about_the_drain() -> None:
    result = fcgi_manager(["stop", "--help"], timeout=30)
    assert result.returncode == 0, result
    text = " ".join(result.stdout.split())
    assert 'the ping path answers 503 "draining"' in text and "manager.shutdown_delay" in text
    assert "--now stop within 5 s (no shutdown_delay)" in text
