"""The command line: ``fcgi-manager`` and its commands, run from the user's shell.

``main`` is the ``fcgi-manager`` script's entry point; it loads the commands only when
called, so importing one of this package's modules (``client``, ``check``) stays cheap.
"""

from __future__ import annotations

from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """Run one ``fcgi-manager`` command and return its exit status."""
    from .commands import main as run

    return run(argv)
