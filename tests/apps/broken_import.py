"""Fails at import, the way an app with a missing setting or a typo does."""


def _read_settings():
    raise RuntimeError("broken_import: the settings could not be read (on purpose)")


SETTINGS = _read_settings()


def app(environ, start_response):  # never reached
    start_response("200 OK", [])
    return [b""]
