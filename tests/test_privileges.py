"""Privileges and environment, through the real CLI: manager.user/group, listen
owner/group/mode, app.env, app.clear_env, manager.umask, and listen.allowed_clients.

Dropping privileges needs root; outside CI a non-root run skips with the reason (CI runs
as root, so there it always runs).
"""

from __future__ import annotations

import json
import pwd
import socket
import stat
import textwrap
from pathlib import Path

import psutil

from tests.support import fcgi_manager, fcgi_request, free_port, wait_for

APP = textwrap.dedent('''
    import json
    import os


    def app(environ, start_response):
        if environ["PATH_INFO"] == "/touch":
            path = os.path.join(os.path.dirname(__file__), "made-by-app")
            with open(path, "w") as f:
                f.write("x")
        body = json.dumps({
            "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
            "cwd": os.getcwd(), "env": dict(os.environ),
        }).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]
''')



def _start(d: Path, extra: str) -> None:
    (d / "privapp.py").write_text(APP)
    (d / "priv.toml").write_text(textwrap.dedent(f'''
        [app]
        module = "privapp:app"
        chdir = "{d}"
        {extra}
    '''))
    out = fcgi_manager(["-c", str(d / "priv.toml"), "start"])
    assert out.returncode == 0, out


def _stop(d: Path) -> None:
    out = fcgi_manager(["-c", str(d / "priv.toml"), "stop"])
    assert out.returncode == 0, out


def _status(d: Path) -> dict:
    out = fcgi_manager(["-c", str(d / "priv.toml"), "status", "--json"])
    assert out.returncode == 0, out
    return json.loads(out.stdout)


def test_user_group_socket_owner_env_and_umask(shared_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    www = pwd.getpwnam("www-data")
    sock = shared_dir / "priv.sock"
    _start(shared_dir, textwrap.dedent(f'''
        env = {{ GREETING = "hello", EMPTY = "" }}
        clear_env = true
        [listen]
        bind = "unix:{sock}"
        owner = "www-data"
        group = "www-data"
        mode = "0660"
        [workers]
        count = 2
        [manager]
        user = "nobody"
        umask = "027"
    '''))
    try:
        st = sock.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert (st.st_uid, st.st_gid) == (www.pw_uid, www.pw_gid)
        assert stat.S_IMODE(st.st_mode) == 0o660
        data = _status(shared_dir)
        for w in data["workers"]:
            uids = psutil.Process(w["pid"]).uids()
            assert uids.real == uids.effective == nobody.pw_uid, (w, uids)
        assert psutil.Process(data["pid"]).uids().effective == 0  # the master keeps root
        reply = fcgi_request(f"unix:{sock}", "/touch")
        assert reply.status_code == 200, reply
        seen = json.loads(reply.body)
        assert seen["uid"] == seen["euid"] == nobody.pw_uid
        assert seen["gid"] == nobody.pw_gid
        assert seen["cwd"] == str(shared_dir)
        assert seen["env"]["GREETING"] == "hello" and seen["env"]["EMPTY"] == ""
        # clear_env: the test runner's own variables did not reach the app.
        assert "PYTEST_CURRENT_TEST" not in seen["env"]
        made = shared_dir / "made-by-app"
        assert made.stat().st_uid == nobody.pw_uid
        assert stat.S_IMODE(made.stat().st_mode) == 0o640  # 0666 & ~027
    finally:
        _stop(shared_dir)
    assert not sock.exists()


def test_allowed_clients_refuses_other_addresses(shared_dir: Path) -> None:
    port = free_port()
    _start(shared_dir, textwrap.dedent(f'''
        [listen]
        bind = "127.0.0.1:{port}"
        allowed_clients = ["127.0.0.2"]
        [workers]
        count = 1
        [manager]
        log = "{shared_dir / 'priv.log'}"
    '''))
    try:
        # 127.0.0.1 is not allowed: the connection is closed without an answer.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            from fcgi_manager.wire import protocol

            try:
                conn.sendall(protocol.encode_request({"REQUEST_METHOD": "GET",
                                                      "PATH_INFO": "/"}))
                answer = conn.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                answer = b""  # closed before or after our bytes arrived: refused either way
            assert answer == b""
        wait_for(lambda: "not in listen.allowed_clients" in
                 (shared_dir / "priv.log").read_text(), 10, "the refusal in the log")
        # 127.0.0.2 is allowed (Linux routes all of 127.0.0.0/8 to lo).
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.bind(("127.0.0.2", 0))
            conn.connect(("127.0.0.1", port))
            from fcgi_manager.wire import protocol

            conn.sendall(protocol.encode_request({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}))
            client = protocol.ClientConnection(1)
            while not client.response.complete:
                data = conn.recv(65536)
                assert data, "the allowed client got no answer"
                client.feed(data)
            assert client.response.stdout.startswith(b"Status: 200")
    finally:
        _stop(shared_dir)


def test_threaded_workers_forked_as_an_unprivileged_user_serve(shared_dir: Path) -> None:
    """With manager.user the workers are forked by a process that imported the app as that
    user before the master made room for the thread entries; threaded workers must still
    reach their own entries and serve (they used to fail every request)."""
    sock = shared_dir / "threads.sock"
    _start(shared_dir, textwrap.dedent(f'''
        [listen]
        bind = "unix:{sock}"
        [workers]
        count = 2
        threads = 3
        [manager]
        user = "nobody"
    '''))
    try:
        for _ in range(6):
            reply = fcgi_request(f"unix:{sock}", "/", timeout=10)
            assert reply.status_code == 200, reply
        data = _status(shared_dir)
        assert sum(w["requests"] for w in data["workers"]) == 6, data
        assert data["totals"]["threads"] == 6, data
    finally:
        _stop(shared_dir)
