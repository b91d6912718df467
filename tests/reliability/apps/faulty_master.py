"""Preloaded into the master (``app.preload``): serves ``relapp`` and injects a fault into
the master's command handling, triggered only by the raw control message
``{"command": "ping", "args": {"inject_fault": true}}`` (the CLI never sends it)."""

from relapp import app  # noqa: F401

from fcgi_manager.master import shell as _master

_real_command = _master.Master.command


def _command(self, name, args, client):
    if name == "ping" and args.get("inject_fault"):
        raise RuntimeError("a fault injected into the master")
    return _real_command(self, name, args, client)


_master.Master.command = _command
