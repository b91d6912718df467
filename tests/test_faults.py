"""Under faults, the limits hold as written (issue: memory checked per request, no fixed
pauses, no false timeouts, no silent losses). Each test goes through the real CLI and a
real master; none is timed to the second: bounds with margins, polling with deadlines.
"""

from __future__ import annotations

import collections
from typing import Any

import pytest
from support import fcgi_request

APP = "threads_app:app"


def get(manager: Any, path: str, timeout: float = 10.0) -> Any:
    return fcgi_request(manager.bind, path, timeout=timeout,
                        QUERY_STRING=path.partition("?")[2])


# -- max_memory after every request ---------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 4])
def test_max_memory_is_checked_after_every_request(make_manager: Any, threads: int) -> None:
    """12 quick requests that each keep 50 MiB, max_memory 100 MiB: a worker may take a
    request only while under the limit, so none serves more than two of them (it was
    checked once a second: one worker served all twelve and reached 6x the limit)."""
    manager = make_manager(APP, count=1, workers={"threads": threads, "max_memory": "100M"})
    manager.start()
    served = collections.Counter()
    for _ in range(12):
        reply = get(manager, "/grow?mb=50")
        assert reply.status_code == 200
        served[int(reply.body)] += 1
    assert max(served.values()) <= 2, served
    data = manager.status()
    assert data["totals"]["crashes"] == 0
    assert all((w["rss_bytes"] or 0) < 200 << 20 for w in data["workers"]), data["workers"]
    manager.wait_log("is over workers.max_memory")
