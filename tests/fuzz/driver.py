"""The loop both fuzzers share: draw an input, check it, save each new kind of crash.

A fuzzer module supplies ``next_input(rng) -> bytes`` and ``check_input(data, rng)``
(which raises on a finding); this module runs them for a time or input budget, counts,
deduplicates crashes by (exception type, file, line), saves one input per crash kind as
``<sha1>.bin`` in the crash directory, and provides the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Set, Tuple


class FuzzResult(NamedTuple):
    inputs: int
    crashes: int
    elapsed: float
    crash_files: List[Path]


class CheckFailed(AssertionError):
    """A differential or grammar check failed (counted as a crash)."""


def save_crash(data: bytes, crash_dir: Path) -> Path:
    crash_dir.mkdir(parents=True, exist_ok=True)
    path = crash_dir / (hashlib.sha1(data).hexdigest() + ".bin")
    path.write_bytes(data)
    return path


def run(
    next_input: Callable[[random.Random], bytes],
    check_input: Callable[[bytes, random.Random], None],
    seconds: float,
    seed: int,
    crash_dir: Path,
    max_inputs: Optional[int] = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> FuzzResult:
    """Fuzz for ``seconds`` (or ``max_inputs`` inputs); crashes are saved to ``crash_dir``."""
    rng = random.Random(seed)
    inputs = crashes = 0
    crash_files: List[Path] = []
    signatures: Set[Tuple[str, str, Optional[int]]] = set()
    start = time.monotonic()
    deadline = start + seconds
    while max_inputs is None or inputs < max_inputs:
        if inputs % 64 == 0 and time.monotonic() >= deadline:
            break
        data = next_input(rng)
        inputs += 1
        try:
            check_input(data, random.Random(rng.random()))
        except Exception as exc:  # every exception that escapes is a finding
            crashes += 1
            where = traceback.extract_tb(exc.__traceback__)[-1]
            signature = (type(exc).__name__, where.filename, where.lineno)
            if signature not in signatures:
                signatures.add(signature)
                path = save_crash(data, crash_dir)
                crash_files.append(path)
                log(f"crash: {type(exc).__name__}: {str(exc)[:200]} at "
                    f"{where.filename}:{where.lineno}")
                log(f"  input saved to {path}")
    return FuzzResult(inputs, crashes, time.monotonic() - start, crash_files)


def main(name: str, doc: str, fuzz: Callable[..., FuzzResult], crash_dir: Path,
         argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="time budget (default 30)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--max-inputs", type=int, default=None, help="stop after this many inputs")
    parser.add_argument("--crash-dir", type=Path, default=crash_dir, help="where crashes go")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    print(f"{name}: seed {seed}", file=sys.stderr)
    result = fuzz(args.seconds, seed, args.crash_dir, args.max_inputs)
    print(f"{name}: {result.inputs} inputs, {result.crashes} crashes in {result.elapsed:.1f} s")
    return 1 if result.crashes else 0
