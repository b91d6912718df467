"""Which request core runs: the modules compiled from this package's source, or the source.

The request core (``wire.protocol``, ``worker.wsgi``, and the request path's
``worker.connection`` and ``worker.responder``) may be installed twice: the
``.py`` files, and beside each the extension module mypyc built from that very file
(``setup.py``). Python's import system prefers an extension, so the choice is made here,
once, before either is imported (``fcgi_manager/__init__.py`` calls :func:`install`): the
compiled core runs unless

* ``FCGI_MANAGER_PURE`` is set (to anything but ``0``): the pure core on purpose;
* an extension is missing, or older than its source (the source was edited or checked
  out after the build: running the old compiled code would be running other code than
  the tree says), or fails to load.

All or nothing: the compiled modules call each other directly inside one shared library,
so a compiled ``wsgi`` never runs beside a pure ``protocol``. The README ("Design")
says why mypyc and what it buys.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType
from typing import Dict, Optional, Sequence

PACKAGE = __name__.rpartition(".")[0]
# In import order (each imports only those before it), as names under the package.
MODULES = ("wire.protocol", "worker.wsgi", "worker.connection", "worker.responder")
# The compiled code of all of them, one library (the modules above are thin shims into it).
SHARED_LIB = "_core__mypyc"
PURE_ENV = "FCGI_MANAGER_PURE"
# A build writes the extension after its source is on disk; a source newer than this
# (edited, checked out, merged) means the extension was built from something else.
STALE_AFTER = 2.0

_HERE = os.path.dirname(os.path.abspath(__file__))
_decision: Optional[str] = None  # "compiled" or "pure", once decided
_reason = ""


def pure_requested() -> bool:
    """True when ``FCGI_MANAGER_PURE`` asks for the pure-Python core."""
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def _extension(name: str) -> Optional[str]:
    """The path of the compiled module ``name`` beside its source, if one is there."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_HERE, *name.split(".")) + suffix
        if os.path.exists(path):
            return path
    return None


def _source(name: str) -> str:
    return os.path.join(_HERE, *name.split(".")) + ".py"


def _decide() -> str:
    """Pick the core for this process (see the module docstring), and remember why."""
    global _decision, _reason
    if _decision is not None:
        return _decision
    _decision, _reason = "compiled", ""
    if pure_requested():
        _decision, _reason = "pure", f"{PURE_ENV} is set"
        return _decision
    if _extension(SHARED_LIB) is None:
        _decision, _reason = "pure", "not compiled"
        return _decision
    for name in MODULES:
        ext = _extension(name)
        if ext is None:
            _decision, _reason = "pure", "not compiled"
            break
        try:
            if os.path.getmtime(_source(name)) > os.path.getmtime(ext) + STALE_AFTER:
                _decision, _reason = "pure", (f"{os.path.relpath(_source(name), _HERE)} is "
                                             "newer than its compiled module")
                break
        except OSError:  # no source beside the extension: nothing to be stale against
            pass
    return _decision


class _PureFinder:
    """Finds the request core's modules in their ``.py`` source, ahead of the extensions."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        package, _, name = fullname.partition(".")
        if package != PACKAGE or name not in MODULES or _decide() != "pure":
            return None
        return importlib.util.spec_from_file_location(fullname, _source(name))


_FINDER = _PureFinder()


def install() -> None:
    """Put the choice in front of the import system (idempotent)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def core() -> str:
    """``"compiled"`` or ``"pure"``: what this process runs (importing the core if needed)."""
    __import__(f"{PACKAGE}.{MODULES[0]}")
    return "pure" if _loaded_pure() else "compiled"


def _loaded_pure() -> bool:
    module = sys.modules.get(f"{PACKAGE}.{MODULES[0]}")
    return module is None or (getattr(module, "__file__", None) or "").endswith(".py")


def reason() -> str:
    """Why the pure core runs ("" when the compiled one does)."""
    return _reason if core() == "pure" else ""


def describe(kind: Optional[str] = None) -> str:
    """The words ``--version`` and ``status`` use for ``kind`` (by default what this process
    runs): ``compiled core`` or ``pure Python``."""
    return "compiled core" if (kind or core()) == "compiled" else "pure Python"


def load_pure() -> Dict[str, ModuleType]:
    """Fresh pure-Python copies of the core's modules, wired to each other, under private
    names (``fcgi_manager.wire._pure_protocol``, ...), whatever this process runs: for tests and
    benchmarks that compare the two cores in one process. Keyed by the last part of each
    module's name (``"protocol"``, ``"wsgi"``)."""
    loaded: Dict[str, ModuleType] = {}
    parents = {m: importlib.import_module(f"{PACKAGE}.{m.rpartition('.')[0]}")
               for m in MODULES}
    saved_modules = {m: sys.modules.get(f"{PACKAGE}.{m}") for m in MODULES}
    saved_attrs = {m: parents[m].__dict__.get(m.rpartition(".")[2]) for m in MODULES}
    try:
        for name in MODULES:
            short = name.rpartition(".")[2]
            parent = name.rpartition(".")[0]
            spec = importlib.util.spec_from_file_location(
                f"{PACKAGE}.{parent}._pure_{short}", _source(name))
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            # Imports of the core inside the copies must find the pure copies: ``from ..wire
            # import protocol`` reads the parent package's attribute first, then sys.modules.
            for done in MODULES[:MODULES.index(name)]:
                mod = loaded[done.rpartition(".")[2]]
                sys.modules[f"{PACKAGE}.{done}"] = mod
                setattr(parents[done], done.rpartition(".")[2], mod)
            spec.loader.exec_module(module)
            loaded[short] = module
    finally:
        for name in MODULES:
            short = name.rpartition(".")[2]
            saved = saved_modules[name]
            if saved is None:
                sys.modules.pop(f"{PACKAGE}.{name}", None)
            else:
                sys.modules[f"{PACKAGE}.{name}"] = saved
            attr = saved_attrs[name]
            if attr is None:
                parents[name].__dict__.pop(short, None)
            else:
                setattr(parents[name], short, attr)
    return loaded
