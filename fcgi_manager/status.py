"""Status as plain data, rendered once per format: human table, JSON, OpenMetrics.

:func:`snapshot` reads only the scoreboard (and the config), so the master (for
``fcgi-manager status``) and any worker (for the ``[status] path`` page) produce the same
object. Values the OS cannot tell are ``None``, never guesses.
"""

from __future__ import annotations

import errno
import json
import time
from typing import Any, Dict, List, Optional
from urllib.parse import parse_qs

from . import compiled
from .escaping import escape
from .logs import shown_uri
from .privileges import ROOT_WARNING, workers_user
from .scoreboard import DURATION_BUCKETS, Scoreboard
from .version import __version__


def snapshot(cfg: Any, board: Scoreboard) -> Dict[str, Any]:
    head = board.read_header()
    now = time.time()
    mono = time.monotonic()
    workers: List[Dict[str, Any]] = []
    accepted = int(head["accepted_dead"])
    shed = int(head["shed_dead"])
    active = idle = busy_threads = threads = 0
    backoffs = int(head["accept_backoffs_dead"])
    lost = int(head["log_lines_lost_dead"]) + int(head["master_log_lost"])
    log_errno = int(head["master_log_errno"])
    for slot in board.read_all():
        pid = slot.pid
        if pid <= 0:
            continue
        accepted += slot.requests
        shed += slot.shed
        state = str(slot.state)
        current = None
        if state == "busy":
            active += 1
            current = {"method": slot.method,
                       "uri": shown_uri(slot.uri, cfg.status.show_query),
                       "elapsed_s": round(max(0.0, mono - slot.busy_since), 3)}
        elif state == "idle":
            idle += 1
        in_flight = [{"method": m, "uri": shown_uri(u, cfg.status.show_query),
                      "elapsed_s": round(max(0.0, mono - since), 3)}
                     for since, m, u in slot.in_flight]
        busy_threads += len(in_flight)
        threads += slot.threads
        if slot.stuck:
            state = "stuck"  # missed its heartbeat while idle: being replaced
        elif slot.stopping:
            state = "stopping"  # asked to stop; ``current`` shows the request it finishes
        backoffs += slot.accept_backoffs
        lost += slot.log_lines_lost
        started = slot.started_at
        workers.append({
            "id": slot.id,
            "pid": pid,
            "state": state,
            "stopped": _stopped(pid),
            "generation": slot.generation,
            "requests": slot.requests,
            "started_at": round(started, 3),
            "uptime_s": round(max(0.0, now - started), 1),
            "rss_bytes": slot.rss or None,
            "cpu_percent": round(slot.cpu, 1),
            "current": current,
            "threads": slot.threads,
            "in_flight": in_flight,
            "accept_backoffs": slot.accept_backoffs,
            "log_lines_lost": slot.log_lines_lost,
        })
    workers.sort(key=lambda w: (w["id"], w["started_at"]))
    queue = int(head["queue"])
    max_queue = int(head["max_queue"])
    started_at = float(head["started_at"])
    w = cfg.workers
    counts, duration_sum = board.read_histogram()
    return {
        "pid": int(head["master_pid"]),
        "version": __version__,
        "core": compiled.core(),  # "compiled" or "pure": which request core the workers run
        "started_at": round(started_at, 3),
        "uptime_s": round(max(0.0, now - started_at), 1),
        "config": cfg.source or None,
        "app": cfg.app.module,
        "generation": int(head["generation"]),
        "mode": w.mode,
        "target_workers": int(head["target"]),
        "backoff_s": round(head["backoff_ms"] / 1000.0, 2),
        "listen": {
            "bind": cfg.listen.bind,
            "backlog": cfg.listen.backlog,
            "queue": queue if queue >= 0 else None,
            "max_queue": max_queue if max_queue >= 0 else None,
        },
        "totals": {
            "accepted": accepted,
            "active": active,
            "idle": idle,
            "max_active": max(int(head["max_active"]), active),
            "respawns": int(head["respawns"]),
            "crashes": int(head["crashes"]),
            "timeouts": int(head["timeouts"]),
            "slow": int(head["slow"]),
            "recycled": int(head["recycled"]),
            "shed": shed,
            "max_children_reached": int(head["max_children_reached"]),
            "busy_threads": busy_threads,
            "threads": threads,
            "accept_backoffs": backoffs,
            "log_lines_lost": lost,
            "stuck": int(head["stuck"]),
        },
        "request_duration": {  # cumulative, as Prometheus histograms are
            "buckets": [[le, n] for le, n in zip(DURATION_BUCKETS, counts)],
            "count": counts[-1],
            "sum_s": round(duration_sum, 6),
        },
        "workers": workers,
        "workers_user": workers_user(cfg),
        "log_error": (f"log write failing: {errno.errorcode.get(log_errno, log_errno)} on "
                      f"{cfg.manager.log}") if log_errno else None,
    }


def _stopped(pid: int) -> bool:
    """Is ``pid`` stopped (SIGSTOP, a debugger)? Its scoreboard state is what it wrote
    before it stopped, so status says this apart: "busy" may mean "frozen"."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] in (b"T", b"t")


# -- rendering ---------------------------------------------------------------------------

def human_size(n: Optional[int]) -> str:
    if not n:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def human_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def render_text(data: Dict[str, Any]) -> str:
    t = data["totals"]
    li = data["listen"]
    queue = "-" if li["queue"] is None else str(li["queue"])
    max_queue = "-" if li["max_queue"] is None else str(li["max_queue"])
    lines = [
        f"fcgi-manager {data['version']}{_core_note(data)}  master pid {data['pid']}  up "
        f"{human_duration(data['uptime_s'])}  generation {data['generation']}",
        f"app      {data['app']}" + (f"  ({data['config']})" if data.get("config") else "")
        + (f"  as {data['workers_user']}" if data.get("workers_user") else ""),
        f"listen   {li['bind']}  queue {queue}/{li['backlog']} (max {max_queue})",
        f"workers  {len(data['workers'])} ({data['mode']}, target {data['target_workers']}): "
        f"{t['active']} busy, {t['idle']} idle, max busy {t['max_active']}"
        + (f"; threads {t['busy_threads']}/{t['threads']} busy"
           if t["threads"] > len(data["workers"]) else "")
        + (f"  BACKOFF {data['backoff_s']}s" if data.get("backoff_s") else ""),
        f"requests {t['accepted']} served, {t['shed']} shed   workers: {t['respawns']} "
        f"respawned, {t['crashes']} crashed, {t['timeouts']} timed out, {t['recycled']} "
        f"recycled, {t['slow']} slow requests, max_workers reached {t['max_children_reached']}",
        "",
    ]
    faults = [f"{t[k]} {what}" for k, what in (
        ("accept_backoffs", "accept back-offs (open-files limit)"),
        ("log_lines_lost", "log lines lost"), ("stuck", "stuck workers replaced"))
        if t.get(k)]
    if faults:
        lines.insert(-1, "faults   " + ", ".join(faults))
    if data.get("log_error"):
        lines.insert(-1, f"warning  {data['log_error']}")
    if data.get("workers_user") == "root":
        lines.insert(-1, f"warning  {ROOT_WARNING}")
    header = ("ID", "PID", "STATE", "GEN", "REQS", "UPTIME", "RSS", "CPU%", "CURRENT")
    rows = [header]
    for w in data["workers"]:
        cur = w["current"]
        current = (escape(f"{cur['method']} {cur['uri']}") +
                   f" ({human_duration(cur['elapsed_s'])})" if cur else "") + _more_in_flight(w)
        state = w["state"] + (" (stopped)" if w.get("stopped") else "")
        rows.append((str(w["id"]), str(w["pid"]), state, str(w["generation"]),
                     str(w["requests"]), human_duration(w["uptime_s"]),
                     human_size(w["rss_bytes"]), f"{w['cpu_percent']:.1f}", current))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        cells = [r[i].rjust(widths[i]) if i in (0, 1, 3, 4, 6, 7) else r[i].ljust(widths[i])
                 for i in range(len(widths))]
        lines.append("  ".join(cells + [r[-1]]).rstrip())
    return "\n".join(lines) + "\n"


def _core_note(data: Dict[str, Any]) -> str:
    """" (compiled core)" or " (pure Python)"; nothing from a master that does not say."""
    core = data.get("core")
    if core is None:
        return ""
    return f" ({compiled.describe(core)})"


def _more_in_flight(worker: Dict[str, Any]) -> str:
    """" +N more" after the oldest request of a threaded worker running several."""
    more = len(worker.get("in_flight") or ()) - 1
    return f" +{more} more" if more > 0 else ""


def render_json(data: Dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels) + "}"


def _metric(out: List[str], name: str, kind: str, help_text: str,
            samples: List[tuple], unit: str = "") -> None:
    """One metric family: ``# TYPE``, ``# HELP`` (and ``# UNIT``), then its samples.
    Counters get ``_total`` on each sample, as OpenMetrics requires."""
    full = f"fcgi_manager_{name}"
    out.append(f"# TYPE {full} {kind}")
    if unit:
        out.append(f"# UNIT {full} {unit}")
    out.append(f"# HELP {full} {help_text}")
    suffix = {"counter": "_total", "info": "_info"}.get(kind, "")
    for labels, value in samples:
        if value is None:
            continue
        out.append(f"{full}{suffix}{_labels(labels)} {value}")


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# status --json totals -> counters (fcgi_manager_<name>_total), by Prometheus' conventions.
COUNTERS = {
    "accepted": ("requests", "Requests served."),
    "respawns": ("respawns", "Workers started to replace workers that died unexpectedly."),
    "crashes": ("crashes", "Worker deaths the master did not ask for."),
    "timeouts": ("timeouts", "Workers killed for running a request past workers.timeout."),
    "slow": ("slow_requests", "Requests that ran past workers.slow_request."),
    "recycled": ("recycled", "Workers replaced on purpose (max_requests, max_memory)."),
    "shed": ("shed", "Requests answered 503 because they waited past queue_timeout."),
    "max_children_reached": ("max_children_reached",
                             "Times the pool wanted to grow past max_workers."),
    "accept_backoffs": ("accept_backoffs", "Times a worker paused accepting at the "
                                           "open-files limit (EMFILE) or out of memory."),
    "log_lines_lost": ("log_lines_lost", "Worker log lines dropped because the master did "
                                         "not read them in time."),
    "stuck": ("stuck", "Idle workers replaced for missing their heartbeat."),
}
WORKER_STATES = ("idle", "busy", "starting", "stopping")


def render_openmetrics(data: Dict[str, Any]) -> str:
    """The OpenMetrics text format (what Prometheus scrapes), ending in ``# EOF``.

    Prometheus' conventions: counters end in ``_total``, one metric per quantity with the
    variants as labels (``workers{state=...}``), base units (seconds, bytes), a start time
    rather than an uptime, and per-worker series labelled by the worker's ``id`` -- a
    stable slot number -- never by pid, which would make a new series on every recycle.
    """
    t = data["totals"]
    out: List[str] = []
    _metric(out, "build", "info", "fcgi-manager's version.", [((("version", data["version"]),
                                                               ), 1)])
    for key, (name, help_text) in COUNTERS.items():
        _metric(out, name, "counter", help_text, [((), t[key])])
    states = {state: 0 for state in WORKER_STATES}
    for w in data["workers"]:
        state = "stopping" if w["state"] == "stuck" else w["state"]  # (counted in stuck_total)
        states[state] = states.get(state, 0) + 1
    _metric(out, "workers", "gauge", "Worker processes, by state.",
            [((("state", state),), n) for state, n in states.items()])
    _metric(out, "workers_target", "gauge", "Workers the pool is sized to now.",
            [((), data.get("target_workers"))])
    _metric(out, "max_active_workers", "gauge", "Most workers busy at once since the start.",
            [((), t["max_active"])])
    _metric(out, "busy_threads", "gauge", "Requests running now (app threads busy).",
            [((), t["busy_threads"])])
    _metric(out, "threads", "gauge", "App threads in all workers (workers.threads each).",
            [((), t["threads"])])
    _metric(out, "generation", "gauge", "Reload generation (1, then one more per reload).",
            [((), data["generation"])])
    _metric(out, "start_time_seconds", "gauge", "When the master started (Unix time).",
            [((), data["started_at"])], unit="seconds")
    _metric(out, "listen_queue", "gauge", "Connections waiting in the listen backlog.",
            [((), data["listen"]["queue"])])
    _metric(out, "listen_queue_max", "gauge", "High mark of the listen backlog.",
            [((), data["listen"]["max_queue"])])
    _metric(out, "listen_backlog", "gauge", "Configured listen backlog.",
            [((), data["listen"]["backlog"])])
    hist = data.get("request_duration")
    if hist is not None:
        full = "fcgi_manager_request_duration_seconds"
        out.append(f"# TYPE {full} histogram")
        out.append(f"# UNIT {full} seconds")
        out.append(f"# HELP {full} Time from the request's arrival in a worker to its end.")
        for le, n in hist["buckets"]:
            out.append(f'{full}_bucket{{le="{le}"}} {n}')
        out.append(f'{full}_bucket{{le="+Inf"}} {hist["count"]}')
        out.append(f"{full}_count {hist['count']}")
        out.append(f"{full}_sum {hist['sum_s']}")
    # One series per id: a leaving worker and its replacement share theirs (the id is
    # stable across replacement); the one that stays speaks for it.
    by_id = {w["id"]: w for w in sorted(data["workers"], key=lambda w: (
        w["state"] not in ("stopping", "stuck"), w["started_at"]))}
    workers = [by_id[i] for i in sorted(by_id)]
    per = [(("id", w["id"]),) for w in workers]
    _metric(out, "worker_requests", "counter", "Requests served by this worker process "
            "(starts again from 0 when the worker is replaced).",
            [(labels, w["requests"]) for labels, w in zip(per, workers)])
    _metric(out, "worker_resident_memory_bytes", "gauge", "Resident memory of this worker.",
            [(labels, w["rss_bytes"]) for labels, w in zip(per, workers)], unit="bytes")
    _metric(out, "worker_cpu_percent", "gauge", "CPU use of this worker, sampled.",
            [(labels, w["cpu_percent"]) for labels, w in zip(per, workers)])
    _metric(out, "worker_busy", "gauge", "1 while this worker runs a request.",
            [(labels, 1 if w["state"] == "busy" else 0) for labels, w in zip(per, workers)])
    _metric(out, "worker_busy_threads", "gauge", "Requests this worker runs now.",
            [(labels, len(w["in_flight"])) for labels, w in zip(per, workers)])
    _metric(out, "worker_start_time_seconds", "gauge", "When this worker started (Unix "
            "time).", [(labels, w["started_at"]) for labels, w in zip(per, workers)],
            unit="seconds")
    out.append("# EOF")
    return "\n".join(out) + "\n"


def render_page(data: Dict[str, Any], query: str) -> tuple:
    """The ``[status] path`` page: (status line, body, content type) for the query string."""
    q = parse_qs(query, keep_blank_values=True)
    if "json" in q:
        return "200 OK", render_json(data).encode(), "application/json"
    if "openmetrics" in q or "prometheus" in q:
        return ("200 OK", render_openmetrics(data).encode(),
                "application/openmetrics-text; version=1.0.0; charset=utf-8")
    return "200 OK", render_text(data).encode(), "text/plain; charset=utf-8"
