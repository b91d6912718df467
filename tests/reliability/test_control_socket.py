"""Item 6: the control socket's security and robustness.

* It is mode 0600; another uid (``nobody``) cannot connect, and even with the mode opened
  up, SO_PEERCRED refuses it: "permission denied", and nothing changes.
* Oversized, truncated, non-JSON, deeply nested, unknown-command and wrong-typed messages
  get an error reply and change nothing (same master, generation and worker PIDs).
* A failure inside the master (injected) is logged, and never written to a client.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import pytest
from support import in_ci, pid_alive, wait_for

from .support import figure, rel_manager, status, wait_pool, worker_pids

NOBODY = 65534


def _frame(obj: Any) -> bytes:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack("!I", len(body)) + body


def _exchange(path: str, data: bytes, half_close: bool = True,
              timeout: float = 10.0) -> Tuple[Optional[Dict[str, Any]], str, float]:
    """Send ``data``; (decoded reply or None, how the connection ended, seconds)."""
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            return None, f"send failed: {exc!r}", time.monotonic() - started
        raw = b""
        how = "closed"
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                how = "timeout"
                break
            except OSError as exc:
                how = f"error {exc!r}"
                break
            if not chunk:
                break
            raw += chunk
    reply = None
    if len(raw) >= 4:
        try:
            reply = json.loads(raw[4:4 + struct.unpack("!I", raw[:4])[0]])
        except ValueError:
            reply = {"undecodable": raw[:200].decode("latin-1")}
    return reply, how, time.monotonic() - started


def _as_nobody(action: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """Run ``action`` in a forked child as uid/gid 65534; its JSON result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                result = action()
            except Exception as exc:  # reported to the parent
                result = {"exception": repr(exc)}
            os.write(w, json.dumps(result).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        data = os.read(r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    _, code = os.waitpid(pid, 0)
    assert code == 0, f"the child running as nobody failed ({code})"
    return json.loads(b"".join(chunks))


def _snapshot(manager: Any) -> Tuple[int, int, list, int]:
    data = status(manager)
    return data["pid"], data["generation"], worker_pids(data), data["target_workers"]


@pytest.fixture
def open_dir() -> Any:
    """A directory every user may traverse (pytest's own tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="fcgi-rel-"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_another_uid_is_refused(make_manager: Any, open_dir: Path) -> None:
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("CI runs the suite as root: this test needs it to switch uid")
        pytest.skip("needs root to act as another uid (nobody)")  # not in CI: failed above
    ctl = open_dir / "app.ctl"
    manager = rel_manager(make_manager, manager={"control": str(ctl)})
    manager.control = ctl
    manager.start()
    wait_pool(manager, 2)
    before = _snapshot(manager)
    mode = stat.S_IMODE(os.stat(ctl).st_mode)
    stop = _frame({"id": 1, "command": "stop", "args": {"now": True}})
    scale = _frame({"id": 2, "command": "scale", "args": {"value": "+1"}})

    def attempt(data: bytes) -> Callable[[], Dict[str, Any]]:
        def run() -> Dict[str, Any]:
            try:
                reply, how, _ = _exchange(str(ctl), data, timeout=5)
            except OSError as exc:
                return {"connect": repr(exc)}
            return {"reply": reply, "how": how}
        return run

    as_0600 = _as_nobody(attempt(stop))
    # Defence in depth: even with the socket file opened to everyone, SO_PEERCRED refuses.
    os.chmod(ctl, 0o666)
    try:
        peercred_stop = _as_nobody(attempt(stop))
        peercred_scale = _as_nobody(attempt(scale))
    finally:
        os.chmod(ctl, 0o600)
    after = _snapshot(manager)
    refused_lines = manager.log_text().count("refused a control connection from uid 65534")
    text = "; ".join([
        figure("control socket mode", oct(mode)),
        figure("nobody vs the 0600 socket", as_0600),
        figure("nobody vs a 0666 socket: stop", peercred_stop),
        figure("nobody vs a 0666 socket: scale +1", peercred_scale),
        figure("refusals logged", refused_lines),
    ])
    assert mode == 0o600, text
    assert "PermissionError" in as_0600.get("connect", ""), text
    for outcome in (peercred_stop, peercred_scale):
        reply = outcome.get("reply")
        assert reply is None or (reply.get("ok") is False
                                 and reply.get("error") == "permission denied"), text
    assert after == before, text
    assert refused_lines == 2, text


MALFORMED: Dict[str, Tuple[bytes, bool]] = {
    # name: (bytes sent, half-close after sending)
    "100 MB length prefix": (struct.pack("!I", 100_000_000) + b'{"command": "stop"', True),
    "truncated": (struct.pack("!I", 100) + b'{"command"', True),
    "not JSON": (_frame(b"stop now please"), True),
    "not UTF-8": (_frame(b'{"command": "st\xffop"}'), True),
    "deeply nested": (_frame(b"[" * 60000), True),
    "a JSON list": (_frame(["stop"]), True),
    "unknown command": (_frame({"command": "shutdown", "args": {}}), True),
    "command of the wrong type": (_frame({"command": ["stop"], "args": {}}), True),
    "args of the wrong type": (_frame({"command": "stop", "args": ["now"]}), True),
    "id of the wrong type": (_frame({"id": {"a": 1}, "command": "stop"}), True),
    "scale value of the wrong type": (_frame({"command": "scale", "args": {"value": [1]}}),
                                      True),
    "scale to -5": (_frame({"command": "scale", "args": {"value": "-5"}}), True),
}


def test_malformed_messages_get_an_error_and_change_nothing(make_manager: Any) -> None:
    manager = rel_manager(make_manager)
    manager.start()
    wait_pool(manager, 2)
    before = _snapshot(manager)
    outcomes: Dict[str, Any] = {}
    for name, (data, half_close) in MALFORMED.items():
        reply, how, seconds = _exchange(str(manager.control), data, half_close)
        outcomes[name] = {"error": (reply or {}).get("error", reply), "ok": (reply or {}).get(
            "ok"), "how": how, "s": round(seconds, 3)}
    # A peer that sends part of a message and then nothing: the master gives up on it.
    held, held_how, held_for = _exchange(str(manager.control), struct.pack("!I", 100) + b"{",
                                         half_close=False)
    after = _snapshot(manager)
    text = "; ".join([
        figure("malformed control messages", outcomes),
        figure("a silent half-message", f"{held_how} after {held_for:.2f} s, reply {held}"),
    ])
    for name, outcome in outcomes.items():
        assert outcome["ok"] is False and isinstance(outcome["error"], str), (name, text)
        assert outcome["s"] < 1.0, (name, text)
    assert held_how == "closed" and held_for < 5, text
    assert after == before, text


def test_a_crash_in_the_master_is_logged_and_never_sent_to_a_client(make_manager: Any) -> None:
    """If the master itself fails, its traceback goes to the log, its workers exit, and a
    new ``start`` works. (It used to be written to the long-closed start-up handshake
    descriptor -- by then reused, here by the control client's connection.)"""
    manager = rel_manager(make_manager, app="faulty_master:app")
    manager.start()
    before = wait_pool(manager, 2)
    reply, how, _ = _exchange(str(manager.control),
                              _frame({"command": "ping", "args": {"inject_fault": True}}))
    wait_for(lambda: not pid_alive(before["pid"]), 10, "the master to exit")
    wait_for(lambda: not any(pid_alive(p) for p in worker_pids(before)), 10,
             "its workers to exit")
    log = manager.log_text()
    again = manager.start(check=False)
    text = "; ".join([
        figure("master crash: what the control client got", f"{reply!r} ({how})"),
        figure("master crash: logged", "the master crashed" in log),
        figure("master crash: start again", again.returncode),
    ])
    assert reply is None, text
    assert "the master crashed" in log and "a fault injected into the master" in log, text
    assert again.returncode == 0, (text, again)
    manager.record()
