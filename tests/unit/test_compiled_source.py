"""What the compiled modules' source must avoid: code that runs one way interpreted and
another way compiled.

Compiled, a local name has one type, the type of its first binding. ``except A as exc``
then ``except B as exc`` in one function is fine for the interpreter and for mypy, but
the compiled function raises ``TypeError`` when the second handler binds a ``B`` (a worker
died so when a client stopped reading). Each handler's name is checked here, on the
source, so the pure and the compiled core stay the same program.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import fcgi_manager
from fcgi_manager import compiled

PACKAGE = Path(fcgi_manager.__file__).parent


def test_no_function_of_the_core_binds_one_name_to_two_exception_types() -> None:
    found: List[str] = []
    for name in compiled.MODULES:
        path = PACKAGE.joinpath(*name.split(".")).with_suffix(".py")
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            kinds: Dict[str, Set[str]] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.ExceptHandler) and node.name and node.type:
                    kinds.setdefault(node.name, set()).add(ast.unparse(node.type))
            found += [f"{name}.{fn.name}: {var} is {sorted(types)}"
                      for var, types in kinds.items() if len(types) > 1]
    assert not found, found
