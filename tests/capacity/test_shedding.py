"""Capacity, shedding: a request that waited longer than ``workers.queue_timeout`` gets a
503 with Retry-After at once, without running the app.

nginx sends ``fastcgi_param REQUEST_START $msec;``. One worker, ``queue_timeout = 1``.
One request holds the worker for 3 s; the requests queued behind it have waited about
3 s when the worker reaches them, so each is answered 503 as soon as it is read: the app
(which appends a line to a file on every call) never sees them, and ``totals.shed``
counts them.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, List

from support import FASTCGI_PARAMS

from .support import (
    SHED_LOCATION,
    Reply,
    assert_mode,
    cap_manager,
    figure,
    get,
    nginx_error_lines,
    poll,
)

QUEUED = 4
BUSY_S = 3


def _calls(path: Path) -> List[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def test_requests_queued_past_queue_timeout_are_shed(
        tmp_path: Path, make_manager: Callable[..., Any],
        make_nginx: Callable[..., Any]) -> None:
    calls = tmp_path / "calls.txt"
    manager = cap_manager(make_manager, "counted:app", count=1, queue_timeout=1)
    manager.update("app", env={"CAPACITY_CALLS": str(calls)})
    manager.start()
    assert_mode(manager, "static")
    nginx = make_nginx(manager.bind,
                       extra_locations=SHED_LOCATION.format(params=FASTCGI_PARAMS))

    # A fresh request is served by the app (nginx's clock and ours agree).
    fresh = get(nginx.port, "/shed/hello")
    assert fresh.status == 200, fresh
    assert len(_calls(calls)) == 1

    with ThreadPoolExecutor(max_workers=QUEUED + 1) as pool:
        busy_f = pool.submit(get, nginx.port, f"/shed/sleep?s={BUSY_S}", 30.0, -1)
        poll(lambda: (len(_calls(calls)) == 2, _calls(calls)), 10,
             "the slow request to reach the app")
        queued_f = [pool.submit(get, nginx.port, f"/shed/hello?n={i}", 30.0, i)
                    for i in range(QUEUED)]
        busy: Reply = busy_f.result()
        queued: List[Reply] = [f.result() for f in queued_f]

    assert busy.status == 200 and b"slept" in busy.body, busy
    for reply in queued:
        assert reply.status == 503, reply
        assert reply.headers.get("retry-after") == "1", reply.headers
    # Answered right after the busy one ended (each shed answer is cheap).
    after = [r.ended - busy.ended for r in queued]
    figure("shed: 503s answered after the busy request ended (s)",
           [round(a, 3) for a in after])
    figure("shed: queued requests waited", max(r.seconds for r in queued), "s")
    assert max(after) < 0.5, after
    # The app ran for the fresh request and the slow one only.
    lines = _calls(calls)
    assert [line.split()[1] for line in lines] == ["/hello", "/sleep"], lines
    data = manager.status()
    figure("shed: totals.shed", data["totals"]["shed"])
    assert data["totals"]["shed"] == QUEUED, data["totals"]
    assert data["totals"]["crashes"] == 0

    # Once the queue is empty, requests are served normally again.
    again = get(nginx.port, "/shed/hello")
    assert again.status == 200, again
    assert len(_calls(calls)) == 3
    assert not nginx_error_lines(nginx.error_log())
    start = time.monotonic()
    manager.stop()
    figure("shed: stop took", time.monotonic() - start, "s")
