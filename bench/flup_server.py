"""Serve one benchmark app with flup on a unix socket (run by the peers' virtualenv).

flup is the server that fcgi-manager replaces in the classic ``.fcgi`` file, so it is run
the two ways such files use it:

- ``fork``: ``flup.server.fcgi_fork.WSGIServer``, the prefork server, with ``minSpare``,
  ``maxSpare`` and ``maxChildren`` all equal to the worker count so that exactly that many
  processes serve, like every other server in the comparison.
- ``threaded``: ``flup.server.fcgi.WSGIServer``, one process with a thread pool, which is
  what the Flask deployment docs show.

The harness stops a server with SIGTERM. flup's prefork master handles it by setting a flag
that its main loop checks after ``select()`` returns, but on Python 3 an interrupted
``select()`` is retried (PEP 475), so the master would only stop once a child changes
state. ``_prompt_stop`` makes the signal end the loop at once and then lets flup tell its
children to exit as it normally would. This touches only shutdown, never a request.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    """Read the model, app, socket path and worker count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("fork", "threaded"), required=True)
    parser.add_argument("--app", required=True, help="callable name in bench/apps.py")
    parser.add_argument("--socket", required=True, help="unix socket path to listen on")
    parser.add_argument("--workers", type=int, default=2)
    return parser.parse_args(argv)


class _Stop(Exception):
    """Raised by the stop-signal handler to leave flup's prefork loop."""


def _prompt_stop(server_class: type) -> type:
    """A subclass of flup's prefork server that leaves its loop as soon as it is signalled."""

    class PromptStopServer(server_class):
        def _intHandler(self, signum, frame):
            super()._intHandler(signum, frame)
            raise _Stop()

    return PromptStopServer


def _run_prefork(server) -> None:
    """Run flup's prefork server; on a stop signal, stop its children the way flup does."""
    try:
        server.run()
    except _Stop:
        server._restoreSignalHandlers()
        server._cleanupChildren()


def main(argv: Optional[List[str]] = None) -> int:
    """Build the flup server for the requested model and run it until a stop signal."""
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import apps

    app = getattr(apps, args.app)
    if args.model == "fork":
        from flup.server.fcgi_fork import WSGIServer

        n = args.workers
        server = _prompt_stop(WSGIServer)(
            app, bindAddress=args.socket, maxChildren=n, minSpare=n, maxSpare=n, maxRequests=0
        )
        _run_prefork(server)
    else:
        from flup.server.fcgi import WSGIServer

        WSGIServer(app, bindAddress=args.socket).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
