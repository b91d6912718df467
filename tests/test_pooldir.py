"""The pool directory, for real: ``-c DIR`` runs one master per file under one parent.

Three apps (one as ``nobody`` when the tests run as root) behind one nginx: a broken
import is that app's problem only; a master killed with SIGKILL is restarted while the
others serve; a reload of one app under load fails no request; files added, changed and
removed take effect on ``reload``; two files on one socket are both refused; the parent
runs in the foreground as a ``Type=notify`` service. The parent's RSS is measured.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

import psutil
import pytest

from tests.pool_support import Load, Pool, PoolNginx, can_drop_privileges
from tests.support import (
    FcgiReply,
    _child_env,
    cgi_params,
    fcgi_request_bytes,
    read_fcgi_records,
    require_program,
    wait_for,
)


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = Pool()
    try:
        yield p
    finally:
        leaked = p.cleanup()
    assert not leaked, f"processes left running after the test (killed now): {leaked}"


@pytest.fixture
def nginxes(tmp_path: Path) -> Iterator[List[PoolNginx]]:
    made: List[PoolNginx] = []
    yield made
    for n in made:
        n.stop()


def _three_apps(pool: Pool) -> None:
    pool.write("alpha")
    user = {"user": "nobody"} if can_drop_privileges() else {}
    pool.write("beta", manager=user)
    pool.write("gamma")


@pytest.mark.needs("nginx")
def test_one_import_fails_the_others_serve_behind_one_nginx(pool: Pool, tmp_path: Path,
                                                            nginxes: List[PoolNginx]) -> None:
    require_program("nginx")
    _three_apps(pool)
    pool.write("broken", module="no_such_module_here:app", count=1)
    out = pool.start()
    assert "broken" in out.stderr and "fatal" in out.stderr, out
    nginx = PoolNginx(tmp_path, pool, ["alpha", "beta", "gamma"])
    nginxes.append(nginx)
    nginx.start()
    for name in ("alpha", "beta", "gamma"):
        r = nginx.get(f"/{name}/hello")
        assert r.status == 200 and r.json()["app"] == name, r
    if can_drop_privileges():
        assert nginx.get("/beta/").json()["uid"] == pwd.getpwnam("nobody").pw_uid
    apps = pool.apps()
    assert apps["broken"]["state"] == "fatal"
    assert "no_such_module_here" in apps["broken"]["error"], apps["broken"]
    for name in ("alpha", "beta", "gamma"):
        assert apps[name]["state"] == "running", apps[name]
        assert apps[name]["workers"] == {"busy": 0, "total": 2}, apps[name]
        assert apps[name]["requests"] >= 1
    # One app's full status is its own master's, as for a single app.
    one = pool.cli("status", "--json", "alpha")
    assert one.returncode == 0, one
    assert json.loads(one.stdout)["pid"] == apps["alpha"]["pid"]
    text = pool.cli("status")
    assert text.returncode == 3, text  # one app does not run
    assert "broken" in text.stdout and "fatal" in text.stdout and "No module" in text.stdout
    # The parent: no app code, no app user, and small.
    parent = psutil.Process(pool.parent_pid())
    assert not any("poolapp" in m.path for m in parent.memory_maps()), "app code in the parent"
    rss = parent.memory_info().rss
    print(f"\npool parent RSS: {rss / 2**20:.1f} MiB for 4 apps")
    assert rss < 40 * 2**20, rss
    masters = {c.pid for c in parent.children()}
    assert masters == {apps[n]["pid"] for n in ("alpha", "beta", "gamma")}
    # Stop is graceful for every app, and leaves nothing behind.
    family = [parent.pid] + [c.pid for c in parent.children(recursive=True)]
    out = pool.cli("stop")
    assert out.returncode == 0, out
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status()
                             != psutil.STATUS_ZOMBIE for p in family), 30, "all gone")
    assert not pool.pidfile.exists()
    assert not pool.socket("alpha").exists()


@pytest.mark.needs("nginx")
def test_master_killed_is_restarted_while_the_others_serve(pool: Pool, tmp_path: Path,
                                                           nginxes: List[PoolNginx]) -> None:
    require_program("nginx")
    _three_apps(pool)
    pool.start()
    nginx = PoolNginx(tmp_path, pool, ["alpha", "beta", "gamma"])
    nginxes.append(nginx)
    nginx.start()
    old = pool.apps()["alpha"]["pid"]
    with Load(nginx.port, ["beta", "gamma"]) as load:
        os.kill(old, signal.SIGKILL)
        app = wait_for(lambda: (pool.apps()["alpha"]["state"] == "running"
                                and pool.apps()["alpha"]["pid"] != old
                                and pool.apps()["alpha"]), 60, "alpha restarted")
        before = load.served()
        wait_for(lambda: all(load.served()[n] > before[n] + 5 for n in ("beta", "gamma")),
                 30, "more requests served")
    assert not load.failures, load.failures[:5]
    pool.track()
    r = wait_for(lambda: nginx.get("/alpha/").status == 200 and nginx.get("/alpha/"), 30,
                 "alpha serving again")
    assert r.json()["app"] == "alpha"
    assert app["pid"] in {c.pid for c in psutil.Process(pool.parent_pid()).children()}
    assert "alpha: master (pid" in pool.log_text()


@pytest.mark.needs("nginx")
def test_reload_one_app_under_load_fails_no_request(pool: Pool, tmp_path: Path,
                                                  nginxes: List[PoolNginx]) -> None:
    require_program("nginx")
    _three_apps(pool)
    pool.start()
    nginx = PoolNginx(tmp_path, pool, ["alpha", "beta", "gamma"])
    nginxes.append(nginx)
    nginx.start()
    pids = {n: a["pid"] for n, a in pool.apps().items()}
    with Load(nginx.port, ["alpha", "beta", "gamma"], query="?s=0.01") as load:
        out = pool.cli("reload", "beta")
        assert out.returncode == 0, out
        assert "beta: reloaded: generation 2" in out.stdout, out
        before = load.served()
        wait_for(lambda: load.served()["beta"] > before["beta"] + 5, 30, "beta after reload")
    assert not load.failures, load.failures[:5]
    full = pool.cli("status", "--json", "beta")
    assert json.loads(full.stdout)["generation"] == 2
    assert {n: a["pid"] for n, a in pool.apps().items()} == pids  # same masters


def test_added_changed_and_removed_files_on_reload(pool: Pool, tmp_path: Path) -> None:
    pool.write("keep")
    pool.write("change")
    removed = pool.write("gone")
    pool.start()
    before = pool.apps()
    # An in-flight request on the app whose file goes: it must finish (graceful stop).
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(str(pool.socket("gone")))
    sock.sendall(fcgi_request_bytes(cgi_params("/slow?s=1.5")))
    removed.unlink()
    pool.write("change", count=3, app={"env": {"POOL_APP": "change", "POOL_VERSION": "2"}})
    pool.write("new")
    out = pool.cli("reload")
    assert out.returncode == 0, out
    assert "new: started" in out.stdout, out
    assert "change: reloaded: generation 2, 3 worker(s)" in out.stdout, out
    assert "gone: stopping gracefully" in out.stdout, out
    assert "keep: unchanged" in out.stdout, out
    reply = FcgiReply(read_fcgi_records(sock))
    sock.close()
    assert reply.status_code == 200 and json.loads(reply.body)["app"] == "gone", reply
    pool.wait_state("gone", "stopped", 30)
    after = pool.apps()
    assert after["keep"]["pid"] == before["keep"]["pid"]
    assert after["change"]["pid"] == before["change"]["pid"]  # reloaded, not restarted
    assert after["change"]["workers"]["total"] == 3
    assert after["new"]["state"] == "running"
    keep = json.loads(pool.cli("status", "--json", "keep").stdout)
    assert keep["generation"] == 1  # untouched
    # A broken edit keeps the running generation; the error names the file and the key.
    (pool.dir / "keep.toml").write_text((pool.dir / "keep.toml").read_text()
                                        .replace("count = 2", "count = \"two\""))
    os.kill(pool.parent_pid(), signal.SIGHUP)  # the same as `reload`
    app = wait_for(lambda: pool.apps()["keep"]["error"] and pool.apps()["keep"], 30,
                   "keep's error")
    assert app["state"] == "running" and app["pid"] == before["keep"]["pid"]
    assert "keep.toml" in app["error"] and "count" in app["error"], app
    out = pool.cli("reload", "keep")
    assert out.returncode == 1 and "count" in out.stderr, out
    # stop NAME / start NAME act on one app.
    assert pool.cli("stop", "new").returncode == 0
    assert pool.apps()["new"]["state"] == "stopped"
    assert pool.cli("start", "new").returncode == 0
    assert pool.apps()["new"]["state"] == "running"


def test_two_files_on_one_socket_are_both_refused(pool: Pool) -> None:
    pool.write("fine")
    pool.write("one", file="first", manager={"name": "one"})
    pool.write("one", file="second", manager={"name": "one"})  # the same name and socket
    pool.write("other")
    other = pool.dir / "other.toml"
    other.write_text(other.read_text().replace(str(pool.socket("other")),
                                               str(pool.socket("fine"))))
    pool.start()
    apps = pool.apps()
    assert apps["fine"]["state"] == "fatal" and "also claimed by" in apps["fine"]["error"]
    assert apps["other"]["state"] == "fatal" and "other.toml" in apps["fine"]["error"]
    assert apps["one"]["state"] == "fatal", apps
    assert "first.toml" in apps["one"]["error"] or "second.toml" in apps["one"]["error"]
    # Fixed: a reload starts both.
    other.write_text(other.read_text().replace(str(pool.socket("fine")),
                                               str(pool.socket("other"))))
    (pool.dir / "second.toml").unlink()
    out = pool.cli("reload")
    assert out.returncode == 0, out
    apps = pool.apps()
    assert all(apps[n]["state"] == "running" for n in ("fine", "other", "one")), apps


def test_crash_loop_is_fatal_and_a_fix_restarts_it(pool: Pool) -> None:
    pool.write("ok")
    bad = pool.write("flaky", module="no_such_module_either:app", count=1)
    typo = pool.write("typo", workers={"cuont": 2})
    pool.start()
    app = pool.apps()["typo"]
    assert app["state"] == "fatal" and "typo.toml" in app["error"] and "cuont" in app["error"]
    assert "did you mean 'count'" in app["error"], app
    typo.unlink()
    app = pool.apps()["flaky"]
    assert app["state"] == "fatal" and "no_such_module_either" in app["error"]
    assert "keeps failing, so it is fatal" in pool.log_text()
    bad.write_text(bad.read_text().replace("no_such_module_either:app", "poolapp:app"))
    out = pool.cli("reload")
    assert out.returncode == 0, out
    assert pool.apps()["flaky"]["state"] == "running"
    assert "typo" not in pool.apps()  # its file is gone: so is its refusal


def test_foreground_run_notifies_systemd_and_stops_on_term(pool: Pool, tmp_path: Path) -> None:
    pool.write("one")
    pool.write("two")
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(60)
    env = _child_env({"NOTIFY_SOCKET": notify_path})
    proc = subprocess.Popen([sys.executable, "-m", "fcgi_manager", "-c", str(pool.dir), "run",
                             "--pidfile", str(pool.pidfile)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(pool.log, "wb"))
    pool.tracker.add(proc.pid)
    try:
        message = notify.recv(4096).decode()
        pool.track()
        assert "READY=1" in message and f"MAINPID={proc.pid}" in message, message
        assert all(a["state"] == "running" for a in pool.apps().values())
        family = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in notify.recv(4096).decode()
        assert proc.wait(60) == 0
        wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status()
                                 != psutil.STATUS_ZOMBIE for p in family), 30, "all gone")
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.needs("nginx")
def test_parent_reexec_under_load_keeps_the_masters(pool: Pool, tmp_path: Path,
                                                    nginxes: List[PoolNginx]) -> None:
    require_program("nginx")
    pool.write("alpha")
    pool.write("beta")
    pool.start()
    nginx = PoolNginx(tmp_path, pool, ["alpha", "beta"])
    nginxes.append(nginx)
    nginx.start()
    parent = pool.parent_pid()
    before = pool.apps()
    with Load(nginx.port, ["alpha", "beta"]) as load:
        os.kill(parent, signal.SIGUSR2)
        wait_for(lambda: "re-executed: pid" in pool.log_text(), 30, "the new image")
        served = load.served()
        wait_for(lambda: all(load.served()[n] > served[n] + 5 for n in served), 30,
                 "requests after the re-exec")
    assert not load.failures, load.failures[:5]
    assert pool.parent_pid() == parent
    after = pool.apps()
    assert {n: a["pid"] for n, a in after.items()} == {n: a["pid"] for n, a in before.items()}
    # The new image runs the pool: a master that dies is still restarted by it, and
    # per-app commands still work.
    os.kill(after["alpha"]["pid"], signal.SIGKILL)
    wait_for(lambda: pool.apps()["alpha"]["state"] == "running"
             and pool.apps()["alpha"]["pid"] != after["alpha"]["pid"], 60, "alpha restarted")
    pool.track()
    out = pool.cli("reload", "beta")
    assert out.returncode == 0 and "generation 2" in out.stdout, out


def test_watch_applies_the_directory_without_a_reload(pool: Pool) -> None:
    pool.write("first")
    changed = pool.write("second")
    out = pool.cli("start", "--watch", "0.2")
    assert out.returncode == 0, out
    pool.write("third")  # added
    pool.wait_state("third", "running", 60)
    pool.write("second", count=3)  # changed
    wait_for(lambda: json.loads(pool.cli("status", "--json", "second").stdout)
             .get("generation") == 2, 60, "second reloaded")
    first_pid = pool.apps()["first"]["pid"]
    (pool.dir / "first.toml").unlink()  # removed
    pool.wait_state("first", "stopped", 60)
    pool.track()
    assert not psutil.pid_exists(first_pid) or \
        psutil.Process(first_pid).status() == psutil.STATUS_ZOMBIE
    assert "the directory changed: reloading it" in pool.log_text()
    assert changed.exists()
