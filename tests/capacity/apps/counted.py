"""Records every call: appends one line (pid, path) to ``$CAPACITY_CALLS`` before doing
anything, then answers like ``combo`` (``/sleep?s=N`` sleeps N seconds)."""

import os

import combo


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    with open(os.environ["CAPACITY_CALLS"], "a") as f:
        f.write(f"{os.getpid()} {path}\n")
    return combo.app(environ, start_response)
