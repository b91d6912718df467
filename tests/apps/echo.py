"""Returns the request body, with its length and SHA-256 in headers."""

import hashlib


def app(environ, start_response):
    stream = environ["wsgi.input"]
    chunks = []
    while True:
        block = stream.read(65536)
        if not block:
            break
        chunks.append(block)
    body = b"".join(chunks)
    start_response("200 OK", [
        ("Content-Type", "application/octet-stream"),
        ("Content-Length", str(len(body))),
        ("X-Body-Length", str(len(body))),
        ("X-Body-SHA256", hashlib.sha256(body).hexdigest()),
        ("X-Content-Length", environ.get("CONTENT_LENGTH", "")),
    ])
    return [body]
