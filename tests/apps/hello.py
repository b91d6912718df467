"""Answers JSON describing what the app saw: paths, CGI params, the worker's pid."""

import json
import os

SHOWN = ("SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "REQUEST_METHOD", "REQUEST_URI",
         "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL", "CONTENT_TYPE", "CONTENT_LENGTH",
         "REMOTE_ADDR", "GATEWAY_INTERFACE")


def describe(environ):
    seen = {key: environ[key] for key in SHOWN if key in environ}
    seen.update({k: v for k, v in environ.items() if k.startswith(("HTTP_", "X_"))})
    return {
        "hello": "world",
        "pid": os.getpid(),
        "script_name": environ.get("SCRIPT_NAME"),
        "path_info": environ.get("PATH_INFO"),
        "url_scheme": environ.get("wsgi.url_scheme"),
        "environ": seen,
    }


def app(environ, start_response):
    body = json.dumps(describe(environ)).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
