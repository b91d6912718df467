"""Exception types shared by every layer.

Each error carries what the user (or the caller) needs to act on: the config file and key,
the address that could not be bound, the protocol rule that a peer broke. Only the CLI turns
them into messages and exit codes.
"""

from __future__ import annotations


class FcgiManagerError(Exception):
    """Base class: an error the CLI reports as ``Error: <message>`` plus an optional hint."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(FcgiManagerError):
    """The configuration is wrong; the message names the file and the key."""


class BindError(FcgiManagerError):
    """The listening socket could not be created (address in use, permission, live socket)."""


class AppImportError(FcgiManagerError):
    """The WSGI application could not be imported; ``traceback`` is the app's own."""

    def __init__(self, message: str, traceback_text: str = "", hint: str = "") -> None:
        super().__init__(message, hint)
        self.traceback_text = traceback_text


class ControlError(FcgiManagerError):
    """The control socket could not be reached or answered with an error."""


class ProtocolError(Exception):
    """A FastCGI peer broke the protocol; the connection it came on must be closed.

    Raised only by the sans-I/O parser. ``str(exc)`` is one line fit for the log.
    """


def format_error(exc: FcgiManagerError, prefix: str = "Error: ") -> str:
    """The one way an error is written for a person: the app's own traceback (if any),
    then ``<prefix><message>``, then ``hint: ...`` when there is something to do.

    The CLI prints it; a worker that cannot import the app and the reload's check process
    send it to the master, which logs it and passes it to whoever asked.
    """
    text = ""
    traceback_text = getattr(exc, "traceback_text", "")
    if traceback_text:
        text += traceback_text.rstrip() + "\n"
    text += f"{prefix}{exc.message}"
    if exc.hint:
        text += f"\nhint: {exc.hint}"
    return text
