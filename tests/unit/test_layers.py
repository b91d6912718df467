"""The package's layers, that no import points up, and that no class outgrows one job.

From the bottom: ``wire/`` (what both sides of a pipe or socket agree on), the shared floor
(the package's top-level modules: config, sockets, scoreboard, status, logs...), ``rules/``
(pure supervision rules), ``worker/``, ``master/``, ``cli/``; the library API
(``server``) and the package's ``__init__``/``__main__`` sit on top beside the CLI.

Two checks: every import written in a module, read from its source (also those inside
functions, which run later but are arrows all the same), and what importing a layer
really loads, in a fresh interpreter, so that nothing the test session already imported
hides an arrow.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import fcgi_manager

PACKAGE = Path(fcgi_manager.__file__).parent
TOP = {"fcgi_manager", "fcgi_manager.__main__", "fcgi_manager.server"}
# The leaves any layer may use: exception types, the version, the one escape.
LEAVES = {"fcgi_manager.errors", "fcgi_manager.version", "fcgi_manager.escaping"}
# Which layers each layer may import (besides itself and the leaves).
MAY_IMPORT: Dict[str, Set[str]] = {
    "wire": set(),
    "rules": {"wire"},
    "floor": {"wire"},
    "worker": {"wire", "floor"},
    "master": {"wire", "floor", "rules", "worker"},
    "cli": {"wire", "floor", "rules", "worker", "master"},
    "top": {"wire", "floor", "rules", "worker", "master", "cli"},
}


def layer(module: str) -> str:
    if module in TOP:
        return "top"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in MAY_IMPORT:
        return parts[1]
    return "floor"


def modules() -> Iterator[Tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        yield (name[: -len(".__init__")] if name.endswith(".__init__") else name), path


def _type_checking_only(tree: ast.Module) -> Set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:`` (types only, never run)."""
    lines: Set[int] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
                and node.test.id == "TYPE_CHECKING"):
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def imports_of(module: str, path: Path) -> Set[str]:
    """The package's modules ``module`` imports, wherever in its source."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", 0) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fcgi_manager."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fcgi_manager":
                continue
            for alias in node.names:  # ``from . import x`` names a module
                sub = f"{target}.{alias.name}"
                found.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(
                    ".py").exists() or (PACKAGE.parent / sub.replace(".", "/")).is_dir()
                          else target)
    found.discard(module)
    return {m for m in found if m != "fcgi_manager" or module in TOP}


def test_no_import_points_up() -> None:
    wrong: List[str] = []
    for module, path in modules():
        mine = layer(module)
        for target in sorted(imports_of(module, path)):
            theirs = layer(target)
            if target in LEAVES or theirs == mine or theirs in MAY_IMPORT[mine]:
                continue
            wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_every_layer_has_its_package() -> None:
    found = {layer(m) for m, _ in modules()}
    assert found == set(MAY_IMPORT), found


def loaded_by(imports: List[str]) -> Set[str]:
    """The package's modules in ``sys.modules`` after importing ``imports`` afresh."""
    code = "".join(f"import {name}\n" for name in imports) + (
        "import json, sys\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == "
        "'fcgi_manager')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    return set(json.loads(out.stdout))


def test_the_rules_load_only_the_wire() -> None:
    rules = [m for m, _ in modules() if layer(m) == "rules"]
    extra = loaded_by(rules) - loaded_by(["fcgi_manager"])
    assert {layer(m) for m in extra} <= {"rules", "wire"}, sorted(extra)


def test_the_library_api_does_not_load_the_command_line() -> None:
    loaded = loaded_by(["fcgi_manager.server", "fcgi_manager.master.lifecycle"])
    assert not {m for m in loaded if layer(m) == "cli"}, sorted(loaded)


def test_the_shared_numbers_are_a_leaf() -> None:
    assert loaded_by(["fcgi_manager.wire.codes"]) - loaded_by(["fcgi_manager"]) == {
        "fcgi_manager.wire", "fcgi_manager.wire.codes"}


def test_no_class_is_longer_than_450_lines() -> None:
    """A class past ~450 lines does more than one job: split it along a seam (the master's
    shell, the supervisor and the pool parent show how: parts that share a small context)."""
    long = []
    for module, path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > 450:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, long
