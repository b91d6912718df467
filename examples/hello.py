"""The smallest app to put behind fcgi-manager: `fcgi-manager -c examples/app.toml start`."""


def app(environ, start_response):
    body = b"Hello, World!\n"
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
