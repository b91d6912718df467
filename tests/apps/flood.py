"""An app for an error flood: every request fails with a message that carries its path and
what the log must escape (a CR inside a line, an ESC) or split (a LF); ``/print/...``
prints such a line instead, and ``/child/...`` has a child process write one to its
stderr (fd 2, which stays the master's pipe)."""

import os
import subprocess


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path.startswith(("/print/", "/child/")):
        if path.startswith("/print/"):
            print(f"printed {path} cr\rinside esc\x1b[2J")
        else:
            subprocess.run(["sh", "-c", 'echo "child says $MARK" >&2'],
                           env=dict(os.environ, MARK=path), check=True)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok\n"]
    raise RuntimeError(f"flood {path} cr\rinside esc\x1b[31m\nsecond line {path}")
