"""Which modules each layer loads: the pure rules load no worker-side module, and the
library API (``WSGIServer``) does not load the command line.

Each check imports in a fresh interpreter, so what the test session already imported
does not hide an arrow that points the wrong way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import List, Set

RULES = ["supervisor", "restarts", "pool", "states", "pooldir_rules"]
# Besides what importing the package loads, the rules may load themselves and the leaf of
# shared numbers.
RULES_MAY_LOAD = {"fcgi_manager.codes"} | {f"fcgi_manager.{name}" for name in RULES}
WORKER_SIDE = ["worker", "threaded", "worker_life", "responder", "connection", "conntable",
               "wsgi", "handoff", "sockets", "protocol", "scoreboard", "accesslog", "nbaccept",
               "outpipe", "appload", "notify", "children", "master"]


def loaded_by(imports: List[str]) -> Set[str]:
    """The package's modules in ``sys.modules`` after importing ``imports`` afresh."""
    code = "".join(f"import {name}\n" for name in imports) + (
        "import json, sys\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == "
        "'fcgi_manager')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    return set(json.loads(out.stdout))


def test_the_rules_load_no_worker_side_module() -> None:
    package = loaded_by(["fcgi_manager"])
    loaded = loaded_by([f"fcgi_manager.{name}" for name in RULES])
    assert not loaded & {f"fcgi_manager.{name}" for name in WORKER_SIDE}
    assert loaded - package <= RULES_MAY_LOAD, sorted(loaded - package - RULES_MAY_LOAD)


def test_the_library_api_does_not_load_the_command_line() -> None:
    loaded = loaded_by(["fcgi_manager.server", "fcgi_manager.lifecycle"])
    assert "fcgi_manager.cli" not in loaded


def test_the_shared_numbers_are_a_leaf() -> None:
    assert loaded_by(["fcgi_manager.codes"]) - loaded_by(["fcgi_manager"]) == {
        "fcgi_manager.codes"}
