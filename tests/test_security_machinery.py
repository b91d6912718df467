"""The machinery against its own app: the zygote, the hand-off channel and the
preloading reload, attacked by app code that runs as ``manager.user``.

Each test plays the attacker's part in the app (tests write the app into a directory the
unprivileged user can read) and checks what the master does with it. Root is needed for
the ``manager.user`` ones; outside CI a non-root run skips them (CI runs as root).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import List

from support import (
    Manager,
    cgi_params,
    connect_fcgi,
    fcgi_request,
    fcgi_request_bytes,
    pid_alive,
    read_fcgi_records,
    wait_for,
)

from fcgi_manager.wire import control


def _manager(d: Path, module: str, **sections: dict) -> Manager:
    (d / "run").mkdir(mode=0o755)
    return Manager(d / "run", module, path=[str(d)], **sections)


def _timed_status(manager: Manager) -> float:
    """How long the master takes to answer ``status`` on its control socket (asked from
    this process: a CLI's own start-up, seconds on a loaded machine, is not the master's)."""
    began = time.monotonic()
    reply = control.call(str(manager.control), "status", timeout=30)
    took = time.monotonic() - began
    assert reply.get("pid"), reply
    return took


# -- a pid the zygote reports is believed only if the kernel agrees ----------------

LYING_ZYGOTE = textwrap.dedent('''
    """Imported in the zygote: its first report names a stranger instead of the worker."""
    import json
    import os
    import socket

    HERE = os.path.dirname(os.path.abspath(__file__))
    _send_fds = socket.send_fds


    def _lying_send_fds(sock, buffers, fds, *args):
        data = b"".join(buffers)
        try:
            os.close(os.open(os.path.join(HERE, "lied"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            first = True
        except FileExistsError:
            first = False
        if first and data[:1] == b"P":
            with open(os.path.join(HERE, "stranger.pid")) as f:
                data = b"P" + json.dumps({"pid": int(f.read())}).encode()
        return _send_fds(sock, [data], fds, *args)


    socket.send_fds = _lying_send_fds


    def app(environ, start_response):
        body = str(os.getpid()).encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
''')


def test_a_zygote_naming_a_stranger_as_its_worker_is_not_believed(shared_dir: Path) -> None:
    """App code in the zygote reports the pid of an unrelated root process as the
    new worker. The master must not list it, must not signal it, and replaces the zygote."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        (shared_dir / "stranger.pid").write_text(str(stranger.pid))
        (shared_dir / "lying_zygote.py").write_text(LYING_ZYGOTE)
        manager = _manager(shared_dir, "lying_zygote:app", count=1,
                           app={"preload": True}, manager={"user": "nobody"})
        try:
            manager.start(check=False)
            assert (shared_dir / "lied").exists(), manager.log_text()
            data = wait_for(lambda: (lambda d: d if d["workers"] and all(
                w["state"] == "idle" for w in d["workers"]) else None)(manager.status()),
                20, "a real worker")
            assert stranger.pid not in [w["pid"] for w in data["workers"]], data
            assert "not a child of the master" in manager.log_text()
            manager.stop(check=False)
            assert stranger.poll() is None, "the master signalled the stranger"
        finally:
            manager.cleanup()
        assert stranger.poll() is None and pid_alive(stranger.pid)
    finally:
        stranger.kill()
        stranger.wait()


# -- a stopped zygote does not stop the master -------------------------------------

STOPPABLE_ZYGOTE = textwrap.dedent('''
    """Imported in the zygote; a request stops it (SIGSTOP) and ends its own worker."""
    import os
    import signal

    ZYGOTE = os.getpid()


    def app(environ, start_response):
        if environ["PATH_INFO"] == "/stop-zygote":
            os.kill(ZYGOTE, signal.SIGSTOP)
            os._exit(3)
        body = f"{os.getpid()} {ZYGOTE}".encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
''')


def test_a_stopped_zygote_never_blocks_status_and_is_replaced(shared_dir: Path) -> None:
    """A request handler SIGSTOPs the zygote and its worker exits. The master asks
    the stopped zygote for a replacement: status keeps answering within a second, and
    after the spawn deadline a new zygote forks the workers."""
    (shared_dir / "stoppable_zygote.py").write_text(STOPPABLE_ZYGOTE)
    manager = _manager(shared_dir, "stoppable_zygote:app", count=2,
                       app={"preload": True}, manager={"user": "nobody"})
    zygote = 0
    try:
        manager.start()
        manager.wait_workers(2)
        reply = fcgi_request(manager.bind, "/")
        zygote = int(reply.body.split()[1])
        manager.tracker.add(zygote)
        before = set(manager.worker_pids())
        fcgi_request(manager.bind, "/stop-zygote", timeout=10)
        wait_for(lambda: open(f"/proc/{zygote}/stat").read().split(")")[1].split()[0] == "T",
                 10, "the zygote to be stopped")
        slowest = 0.0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            slowest = max(slowest, _timed_status(manager))
            data = manager.status()
            pids = {w["pid"] for w in data["workers"]}
            if len(pids) == 2 and pids != before and all(
                    w["state"] == "idle" for w in data["workers"]):
                break
        else:
            raise AssertionError(f"no replacement worker: {manager.log_text()}")
        assert slowest < 1.5, f"status took {slowest:.1f} s while the zygote was stopped"
        assert not pid_alive(zygote) or \
            open(f"/proc/{zygote}/stat").read().split(")")[1].split()[0] == "Z"
        assert "did not answer in time" in manager.log_text()
    finally:
        if zygote and pid_alive(zygote):
            try:
                os.kill(zygote, signal.SIGCONT)
            except ProcessLookupError:
                pass
        manager.cleanup()


# -- a preloading reload imports outside the master's loop -------------------------

SLOW_IMPORT = textwrap.dedent('''
    """Imported by the master (preload); slow once the flag file exists."""
    import os
    import time

    if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow")):
        time.sleep(6)


    def app(environ, start_response):
        body = str(os.getpid()).encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
''')


def test_a_preloading_reload_with_a_slow_import_never_blocks_status(tmp_path: Path) -> None:
    """Preload without manager.user (as when not root), a 6-s import at reload.
    The validation child and the new generation's zygote import; the re-executed master's
    loop answers status at once all along."""
    (tmp_path / "slow_import.py").write_text(SLOW_IMPORT)
    manager = Manager(tmp_path / "run", "slow_import:app", count=1, path=[str(tmp_path)],
                      app={"preload": True})
    try:
        manager.start()
        manager.wait_workers(1)
        (tmp_path / "slow").write_text("")
        done: List[object] = []
        reload = threading.Thread(target=lambda: done.append(manager.cli("reload", timeout=60)))
        reload.start()
        latencies = []
        while reload.is_alive():
            latencies.append(_timed_status(manager))
            reload.join(0.05)  # the poll's interval
        reload.join()
        result = done[0]
        assert result.returncode == 0, result  # type: ignore[attr-defined]
        assert len(latencies) >= 6, latencies
        assert max(latencies) < 1.5, f"status took {max(latencies):.1f} s during the reload"
        data = manager.wait_workers(1, generation=2)
        assert data["generation"] == 2
    finally:
        manager.cleanup()


# -- one hand-off channel per generation, checked at the receiving end -------------

LEFTOVER = textwrap.dedent('''
    """/leave forks a process that keeps the worker's hand-off channel (what an app may
    leave behind); once the file "go" exists it injects a connection of its own, and
    tries to take any kept connection, writing what happened into "result"."""
    import array
    import os
    import socket
    import stat
    import time

    HERE = os.path.dirname(os.path.abspath(__file__))


    def _channel_ends():
        ends = []
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                    continue
                s = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            if s.type == socket.SOCK_SEQPACKET:
                ends.append(s)
            else:
                s.close()
        return ends


    def _leftover():
        with open(os.path.join(HERE, "leftover.pid"), "w") as f:
            f.write(str(os.getpid()))
        ends = _channel_ends()
        give_up = time.monotonic() + 60
        while not os.path.exists(os.path.join(HERE, "go")):
            if time.monotonic() > give_up:
                return
            time.sleep(0.05)
        with open(os.path.join(HERE, "request.bin"), "rb") as f:
            request = f.read()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sent = 0
        for end in ends:
            try:
                end.sendmsg([b"\\x01"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         array.array("i", [theirs.fileno()]))],
                           socket.MSG_DONTWAIT)
                sent += 1
            except OSError:
                pass
        theirs.close()
        try:
            ours.sendall(request)  # EPIPE if nobody holds the other end any more
        except OSError:
            pass
        ours.settimeout(0.2)
        served = took = b""
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            try:
                served += ours.recv(65536)
            except (socket.timeout, OSError):
                pass
            for end in ends:
                try:
                    _, anc, _, _ = end.recvmsg(16, socket.CMSG_SPACE(64), socket.MSG_DONTWAIT)
                except OSError:
                    continue
                for level, kind, payload in anc:
                    if kind == socket.SCM_RIGHTS:
                        took += b"took "
        with open(os.path.join(HERE, "result"), "w") as f:
            f.write(f"ends={len(ends)} sent={sent} served={len(served)} took={len(took)}")


    def app(environ, start_response):
        if environ["PATH_INFO"] == "/leave":
            if os.fork() == 0:
                try:
                    if os.fork() == 0:
                        try:
                            _leftover()
                        except BaseException as exc:
                            with open(os.path.join(HERE, "result"), "w") as f:
                                f.write(f"error {exc!r}")
                finally:
                    os._exit(0)
        query = environ.get("QUERY_STRING", "")
        if query.startswith("s="):
            time.sleep(float(query[2:]))
        body = f"in pid {os.getpid()}".encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
''')


def test_a_process_left_by_generation_1_cannot_use_generation_2s_channel(
        shared_dir: Path) -> None:
    """A process generation 1's app left behind holds that generation's hand-off
    channel. After a reload it can neither inject a connection of its own that a
    generation-2 worker serves, nor take a kept connection generation 2 lets go of."""
    (shared_dir / "leftover.py").write_text(LEFTOVER)
    (shared_dir / "request.bin").write_bytes(fcgi_request_bytes(cgi_params("/injected")))
    manager = _manager(shared_dir, "leftover:app", count=1, manager={"user": "nobody"})
    result = shared_dir / "result"
    kept: List[object] = []
    try:
        manager.start()
        manager.wait_workers(1)
        assert fcgi_request(manager.bind, "/leave").status_code == 200
        pidfile = shared_dir / "leftover.pid"
        manager.tracker.add(int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 10,
                                         "the leftover process")))
        out = manager.cli("reload", timeout=60)
        assert out.returncode == 0, out
        manager.wait_workers(1, generation=2)
        # Generation 2's worker holds two kept connections and runs a slow request on one:
        # it lets the other go into its channel, where nobody else takes it.
        k1, k2 = connect_fcgi(manager.bind), connect_fcgi(manager.bind)
        kept += [k1, k2]
        for sock in (k1, k2):
            sock.sendall(fcgi_request_bytes(cgi_params("/"), keep_conn=True))
            read_fcgi_records(sock, 1, 10)
        k1.sendall(fcgi_request_bytes(cgi_params("/", QUERY_STRING="s=6"), rid=2,
                                      keep_conn=True))
        (shared_dir / "go").write_text("")
        text = wait_for(lambda: result.exists() and result.read_text(), 20,
                        "the leftover process's report")
        assert "served=0" in text and "took=0" in text, text
        # The kept connection is still ours to use, served by generation 2.
        k2.sendall(fcgi_request_bytes(cgi_params("/"), rid=3, keep_conn=True))
        assert any(r[0] == 6 for r in read_fcgi_records(k2, 3, 20))
    finally:
        for sock in kept:
            sock.close()  # type: ignore[attr-defined]
        manager.cleanup()
