"""nginx in front of fcgi-manager (examples/nginx/): the Flask guide's sub-path and root
setups, and persistent FastCGI connections (``fastcgi_keep_conn on``)."""

from __future__ import annotations

import threading
import time
from typing import List, Set

import pytest

from .support import (
    Manager,
    Nginx,
    Procs,
    Site,
    check_app,
    http_request,
    unix_connections,
)

pytestmark = pytest.mark.needs("nginx")


@pytest.fixture(scope="module")
def backend(site: Site, procs: Procs) -> Manager:
    config = site.render_toml("flask_app/fcgi-manager.toml", override=site.test_overrides())
    return Manager(site, procs, config).start()


@pytest.fixture(scope="module")
def nginx(site: Site, procs: Procs, backend: Manager) -> Nginx:
    server = Nginx(site, procs)
    for example in ("nginx/subpath.conf", "nginx/root.conf", "nginx/keepconn.conf"):
        server.add(example)
    return server.start()


def test_subpath(nginx: Nginx) -> None:
    port = nginx.ports["subpath.conf"]

    def get(path: str):
        return http_request(port, path)

    check_app(get, "/yourapplication")
    # The bare mount point is rewritten to the app's index, as in the guide.
    bare = get("/yourapplication")
    assert bare.status == 200 and "Hello from yourapplication" in bare.text, bare
    # Outside the mount point nginx answers by itself.
    assert get("/where").status == 404
    echo = http_request(port, "/yourapplication/echo", "POST", body=b"x" * 100000,
                        headers={"Content-Type": "application/octet-stream"})
    assert (echo.status, echo.body) == (200, b"x" * 100000), echo


def test_root(nginx: Nginx) -> None:
    port = nginx.ports["root.conf"]
    check_app(lambda path: http_request(port, path), "")


def _held(backend: Manager) -> Set[int]:
    """The FastCGI connections fcgi-manager's workers hold open (socket inodes)."""
    held = unix_connections(backend.worker_pids(), backend.bind[len("unix:"):])
    return {inode for inodes in held.values() for inode in inodes}


def test_keep_conn_reuses_connections(nginx: Nginx, backend: Manager) -> None:
    port = nginx.ports["keepconn.conf"]
    check_app(lambda path: http_request(port, path), "")
    for _ in range(10):
        assert http_request(port, "/hello/a").status == 200
    before = _held(backend)
    assert before, "with fastcgi_keep_conn on, nginx keeps its FastCGI connections open"
    for _ in range(30):
        assert http_request(port, "/hello/b").status == 200
    after = _held(backend)
    # 30 more requests, and at most one new connection per nginx worker: the kept ones
    # were used again (without keep-conn reuse every request would add one).
    assert before <= after and len(after - before) <= len(nginx.worker_pids()), \
        (before, after)


def test_keep_conn_more_connections_than_workers(nginx: Nginx, backend: Manager) -> None:
    """nginx keeps more idle connections than there are workers (8 clients, 2 workers):
    no request waits for a kept connection to time out."""
    port = nginx.ports["keepconn.conf"]
    latencies: List[float] = []
    failures: List[str] = []

    def client(n: int) -> None:
        for i in range(15):
            started = time.monotonic()
            try:
                r = http_request(port, f"/hello/c{n}-{i}", timeout=30)
                if r.status != 200:
                    failures.append(repr(r))
            except Exception as exc:  # noqa: BLE001 - collected and reported
                failures.append(repr(exc))
            latencies.append(time.monotonic() - started)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures[:5]
    assert len(latencies) == 8 * 15
    assert len(_held(backend)) > 2, "more kept connections than workers"
    assert max(latencies) < 2.0, f"a request waited {max(latencies):.1f} s (keep-conn stall)"
