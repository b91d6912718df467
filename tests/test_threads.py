"""Threads per worker (``workers.threads`` > 1): real masters, real sockets, real nginx.

Concurrency is proven with a barrier in the app (N requests must be inside it at once),
never with timings; waits poll the status against a deadline.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

import psutil
from support import (
    FCGI_ABORT,
    FCGI_END,
    FCGI_GET_VALUES,
    FCGI_GET_VALUES_RESULT,
    FCGI_HEADER,
    FCGI_STDOUT,
    FcgiReply,
    cgi_params,
    connect_fcgi,
    fcgi_pairs,
    fcgi_record,
    fcgi_request,
    fcgi_request_bytes,
    http_request,
    read_fcgi_records,
    wait_for,
)

from fcgi_manager.rules.pool import threaded_view
from fcgi_manager.scoreboard import Scoreboard

APP = "threads_app:app"


def threaded(make_manager: Any, threads: int, count: int = 1, **workers: Any) -> Any:
    manager = make_manager(APP, count=count, workers={"threads": threads, **workers},
                           status={"path": "/fcgi-status"})
    manager.start()
    return manager


def busy_threads(manager: Any, n: int, timeout: float = 15.0) -> Dict[str, Any]:
    """Wait until exactly ``n`` requests are in flight; the status then."""
    def check() -> Any:
        data = manager.status()
        return data if data["totals"]["busy_threads"] == n else None
    return wait_for(check, timeout, f"{n} request(s) in flight")


def get(manager: Any, path: str, timeout: float = 60.0) -> FcgiReply:
    query = path.partition("?")[2]
    return fcgi_request(manager.bind, path, timeout=timeout, QUERY_STRING=query)


# -- pure parts -------------------------------------------------------------------------

def test_thread_entries_fold_into_the_slot_view() -> None:
    board = Scoreboard(4)
    board.assign(0, 100, 1)
    board.reserve_threads(0, 3)
    board.assign(1, 101, 1)
    board.reserve_threads(1, 2)
    first0, n0 = board._thread_range(0)
    first1, n1 = board._thread_range(1)
    assert n0 == 3 and n1 == 2 and first1 >= first0 + n0  # ranges never overlap
    board.mem[board.entries_off - 1]  # the slots stay where they were
    writers = board.thread_writers(0)
    writers[0].idle()
    writers[2].busy("POST", "/second")
    writers[1].busy("GET", "/third")
    writers[2].busy("POST", "/second")  # rewritten: still one entry per thread
    slot = board.read_slot(0)
    assert slot["threads"] == 3
    assert slot["requests"] == 1
    assert [f[1:] for f in slot["in_flight"]] == [("POST", "/second"), ("GET", "/third")] or \
        [f[1:] for f in slot["in_flight"]] == [("GET", "/third"), ("POST", "/second")]
    assert slot["busy_since"] == min(f[0] for f in slot["in_flight"])
    assert board.read_slot(1)["in_flight"] == []
    # A freed slot's range is reused, zeroed.
    board.clear(0)
    board.assign(2, 102, 1)
    board.reserve_threads(2, 3)
    assert board._thread_range(2) == (first0, 3)
    assert board.read_slot(2)["requests"] == 0


def test_thread_region_grows_and_a_remapped_board_sees_it() -> None:
    board = Scoreboard(2)
    board.assign(0, 100, 1)
    board.reserve_threads(0, 200)
    assert board.entry_capacity >= 200
    board.thread_writers(0)[199].busy("GET", "/last")
    if board.fd is not None:  # what a re-executed master maps from the memfd
        again = Scoreboard(2, fd=board.fd)
        assert again.read_slot(0)["in_flight"][0][2] == "/last"


def test_threaded_demand_is_busy_threads() -> None:
    # 4 workers of 16 threads, 8 busy in each: 32 free threads = 2 spare workers.
    assert threaded_view("dynamic", 16, 32, 4, 4, 0) == (2, 2, 0)
    # ondemand: a worker with any free thread can take a connection.
    assert threaded_view("ondemand", 16, 1, 1, 2, 0) == (1, 1, 0)
    # 20 waiting connections need 2 more workers of 16.
    assert threaded_view("dynamic", 16, 0, 0, 2, 20) == (0, 2, 2)


# -- real workers -----------------------------------------------------------------------

def test_eight_sleeping_requests_on_eight_threads_finish_together(make_manager: Any) -> None:
    manager = threaded(make_manager, 8)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: get(manager, "/gate?n=8"), range(8)))
    assert [r.status_code for r in replies] == [200] * 8, replies
    assert all(r.body == b"met\n" for r in replies)
    info = get(manager, "/")
    pid, thread, multithread = info.body.decode().split()
    assert multithread == "True" and thread.startswith("fcgi-app-")
    assert manager.status()["workers"][0]["pid"] == int(pid)


def test_status_lists_every_request_in_flight(make_manager: Any, tmp_path: Path) -> None:
    manager = threaded(make_manager, 8)
    release = tmp_path / "release"
    with ThreadPoolExecutor(5) as pool:
        holds = [pool.submit(get, manager, f"/hold?file={release}&n={i}") for i in range(5)]
        data = busy_threads(manager, 5)
        worker = data["workers"][0]
        assert worker["state"] == "busy" and worker["threads"] == 8
        assert len(worker["in_flight"]) == 5
        assert all(f["uri"].startswith("/hold") for f in worker["in_flight"])
        oldest = max(f["elapsed_s"] for f in worker["in_flight"])
        assert worker["current"]["elapsed_s"] >= oldest - 0.5
        assert data["totals"]["threads"] == 8
        # The status page is served by a free thread of the same busy worker (it counts
        # itself: 6 requests in flight).
        page = get(manager, "/fcgi-status?openmetrics")
        assert b"fcgi_manager_busy_threads 6" in page.body
        assert b'fcgi_manager_worker_busy_threads{id="1"' in page.body
        text = manager.cli("status").stdout
        assert "+4 more" in text and "threads 5/8 busy" in text
        release.touch()
        assert [h.result().status_code for h in holds] == [200] * 5
    busy_threads(manager, 0)


def test_a_hung_request_logs_every_thread_and_the_others_finish(
        make_manager: Any, tmp_path: Path) -> None:
    manager = threaded(make_manager, 4, timeout=2, graceful_timeout=15)
    old_pid = manager.status()["workers"][0]["pid"]
    never = tmp_path / "never"
    with ThreadPoolExecutor(3) as pool:
        hung = pool.submit(get, manager, f"/hold?file={never}")
        busy_threads(manager, 1)
        others = [pool.submit(get, manager, "/sleep?s=4") for _ in range(2)]
        busy_threads(manager, 3)
        manager.wait_log("past workers.timeout")
        # The two younger requests get graceful_timeout and finish normally.
        assert [o.result().status_code for o in others] == [200, 200]
        assert hung.result().status_code != 200  # cut off when its worker is killed
    log = manager.wait_log("after its request ran past workers.timeout", timeout=30)
    assert "other request(s) in flight get workers.graceful_timeout" in log
    # faulthandler wrote every thread: the hung one and the two sleeping ones.
    assert log.count("Thread 0x") >= 4, log
    assert "hold_for_test" in log and "sleep_for_test" in log
    data = manager.wait_workers(1)
    assert data["workers"][0]["pid"] != old_pid
    assert data["totals"]["timeouts"] == 1


def test_graceful_stop_finishes_requests_of_busy_threads(make_manager: Any) -> None:
    manager = threaded(make_manager, 4)
    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(get, manager, "/sleep?s=2") for _ in range(3)]
        busy_threads(manager, 3)
        assert manager.stop().returncode == 0
        assert [r.result().status_code for r in running] == [200] * 3


def test_reload_finishes_requests_of_busy_threads(make_manager: Any) -> None:
    manager = threaded(make_manager, 4, count=2)
    old = set(manager.worker_pids())
    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(get, manager, "/sleep?s=2") for _ in range(3)]
        busy_threads(manager, 3)
        result = manager.cli("reload", timeout=60)
        assert result.returncode == 0, result
        assert [r.result().status_code for r in running] == [200] * 3
    data = manager.wait_workers(2, generation=2)
    assert not old & set(manager.worker_pids(data))
    assert get(manager, "/").status_code == 200


def _recycles_behind_long_requests(manager: Any, trigger: str, quick: int) -> None:
    """Two 6-s requests in flight; ``trigger`` makes the worker leave (max_requests or
    max_memory); every later request must be answered by the replacement right away --
    not after the old worker's slowest request -- and both long ones must end with 200."""
    with ThreadPoolExecutor(4) as pool:
        holds = [pool.submit(get, manager, f"/sleep?s=6&n={i}", 30.0) for i in range(2)]
        busy_threads(manager, 2)
        began = time.monotonic()
        assert get(manager, trigger, 5.0).status_code == 200
        slowest = 0.0
        for i in range(quick):
            t0 = time.monotonic()
            reply = get(manager, f"/?i={i}", 5.0)  # the client would give up long before 6 s
            slowest = max(slowest, time.monotonic() - t0)
            assert reply.status_code == 200
        # The old worker still serves its two long requests while the new one answers.
        assert time.monotonic() - began < 5.5, "the quick requests waited for the long ones"
        assert slowest < 2.0, f"a new request waited {slowest:.1f} s behind the recycling"
        assert [h.result().status_code for h in holds] == [200, 200]


def test_recycling_never_drops_requests_in_flight(make_manager: Any) -> None:
    manager = threaded(make_manager, 4, max_requests=3)
    _recycles_behind_long_requests(manager, "/", quick=6)
    data = wait_for(lambda: (d := manager.status())["totals"]["recycled"] >= 2 and d, 20,
                    "workers recycled")
    assert data["totals"]["crashes"] == 0
    manager.wait_log("stopped accepting (max_requests)")


def test_a_worker_over_max_memory_is_replaced_while_it_finishes(make_manager: Any) -> None:
    manager = threaded(make_manager, 4, max_memory="150M")
    _recycles_behind_long_requests(manager, "/grow?mb=200", quick=6)
    data = wait_for(lambda: (d := manager.status())["totals"]["recycled"] >= 1 and d, 20,
                    "worker recycled")
    assert data["totals"]["crashes"] == 0
    manager.wait_log("stopped accepting (max_memory)")


def test_a_leaving_worker_shows_stopping_with_what_it_serves(make_manager: Any) -> None:
    manager = threaded(make_manager, 4, max_requests=1)
    release_file = f"/tmp/never-{os.getpid()}-{time.monotonic_ns()}"
    with ThreadPoolExecutor(2) as pool:
        hold = pool.submit(get, manager, f"/hold?file={release_file}", 30.0)
        busy_threads(manager, 1)
        assert get(manager, "/", 5.0).status_code == 200  # its first request ends: it leaves
        data = wait_for(lambda: (d := manager.status()) and len(d["workers"]) == 2 and d, 10,
                        "the replacement beside the leaving worker")
        old = [w for w in data["workers"] if w["state"] == "stopping"]
        assert len(old) == 1 and old[0]["in_flight"][0]["uri"].startswith("/hold")
        Path(release_file).touch()
        try:
            assert hold.result().status_code == 200
        finally:
            os.unlink(release_file)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the connection closed in the middle of a record"
        data += chunk
    return data


def _read_until_stdout(sock: socket.socket, want: int) -> int:
    """Read whole records until ``want`` bytes of STDOUT came, stopping on a record
    boundary, so that whoever reads next starts at a record header."""
    got = 0
    while got < want:
        _, rtype, _, clen, plen = FCGI_HEADER.unpack(_recv_exact(sock, 8))
        _recv_exact(sock, clen + plen)
        if rtype == FCGI_STDOUT:
            got += clen
    return got


def test_abort_request_on_one_thread_while_others_run(make_manager: Any) -> None:
    manager = threaded(make_manager, 4)
    with ThreadPoolExecutor(2) as pool:
        others = [pool.submit(get, manager, "/sleep?s=2") for _ in range(2)]
        busy_threads(manager, 2)
        with connect_fcgi(manager.bind) as sock:
            sock.sendall(fcgi_request_bytes(cgi_params("/stream"), keep_conn=True))
            _read_until_stdout(sock, 200_000)
            sock.sendall(fcgi_record(FCGI_ABORT, 1))
            records = read_fcgi_records(sock, 1, 20)
            assert records and records[-1][0] == FCGI_END
            # The connection stays usable: the next request on it is answered.
            sock.sendall(fcgi_request_bytes(cgi_params("/"), keep_conn=True))
            reply = FcgiReply(read_fcgi_records(sock, 1, 20))
            assert reply.status_code == 200 and b"True" in reply.body
        assert [o.result().status_code for o in others] == [200, 200]
    manager.wait_log("FCGI_ABORT_REQUEST")
    assert manager.status()["totals"]["crashes"] == 0


def test_a_client_that_hangs_up_costs_only_its_request(make_manager: Any) -> None:
    manager = threaded(make_manager, 4)
    with ThreadPoolExecutor(2) as pool:
        others = [pool.submit(get, manager, "/sleep?s=1") for _ in range(2)]
        busy_threads(manager, 2)
        sock = connect_fcgi(manager.bind)
        sock.sendall(fcgi_request_bytes(cgi_params("/stream")))
        _read_until_stdout(sock, 100_000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        manager.wait_log("GET /stream: ")  # stopped at the next flush, logged once
        assert [o.result().status_code for o in others] == [200, 200]
    busy_threads(manager, 0)
    assert manager.status()["totals"]["crashes"] == 0


def test_keep_conn_with_more_kept_connections_than_threads(
        make_manager: Any, make_nginx: Any, tmp_path: Path) -> None:
    manager = threaded(make_manager, 4)
    nginx = make_nginx(manager.bind, keep_conn=True, keepalive=16)
    release = tmp_path / "release"
    # Warm up: 8 requests at once leave nginx with 8 kept connections to a worker of 4
    # threads (4 wait for a thread, then all 8 go back to nginx's cache).
    with ThreadPoolExecutor(8) as pool:
        warm = list(pool.map(lambda _: http_request(nginx.port, "GET", "/sleep?s=0.3"),
                             range(8)))
    assert [r.status for r in warm] == [200] * 8
    worker = psutil.Process(manager.status()["workers"][0]["pid"])
    assert len(worker.net_connections(kind="unix")) - 1 > 4  # kept connections > threads
    with ThreadPoolExecutor(12) as pool:
        holds = [pool.submit(http_request, nginx.port, "GET", f"/hold?file={release}&n={i}")
                 for i in range(2)]
        busy_threads(manager, 2)
        # Two threads are held: the others serve kept and new connections meanwhile.
        quick: List[Future] = [pool.submit(http_request, nginx.port, "GET", "/")
                               for _ in range(40)]
        assert [q.result().status for q in quick] == [200] * 40
        assert not any(h.done() for h in holds)
        release.touch()
        assert [h.result().status for h in holds] == [200, 200]
    errors = [line for line in nginx.error_log().splitlines()
              if "[error]" in line or "upstream prematurely" in line or "reset" in line]
    assert not errors, errors


def test_ondemand_forks_for_busy_threads_not_busy_processes(
        make_manager: Any, tmp_path: Path) -> None:
    manager = make_manager(APP, count=1, workers={"threads": 3, "mode": "ondemand",
                                                   "max_workers": 4, "idle_timeout": 30})
    manager.start()
    release = tmp_path / "release"
    with ThreadPoolExecutor(8) as pool:
        holds = [pool.submit(get, manager, f"/hold?file={release}&n={i}") for i in range(2)]
        busy_threads(manager, 2)
        # One worker, two of its three threads busy: it still has room, so no new worker.
        for _ in range(5):
            assert get(manager, "/").status_code == 200
        assert len(manager.status()["workers"]) == 1
        # Its last thread taken: the next request needs a second worker.
        holds.append(pool.submit(get, manager, f"/hold?file={release}&n=2"))
        busy_threads(manager, 3)
        assert get(manager, "/", timeout=30).status_code == 200
        assert len(manager.status()["workers"]) == 2
        release.touch()
        assert [h.result().status_code for h in holds] == [200] * 3


def test_dynamic_keeps_spare_threads(make_manager: Any, tmp_path: Path) -> None:
    manager = make_manager(APP, count=1, workers={"threads": 4, "mode": "dynamic",
                                                   "min_spare": 1, "max_spare": 2,
                                                   "max_workers": 4})
    manager.start()
    release = tmp_path / "release"
    with ThreadPoolExecutor(4) as pool:
        holds = [pool.submit(get, manager, f"/hold?file={release}&n={i}") for i in range(2)]
        busy_threads(manager, 2)
        # Two free threads are less than one spare worker of four: the pool grows.
        wait_for(lambda: len(manager.status()["workers"]) == 2, 15, "a second worker")
        release.touch()
        assert [h.result().status_code for h in holds] == [200] * 2
    data = manager.status()
    assert data["totals"]["threads"] == 8 and data["totals"]["crashes"] == 0


def test_write_timeout_ends_one_request_while_others_run(make_manager: Any) -> None:
    manager = threaded(make_manager, 2, write_timeout=1)
    stuck = connect_fcgi(manager.bind)
    try:
        # A client that stops reading: its thread blocks in a write until write_timeout.
        stuck.sendall(fcgi_request_bytes(cgi_params("/stream")))
        busy_threads(manager, 1)
        for _ in range(3):  # the other thread serves meanwhile
            assert get(manager, "/sleep?s=0.1").status_code == 200
        manager.wait_log("write timeout: the web server stopped reading", timeout=20)
        busy_threads(manager, 0)
    finally:
        stuck.close()
    assert get(manager, "/").status_code == 200
    assert manager.status()["totals"]["crashes"] == 0


def test_records_behind_a_request_wait_for_its_thread(make_manager: Any) -> None:
    """A management record sent right behind a request is answered after that request's
    END_REQUEST (only one thread touches a connection), and says how many requests a
    worker runs at once."""
    manager = threaded(make_manager, 4)
    ask = fcgi_record(FCGI_GET_VALUES, 0, fcgi_pairs({"FCGI_MAX_REQS": "",
                                                      "FCGI_MPXS_CONNS": ""}))
    with connect_fcgi(manager.bind) as sock:
        params = cgi_params("/sleep?s=0.3", QUERY_STRING="s=0.3")
        sock.sendall(fcgi_request_bytes(params, keep_conn=True) + ask)
        records = _records_until(sock, FCGI_GET_VALUES_RESULT)
    kinds = [r[0] for r in records]
    assert kinds[-2:] == [FCGI_END, FCGI_GET_VALUES_RESULT], kinds
    assert FcgiReply(records[:-1]).body == b"slept\n"
    assert b"FCGI_MAX_REQS4" in records[-1][2] and b"FCGI_MPXS_CONNS0" in records[-1][2]


def _records_until(sock: socket.socket, last_type: int) -> List[Any]:
    """Every record up to and including the first of ``last_type``."""
    sock.settimeout(20)
    buf = b""
    records: List[Any] = []
    while True:
        data = sock.recv(65536)
        assert data, f"the connection closed before a record of type {last_type}"
        buf += data
        while len(buf) >= 8:
            _, rtype, rid, clen, plen = FCGI_HEADER.unpack(buf[:8])
            if len(buf) < 8 + clen + plen:
                break
            records.append((rtype, rid, buf[8:8 + clen]))
            buf = buf[8 + clen + plen:]
            if rtype == last_type:
                return records
