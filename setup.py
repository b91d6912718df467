"""Build the request core compiled where a C compiler is present, pure Python otherwise.

Everything else about the package is in ``pyproject.toml``. The request core
(``fcgi_manager/wire/protocol.py``, ``fcgi_manager/worker/wsgi.py`` and the request path's
``worker/connection.py`` and ``worker/responder.py``) is compiled with mypyc from the
same typed source the pure package runs (README, "Design": why mypyc). The build is
optional on purpose: no mypyc, no compiler, no Python headers, or a compile error, and the
package installs with its pure modules, which behave identically. ``FCGI_MANAGER_PURE=1``
at build time skips the compile altogether.
"""

from __future__ import annotations

import os
import sys
from typing import Any, List

from setuptools import setup
from setuptools.command.build_ext import build_ext

CORE = ["fcgi_manager/wire/protocol.py", "fcgi_manager/worker/wsgi.py",
        "fcgi_manager/worker/connection.py", "fcgi_manager/worker/responder.py"]
# One shared library inside the package (mypyc's default is a hash-named top-level module).
GROUP = "fcgi_manager._core"


def _warn(message: str) -> None:
    print(f"fcgi-manager: {message}; installing the pure-Python request core",
          file=sys.stderr)


def core_extensions() -> List[Any]:
    """mypyc's extensions for the request core, or none when it cannot compile them."""
    if os.environ.get("FCGI_MANAGER_PURE", "") not in ("", "0"):
        return []
    if sys.implementation.name != "cpython":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypyc is not available")
        return []
    try:
        # follow-imports=silent: only the core must type-check, not every module it imports.
        # --config-file= (none): pyproject's [tool.mypy] is CI's check, for the oldest Python
        # supported; the compile targets the Python that builds, with mypyc's defaults.
        return list(mypycify(["--config-file=", "--follow-imports=silent", *CORE],
                             opt_level="3", group_name=GROUP))
    except BaseException as exc:  # mypyc exits on type errors: the pure core still installs
        _warn(f"mypyc could not translate the request core ({exc!r})")
        return []


class OptionalBuildExt(build_ext):
    """build_ext that turns any failure into a pure install.

    All or nothing: the core's modules call each other inside one shared library, so a
    partly built core is removed, never installed.
    """

    def run(self) -> None:
        try:
            super().run()
        except BaseException as exc:  # CompileError, LinkError, missing headers, no compiler
            if isinstance(exc, KeyboardInterrupt):
                raise
            self._remove_outputs()
            _warn(f"the request core did not compile ({exc})")

    def _remove_outputs(self) -> None:
        for ext in self.extensions:
            for path in (self.get_ext_fullpath(ext.name),
                         os.path.join(*ext.name.split(".")[:-1],
                                      os.path.basename(self.get_ext_filename(ext.name)))):
                if os.path.exists(path):
                    os.unlink(path)


setup(ext_modules=core_extensions(), cmdclass={"build_ext": OptionalBuildExt})
