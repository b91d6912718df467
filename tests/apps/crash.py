"""An app that fails: ``/`` raises before start_response, ``/mid`` after the first chunk,
``/close`` in the iterable's close()."""


class CrashedOnPurpose(RuntimeError):
    pass


class _ClosingBody:
    def __init__(self):
        self.closed = False

    def __iter__(self):
        yield b"body before close\n"

    def close(self):
        raise CrashedOnPurpose("close() failed on purpose")


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path.endswith("/mid"):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _mid()
    if path.endswith("/close"):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _ClosingBody()
    raise CrashedOnPurpose("the app crashed on purpose")


def _mid():
    yield b"first chunk\n"
    raise CrashedOnPurpose("crashed in the middle of the body")
