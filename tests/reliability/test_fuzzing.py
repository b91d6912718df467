"""Item 1: the control protocol under fuzzing, and a live pool under random FastCGI input.

* Property tests: arbitrary bytes (and arbitrary JSON) into ``control.decode_request`` and
  ``control.read_message`` raise nothing but ProtocolError.
* ``control.MessageReader`` (the master's non-blocking framing) fed any bytes in any
  pieces agrees with ``read_message``.
* ``tests/fuzz/fuzz_control.py`` runs for a few seconds in-process: no crash; it also
  catches a framing bug that shows only under slow, partial delivery.
* 300 random or mutated FastCGI byte strings, each on its own connection, against a running
  pool while a well-behaved client loops: that client sees every request succeed and no
  worker crashes.
"""

from __future__ import annotations

import importlib.util
import json
import random
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, List

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fcgi_manager.errors import ProtocolError
from fcgi_manager.wire import control

from .support import LoadClient, connect, figure, rel_manager, status, worker_pids

FUZZ_DIR = Path(__file__).resolve().parents[1] / "fuzz"


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, FUZZ_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


fuzz_control = _load("fuzz_control")
fuzz_protocol = _load("fuzz_protocol")

PROPS = settings(max_examples=400, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20,
)
requests = st.fixed_dictionaries(
    {},
    optional={"id": json_values, "command": st.sampled_from(control.COMMANDS) | json_values,
              "args": st.dictionaries(st.sampled_from(["now", "value", "x"]), json_values,
                                      max_size=3) | json_values},
)


def _decode_or_protocol_error(data: bytes) -> None:
    try:
        req_id, command, args = control.decode_request(data)
    except ProtocolError:
        return
    assert command in control.COMMANDS
    assert isinstance(args, dict)
    assert req_id is None or isinstance(req_id, (int, str))


@PROPS
@given(st.binary(max_size=300))
@example(b"[" * 60000)
@example(b'{"command": "status", "args": ' + b"[" * 30000 + b"]" * 30000 + b"}")
@example(b'{"id": 1, "command": "status", "args": {}}\xff')
@example(b'{"command": "status", "id": ' + b"9" * 5000 + b"}")
@example(b'"\\ud800"')
def test_decode_request_raises_only_protocol_error(data: bytes) -> None:
    _decode_or_protocol_error(data)


@PROPS
@given(requests)
def test_decode_request_on_any_json_object(obj: dict) -> None:
    _decode_or_protocol_error(json.dumps(obj).encode())


@PROPS
@given(st.binary(max_size=200), st.lists(st.integers(1, 64), max_size=8),
       st.sampled_from([16, 64, control.MAX_MESSAGE]))
@example(b"\x05\xf5\xe1\x00" + b"x" * 100, [], control.MAX_MESSAGE)  # 100 MB claimed
@example(b"\x00\x00", [], control.MAX_MESSAGE)
def test_read_message_raises_only_protocol_error(data: bytes, cuts: List[int],
                                                 limit: int) -> None:
    chunks, pos = [], 0
    for size in cuts:
        chunks.append(data[pos:pos + size])
        pos += size
    chunks.append(data[pos:])
    try:
        body = control.read_message(fuzz_control.FakeSocket(chunks), limit)  # type: ignore
    except ProtocolError:
        return
    (length,) = control.LENGTH.unpack_from(data)
    assert length <= limit and body == data[4:4 + length]


@PROPS
@given(st.binary(max_size=200), st.lists(st.integers(1, 64), max_size=8),
       st.sampled_from([16, 64, control.MAX_MESSAGE]))
@example(b"\x00\x00\x00\x02{}", [1, 1, 1, 1, 1], control.MAX_MESSAGE)
def test_message_reader_agrees_with_read_message(data: bytes, cuts: List[int],
                                                limit: int) -> None:
    chunks, pos = [], 0
    for size in cuts:
        chunks.append(data[pos:pos + size])
        pos += size
    chunks.append(data[pos:])
    chunks = [c for c in chunks if c]  # an empty read is EOF
    try:
        expected = control.read_message(fuzz_control.FakeSocket([data]), limit)  # type: ignore
    except ProtocolError:
        expected = None
    assert fuzz_control._read_incremental(chunks, limit) == expected


def test_read_message_over_a_real_socket_with_a_huge_length() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(control.LENGTH.pack(100_000_000) + b"{}")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError, match="over"):
            control.read_message(b)


def test_fuzz_control_finds_no_crash(tmp_path: Path) -> None:
    lines: List[str] = []
    result = fuzz_control.fuzz(4.0, seed=20261125, crash_dir=tmp_path, log=lines.append)
    text = figure("control fuzzer", f"{result.inputs} inputs, {result.crashes} crashes in "
                  f"{result.elapsed:.1f} s")
    assert result.crashes == 0, (text, lines)
    assert result.inputs > 5000, text
    assert list(tmp_path.iterdir()) == []


def test_fuzz_control_counts_a_planted_crash(tmp_path: Path, monkeypatch: Any) -> None:
    real = fuzz_control.control.decode_request

    def planted(data: bytes) -> Any:
        if b"reopen" in data:
            raise KeyError("planted")
        return real(data)

    monkeypatch.setattr(fuzz_control.control, "decode_request", planted)
    result = fuzz_control.fuzz(60.0, seed=1, crash_dir=tmp_path, max_inputs=2000,
                               log=lambda line: None)
    assert result.crashes > 0
    assert result.crash_files and all(p.exists() for p in result.crash_files)


def test_fuzz_control_catches_a_framing_bug_under_slow_delivery(tmp_path: Path,
                                                                monkeypatch: Any) -> None:
    """A reader that decodes the length only when the 4-byte head arrives in one piece
    works for whole messages and fails for a client that sends a byte at a time."""
    class Planted(control.MessageReader):
        def feed(self, data: bytes) -> Any:
            if self.length < 0 and 0 < len(data) < control.LENGTH.size and not self.buf:
                self.buf = b"\0" * (control.LENGTH.size - len(data))  # the bug
            return super().feed(data)

    monkeypatch.setattr(fuzz_control.control, "MessageReader", Planted)
    result = fuzz_control.fuzz(60.0, seed=2, crash_dir=tmp_path, max_inputs=500,
                               log=lambda line: None)
    assert result.crashes > 0


# -- live ----------------------------------------------------------------------------------

def _fuzz_inputs(n: int, seed: int) -> List[bytes]:
    rng = random.Random(seed)
    servers = fuzz_protocol.server_seeds()
    corpus = servers + fuzz_protocol.client_seeds()
    out = []
    for _ in range(n):
        if rng.random() < 0.15:
            out.append(fuzz_protocol.random_input(rng))
        else:
            out.append(fuzz_protocol.mutate(rng.choice(servers), rng, corpus))
    return out


def _send_one(address: str, data: bytes) -> str:
    """Send ``data``, half-close, read until the server closes; how it ended."""
    with connect(address, timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return "closed while sending"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if not sock.recv(65536):
                    return "closed"
            except ConnectionResetError:
                return "reset"
            except socket.timeout:
                break
        return "still open"


def test_live_fuzz_does_not_hurt_the_pool(make_manager: Any) -> None:
    manager = rel_manager(make_manager, worker_opts={"read_timeout": 2})
    manager.start()
    before = status(manager)
    good = LoadClient(manager.bind)
    good.start()
    inputs = _fuzz_inputs(300, seed=7)
    started = time.monotonic()
    lock = threading.Lock()
    outcomes: dict = {}

    def one(data: bytes) -> None:
        how = _send_one(manager.bind, data)
        with lock:
            outcomes[how] = outcomes.get(how, 0) + 1

    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, inputs))
    finally:
        good.stop()
    elapsed = time.monotonic() - started
    after = status(manager)
    crashes = after["totals"]["crashes"]
    text = "; ".join([
        figure("live fuzz inputs", f"300 in {elapsed:.1f} s, outcomes {outcomes}"),
        figure("live fuzz: good client", good.summary()),
        figure("live fuzz: worker crashes", crashes),
    ])
    assert good.done > 0 and not good.failures, text
    assert crashes == 0, text
    assert outcomes.get("still open", 0) == 0, text
    assert worker_pids(after) == worker_pids(before), text
