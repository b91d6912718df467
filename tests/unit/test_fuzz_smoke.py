"""A short in-process run of tests/fuzz/fuzz_protocol.py, and a replay of saved inputs."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

from fcgi_manager.errors import ProtocolError
from fcgi_manager.wire import protocol as p

HERE = Path(__file__).parent.parent  # tests/
FUZZ_SCRIPT = HERE / "fuzz" / "fuzz_protocol.py"
CRASHES = sorted((HERE / "fixtures" / "fcgi_crashes").glob("*.bin"))
INVALID = sorted((HERE / "fixtures" / "fcgi_invalid").glob("*.bin"))


def _load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_protocol", FUZZ_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fuzz_protocol = _load_fuzzer()


def test_fuzz_loop_finds_no_crash(tmp_path):
    lines = []
    result = fuzz_protocol.fuzz(5.0, seed=20240601, crash_dir=tmp_path, log=lines.append)
    assert result.crashes == 0, lines
    assert result.inputs > 1000
    assert result.crash_files == []
    assert list(tmp_path.iterdir()) == []


def test_fuzz_is_reproducible_for_a_seed(tmp_path):
    a = fuzz_protocol.fuzz(60.0, seed=3, crash_dir=tmp_path, max_inputs=300)
    b = fuzz_protocol.fuzz(60.0, seed=3, crash_dir=tmp_path, max_inputs=300)
    assert a.inputs == b.inputs == 300
    rng_a, rng_b = random.Random(11), random.Random(11)
    corpus = fuzz_protocol.server_seeds()
    first = [fuzz_protocol.mutate(corpus[0], rng_a, corpus) for _ in range(50)]
    second = [fuzz_protocol.mutate(corpus[0], rng_b, corpus) for _ in range(50)]
    assert first == second
    assert any(m != corpus[0] for m in first)


def test_fuzz_counts_a_crash_and_saves_the_input(tmp_path, monkeypatch):
    def broken(data, max_pairs=10000):
        if len(data) > 40:
            raise IndexError("planted")
        return {}

    monkeypatch.setattr(fuzz_protocol.p, "decode_pairs", broken)
    result = fuzz_protocol.fuzz(
        60.0, seed=1, crash_dir=tmp_path, max_inputs=200, log=lambda line: None
    )
    assert result.crashes > 0
    assert result.crash_files
    assert all(f.parent == tmp_path and f.suffix == ".bin" for f in result.crash_files)


def test_fuzz_command_line(tmp_path, capsys):
    status = fuzz_protocol.main(["--seconds", "0.5", "--seed", "5", "--crash-dir", str(tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    assert status == 0
    assert len(out) == 1
    assert out[0].startswith("fuzz_protocol: ")
    assert out[0].endswith(" s")
    assert " inputs, 0 crashes in " in out[0]


def _only_protocol_error(function, *args):
    """Call ``function``; ProtocolError is fine, any other exception fails the test."""
    try:
        function(*args)
    except ProtocolError:
        pass


def _feed_server(data: bytes, step: int) -> None:
    conn = p.ServerConnection()
    for i in range(0, len(data), step):
        conn.feed(data[i : i + step])


def _feed_client(data: bytes, step: int) -> None:
    client = p.ClientConnection(1)
    for i in range(0, len(data), step):
        client.feed(data[i : i + step])


@pytest.mark.parametrize(
    "path", CRASHES + INVALID, ids=[f"{f.parent.name}/{f.stem}" for f in CRASHES + INVALID]
)
def test_replay_saved_inputs_raise_only_protocol_error(path):
    data = path.read_bytes()
    for step in (max(len(data), 1), 1, 3):
        _only_protocol_error(_feed_server, data, step)
        _only_protocol_error(_feed_client, data, step)
    _only_protocol_error(p.decode_pairs, data)
    _only_protocol_error(p.decode_pairs, data[8:])
    # The fuzzer's own checks (differential, grammar, reference decoder) pass as well.
    fuzz_protocol.check_input(data, random.Random(0))
