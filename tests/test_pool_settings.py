"""php-fpm's pool settings: rlimit_files, rlimit_core, priority, listen.acl_users/groups,
workers.max_spawn_rate and status.listen (the page the master answers itself).

Each key is validated with an error naming it; the real ones are checked on real
processes: the workers' /proc limits and nice value, the socket's ACL, and the status
page through nginx while every worker sleeps in a request.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest

from fcgi_manager import acl
from fcgi_manager.config import build
from fcgi_manager.errors import BindError, ConfigError
from fcgi_manager.rules.pool import PoolSizer, PoolView
from tests.support import Manager, fcgi_request, require_program, wait_for


def _cfg(**sections: Dict[str, Any]) -> Any:
    data: Dict[str, Dict[str, Any]] = {"app": {"module": "hello:app"}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return build(data, source="/etc/app.toml", base="/etc")


@pytest.mark.parametrize("sections, key", [
    ({"manager": {"rlimit_files": "lots"}}, "rlimit_files"),
    ({"manager": {"rlimit_core": -5}}, "rlimit_core"),
    ({"manager": {"priority": 30}}, "priority"),
    ({"manager": {"priority": "low"}}, "priority"),
    ({"listen": {"acl_users": [1]}}, "acl_users"),
    ({"listen": {"acl_groups": ["bad:name"]}}, "acl_groups"),
    ({"listen": {"bind": "127.0.0.1:9000", "acl_users": ["nobody"]}}, "acl_users"),
    ({"workers": {"max_spawn_rate": 0}}, "max_spawn_rate"),
    ({"status": {"listen": "fd:0"}}, "[status] listen"),
    ({"status": {"listen": 9}}, "listen"),
    ({"listen": {"bind": "unix:/run/a.sock"}, "status": {"listen": "unix:/run/a.sock"}},
     "[status] listen"),
])
def test_each_key_is_validated_and_named(sections: Dict[str, Dict[str, Any]], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _cfg(**sections)
    assert key in info.value.message and "/etc/app.toml" in info.value.message


def test_values_as_read() -> None:
    cfg = _cfg(manager={"rlimit_files": 65536, "rlimit_core": "unlimited", "priority": -5},
               listen={"bind": "unix:app.sock", "acl_users": "www-data",
                       "acl_groups": ["www-data"]},
               workers={"max_spawn_rate": 8}, status={"listen": "unix:status.sock"})
    assert (cfg.manager.rlimit_files, cfg.manager.rlimit_core, cfg.manager.priority) == \
        (65536, "unlimited", -5)
    assert cfg.listen.acl_users == ("www-data",) and cfg.listen.acl_groups == ("www-data",)
    assert cfg.workers.max_spawn_rate == 8
    assert cfg.status.listen == "unix:/etc/status.sock"  # relative to the file
    defaults = _cfg()
    assert defaults.manager.rlimit_files == defaults.manager.priority == ""  # inherited
    assert defaults.workers.max_spawn_rate == 32 and defaults.status.listen == ""


def test_max_spawn_rate_bounds_forks_per_second() -> None:
    cfg = _cfg(workers={"mode": "dynamic", "max_workers": 500, "max_spawn_rate": 5,
                        "count": 1}).workers
    sizer = PoolSizer(cfg)
    spawned: List[float] = []
    total = 1
    for tick in range(12):  # three seconds of 0.25 s ticks under a burst
        now = tick * 0.25
        d = sizer.decide(PoolView(total=total, idle=0, busy=total, starting=0, now=now,
                                  waiting=400))
        spawned += [now] * d.spawn
        total += d.spawn
    for second in range(3):
        assert sum(1 for t in spawned if second <= t < second + 1) <= 5
    assert len(spawned) >= 10  # and it does grow


def test_acl_without_setfacl_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acl.shutil, "which", lambda *a, **k: None)
    with pytest.raises(BindError) as info:
        acl.grant("/tmp/x.sock", ["root"], [])
    assert "listen.acl_users" in info.value.message and "apt install acl" in info.value.hint


def test_acl_unknown_user_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        acl.grant("/tmp/x.sock", [], ["no-such-group-here"])
    assert "listen.acl_groups" in info.value.message


def _limits(pid: int) -> Dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        name = line[:26].strip()
        out[name] = line[26:47].strip()
    return out


@pytest.mark.needs("setfacl", "getfacl")
def test_limits_priority_and_acl_on_real_workers(make_manager: Callable[..., Manager]) -> None:
    require_program("setfacl")
    getfacl = require_program("getfacl")
    m = make_manager("hello:app", count=2,
                     manager={"rlimit_files": 2048, "rlimit_core": 0, "priority": 7},
                     listen={"acl_users": ["nobody"], "acl_groups": ["nogroup"]})
    m.start()
    data = m.record()
    import os
    import subprocess

    for w in data["workers"]:
        limits = _limits(w["pid"])
        assert limits["Max open files"] == "2048", limits
        assert limits["Max core file size"] == "0", limits
        assert os.getpriority(os.PRIO_PROCESS, w["pid"]) == 7
    assert os.getpriority(os.PRIO_PROCESS, data["pid"]) != 7  # the master keeps its own
    acl_text = subprocess.run([getfacl, "-p", str(m.socket_path)], capture_output=True,
                              text=True, check=True).stdout
    assert "user:nobody:rw-" in acl_text and "group:nogroup:rw-" in acl_text, acl_text


@pytest.mark.needs("nginx")
def test_status_listen_answers_while_every_worker_sleeps(
        make_manager: Callable[..., Manager], tmp_path: Path, make_nginx: Callable) -> None:
    require_program("nginx")
    status_sock = tmp_path / "status.sock"
    m = make_manager("slow:app", count=2, status={"listen": f"unix:{status_sock}",
                                                   "ping_path": "/fcgi-ping"})
    m.start()
    extra = f"""
        location = /fcgi-status {{
            include /etc/nginx/fastcgi_params;
            fastcgi_pass unix:{status_sock};
        }}
        location = /fcgi-ping {{
            include /etc/nginx/fastcgi_params;
            fastcgi_pass unix:{status_sock};
        }}
"""
    nginx = make_nginx(str(m.bind), extra_locations=extra)
    sleepers = [threading.Thread(target=nginx.get, args=("/sleep?s=4",), daemon=True)
                for _ in range(2)]
    for t in sleepers:
        t.start()
    m.wait_workers(2, state="busy")
    started = time.monotonic()
    page = nginx.get("/fcgi-status?json", timeout=3)
    assert time.monotonic() - started < 2
    assert page.status == 200, page
    data = page.json()
    assert [w["state"] for w in data["workers"]] == ["busy", "busy"], data
    assert nginx.get("/fcgi-ping", timeout=3).text == "pong\n"
    metrics = nginx.get("/fcgi-status?openmetrics", timeout=3)
    assert 'fcgi_manager_workers{state="busy"} 2' in metrics.text and \
        metrics.text.rstrip().endswith("# EOF"), metrics.text[-300:]
    # Straight on the socket too (no web server): the answer's shape is FastCGI's.
    reply = fcgi_request(f"unix:{status_sock}", "/anything", timeout=3)
    assert reply.status_code == 200 and b"busy" in reply.body
    for t in sleepers:
        t.join(30)
    assert json.loads(fcgi_request(f"unix:{status_sock}", "/x", QUERY_STRING="json")
                      .body)["totals"]["accepted"] >= 2
    m.stop()
    wait_for(lambda: not status_sock.exists(), 10, "the status socket removed on stop")
