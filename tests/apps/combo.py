"""One app for integration tests, routing on the first path segment of PATH_INFO:
``/sleep`` (slow), ``/echo`` (echo), ``/crash`` (crash), anything else (hello)."""

import crash
import echo
import hello
import slow

ROUTES = {"sleep": slow.app, "echo": echo.app, "crash": crash.app}


def app(environ, start_response):
    first = environ.get("PATH_INFO", "").lstrip("/").split("/", 1)[0]
    return ROUTES.get(first, hello.app)(environ, start_response)
