"""examples/docker/Dockerfile, run as written without a container engine: the final
stage's files (COPY) under a directory of the test, its ENV, its USER and its CMD, as PID
1 of a PID namespace. The image's process serves as the non-root user, with the settings
the environment gives it, and TERM drains it (shutdown_delay), then stops it, exit 0."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
from support import fcgi_request, require_program, wait_for

from .examples import EXAMPLES, ImageRoot, dockerfile_stages, final_stage
from .support import Pid1Master


@pytest.mark.needs("unshare", "nsenter", "setpriv")
def test_the_image_command_serves_as_pid1_and_non_root(image_root: Path) -> None:
    setpriv = require_program("setpriv")
    stage = final_stage()
    assert stage.base.startswith("python:") and stage.base.endswith("-slim"), stage.base
    image = ImageRoot(image_root, stage).build()
    assert image.uid != 0, "USER is not root"
    env = image.environment({})
    command = image.command()
    assert command[:1] == ["fcgi-manager"] and command[-2:] == ["start", "--foreground"], \
        command
    workdir = image.path(stage.last("WORKDIR"))
    # setpriv does what USER does: the uid and gid, no supplementary groups.
    master = Pid1Master(
        Path(image.path("/app/fcgi-manager.toml")),
        argv=[setpriv, f"--reuid={image.uid}", f"--regid={image.gid}", "--clear-groups",
              "--", *command],
        env=env, cwd=Path(workdir), output=image_root / "container.log")
    master.start()
    try:
        socket_path = Path(image.path("/run/fcgi/fcgi.sock"))
        workers = int(env["WEB_CONCURRENCY"])
        master.wait_serving(socket_path, workers=workers)
        assert master.master().uids().real == image.uid
        children = master.children()
        assert len(children) == workers
        assert all(c.uids().real == image.uid and c.gids().real == image.gid
                   for c in children)
        reply = fcgi_request(f"unix:{socket_path}", "/hello/docker", SCRIPT_NAME="",
                             PATH_INFO="/hello/docker")
        assert (reply.status_code, reply.body) == (200, b"Hello, docker!\n"), reply
        # The environment configured it (FCGI_MANAGER_<SECTION>_<KEY>, WEB_CONCURRENCY).
        # `docker exec CONTAINER fcgi-manager status`: as the image's user, inside.
        inside = master.exec([setpriv, f"--reuid={image.uid}", f"--regid={image.gid}",
                              "--clear-groups", "--", *command[:3], "status", "--json"])
        assert inside.returncode == 0, inside
        data = json.loads(inside.stdout)
        assert data["pid"] == 1 and len(data["workers"]) == workers
        # TERM, as `docker stop` sends it (STOPSIGNAL): 503 "draining" at once, then the
        # graceful stop after shutdown_delay, exit status 0.
        assert stage.last("STOPSIGNAL") == "SIGTERM"
        delay = float(env["FCGI_MANAGER_MANAGER_SHUTDOWN_DELAY"])
        began = time.monotonic()
        master.signal(signal.SIGTERM)

        def draining() -> bool:
            reply = fcgi_request(f"unix:{socket_path}", "/fcgi-ping", timeout=5)
            return (reply.status_code, reply.body.strip()) == (503, b"draining")
        wait_for(draining, 2, "the ping path to answer 503 draining")
        hello = fcgi_request(f"unix:{socket_path}", "/hello/still", SCRIPT_NAME="",
                             PATH_INFO="/hello/still")
        assert hello.status_code == 200, hello
        assert master.wait_exit(delay + 30) == 0, master.text()
        assert time.monotonic() - began >= delay
        assert "master stopped" in master.text()
        assert not socket_path.exists()
    finally:
        leaked = master.cleanup()
    assert not leaked, master.text()


def test_the_build_installs_what_the_app_imports() -> None:
    """examples/docker/requirements.txt: the app's own requirements, installed into the
    venv by the build stage (fcgi-manager itself comes from the checkout)."""
    build = dockerfile_stages()[0]
    runs = " ".join(build.all("RUN"))
    assert "/opt/venv/bin/pip install -r /src/requirements.txt" in runs
    assert "/opt/venv/bin/pip install /src/fcgi-manager" in runs
    copied = {dest: sources for sources, dest, _ in build.copies()}
    assert copied["/src/requirements.txt"] == ["examples/docker/requirements.txt"]
    wanted = [line.split(">=")[0].strip().lower() for line in
              (EXAMPLES / "docker" / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    app = (EXAMPLES / "flask_app" / "yourapplication.py").read_text()
    imported = set(re.findall(r"^(?:from|import) (\w+)", app, re.MULTILINE))
    assert imported - {"os", "sys", "json"} <= set(wanted), (imported, wanted)
    final = {dest for _, dest, _ in final_stage().copies()}
    assert "/app/" in final and "/opt/venv" in final
