"""fcgi-manager: a prefork FastCGI process manager for Python WSGI applications.

``from fcgi_manager import WSGIServer`` is a drop-in for flup's server in a ``.fcgi`` file.
"""

from __future__ import annotations

from . import compiled as _compiled
from .version import __version__

# Before anything imports the request core: compiled, or pure when asked or not built.
_compiled.install()

__all__ = ["WSGIServer", "__version__"]


def __getattr__(name: str):
    # Imported lazily so that `import fcgi_manager` stays cheap for the CLI and the workers.
    if name == "WSGIServer":
        from .server import WSGIServer

        return WSGIServer
    raise AttributeError(name)
