"""A Flask app: routes and ``url_for`` must follow SCRIPT_NAME (root or sub-path)."""

from flask import Flask, jsonify, request, url_for

app = Flask(__name__)


@app.route("/")
def index():
    return jsonify(page="index", script_root=request.script_root, path=request.path,
                   link=url_for("user", name="ada"))


@app.route("/user/<name>")
def user(name):
    return jsonify(page="user", name=name, script_root=request.script_root,
                   path=request.path, url=request.url)


@app.route("/upload", methods=["POST"])
def upload():
    form = request.form.to_dict()
    return jsonify(page="upload", length=request.content_length, form=form)


@app.route("/boom")
def boom():
    raise RuntimeError("flask view failed on purpose")
