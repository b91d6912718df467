"""The application of Flask's FastCGI deployment guide, with routes that show the paths.

Each page says where the app believes it is mounted (``request.script_root``) and which
path it was asked for (``request.path``), and builds its links with ``url_for``: if the
front end's SCRIPT_NAME/PATH_INFO are wrong, the links are wrong, and that is visible.
"""

from flask import Flask, jsonify, request, url_for

app = Flask(__name__)


@app.route("/")
def index():
    return (
        "<!DOCTYPE html><title>yourapplication</title>"
        "<h1>Hello from yourapplication</h1>"
        f'<p><a href="{url_for("where")}">where am I?</a> '
        f'<a href="{url_for("hello", name="world")}">say hello</a></p>\n'
    )


@app.route("/where")
def where():
    """What the app sees of its URL: the deployment tests read this."""
    return jsonify(
        script_root=request.script_root,
        path=request.path,
        query=request.query_string.decode("latin-1"),
        url=request.url,
        links={
            "index": url_for("index"),
            "where": url_for("where"),
            "hello": url_for("hello", name="world"),
        },
    )


@app.route("/hello/<name>")
def hello(name):
    return f"Hello, {name}!\n"


@app.route("/echo", methods=["POST"])
def echo():
    return request.get_data(), 200, {"Content-Type": "application/octet-stream"}
