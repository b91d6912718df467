"""Turn the raw samples of a run into the JSON, Markdown and PNG reports.

Each (server, app, concurrency, keep-conn) cell was measured once per repetition; the
report gives the median of the repetitions (robust to one noisy repetition on a shared
machine) and the min-max spread in the JSON and the chart. Errors and nginx error-log lines
are summed over the repetitions: one failed request is worth knowing about.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .servers import SUBJECT

MIB = 1024 * 1024
ERROR_KINDS = ("connect_errors", "read_errors", "write_errors", "timeouts", "non_2xx")
CEILING = "nginx-ceiling"

Key = Tuple[str, str, int, Optional[bool]]


@dataclass
class Row:
    """The summary of one cell over its repetitions."""

    server: str
    app: str
    connections: int
    keep_conn: Optional[bool]
    reps: int
    rps: List[float] = field(default_factory=list)
    p50_ms: List[float] = field(default_factory=list)
    p99_ms: List[float] = field(default_factory=list)
    cpu_us: List[float] = field(default_factory=list)  # server CPU time per request
    errors: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))
    nginx_error_lines: int = 0
    failed_runs: int = 0
    ratio: Optional[float] = None  # fcgi-manager's median rps / this server's

    @property
    def rps_median(self) -> Optional[float]:
        return statistics.median(self.rps) if self.rps else None

    def to_dict(self) -> Dict[str, object]:
        return {
            "server": self.server,
            "app": self.app,
            "connections": self.connections,
            "keep_conn": self.keep_conn,
            "reps": self.reps,
            "rps_median": self.rps_median,
            "rps_min": min(self.rps) if self.rps else None,
            "rps_max": max(self.rps) if self.rps else None,
            "p50_ms_median": _median(self.p50_ms),
            "p99_ms_median": _median(self.p99_ms),
            "cpu_us_per_request_median": _median(self.cpu_us),
            "errors": dict(self.errors, total=sum(self.errors.values())),
            "nginx_error_lines": self.nginx_error_lines,
            "failed_runs": self.failed_runs,
            "ratio_fcgi_manager": self.ratio,
        }


def _median(values: List[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def _key(sample: Dict) -> Key:
    return (sample["server"], sample["app"], sample["connections"], sample["keep_conn"])


def summarize(samples: List[Dict]) -> List[Row]:
    """One row per cell, with medians over repetitions and the fcgi-manager ratio."""
    rows: Dict[Key, Row] = {}
    for sample in samples:
        key = _key(sample)
        row = rows.setdefault(key, Row(*key, reps=0))
        row.reps += 1
        row.nginx_error_lines += sample["nginx_error_lines"]
        result = sample.get("result")
        if result is None:
            row.failed_runs += 1
            continue
        row.rps.append(result["rps"])
        row.p50_ms.append(result["p50_ms"])
        row.p99_ms.append(result["p99_ms"])
        if result.get("cpu_us_per_request") is not None:
            row.cpu_us.append(result["cpu_us_per_request"])
        for kind in ERROR_KINDS:
            row.errors[kind] += result[kind]
    _add_ratios(rows)
    return sorted(rows.values(), key=_row_order)


def _add_ratios(rows: Dict[Key, Row]) -> None:
    """fcgi-manager's rps over each peer's, same app, concurrency and keep-conn.

    An HTTP peer (keep-conn None) is compared with fcgi-manager without keep-conn: both then
    open one upstream connection per request.
    """
    for (server, app, conns, keep_conn), row in rows.items():
        if server in (SUBJECT, CEILING) or not row.rps_median:
            continue
        subject = rows.get((SUBJECT, app, conns, bool(keep_conn)))
        if subject is not None and subject.rps_median:
            row.ratio = subject.rps_median / row.rps_median


def _row_order(row: Row) -> Tuple:
    keep = {False: 0, None: 1, True: 2}[row.keep_conn]  # the HTTP peer next to "off"
    return (row.app, row.connections, keep, row.server != SUBJECT, row.server)


def summarize_memory(samples: List[Dict]) -> List[Dict[str, object]]:
    """Per server: median per-worker RSS/PSS/USS (MiB) and the workers' total PSS."""
    by_server: Dict[str, List[Dict]] = {}
    for sample in samples:
        by_server.setdefault(sample["server"], []).append(sample)
    summary = []
    for server, entries in sorted(by_server.items()):
        workers = [w for entry in entries for w in entry["workers"]]
        summary.append({
            "server": server,
            "workers": statistics.median(len(entry["workers"]) for entry in entries),
            "rss_mib": _median([w["rss"] / MIB for w in workers]),
            "pss_mib": _median([w["pss"] / MIB for w in workers]),
            "uss_mib": _median([w["uss"] / MIB for w in workers]),
            "total_pss_mib": _median([
                sum(w["pss"] for w in entry["workers"]) / MIB for entry in entries
            ]),
            "master_rss_mib": _median([
                entry["master"]["rss"] / MIB for entry in entries if entry["master"]
            ]),
        })
    return summary


def write_json(path: Path, report: Dict[str, object]) -> None:
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


def _fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _keep_conn_label(keep_conn: Optional[bool]) -> str:
    return {False: "off", True: "on", None: "n/a (http)"}[keep_conn]


def _results_table(rows: List[Row]) -> List[str]:
    """The main table; the ratio column only when fcgi-manager was part of the run."""
    with_ratio = any(row.server == SUBJECT for row in rows)
    header = ("| server | app | conc | keep-conn | rps (median) | p50 ms | p99 ms | "
              "server CPU µs/req | wrk errors (conn/read/write/timeout/non-2xx) | "
              "nginx err lines |")
    rule = "|---|---|---:|---|---:|---:|---:|---:|---|---:|"
    if with_ratio:
        header += " fcgi-manager ÷ server |"
        rule += "---:|"
    lines = [header, rule]
    for row in rows:
        if row.server == CEILING:
            continue
        errors = "/".join(str(row.errors[kind]) for kind in ERROR_KINDS)
        if row.failed_runs:
            errors += f" ({row.failed_runs} run(s) failed)"
        line = (
            f"| {row.server} | {row.app} | {row.connections} | "
            f"{_keep_conn_label(row.keep_conn)} | {_fmt(row.rps_median, ',.0f')} | "
            f"{_fmt(_median(row.p50_ms), '.2f')} | {_fmt(_median(row.p99_ms), '.2f')} | "
            f"{_fmt(_median(row.cpu_us), '.1f')} | {errors} | {row.nginx_error_lines} |"
        )
        if with_ratio:
            line += f" {_fmt(row.ratio, '.2f')} |"
        lines.append(line)
    return lines


def _ceiling_table(rows: List[Row]) -> List[str]:
    ceiling = [row for row in rows if row.server == CEILING]
    if not ceiling:
        return []
    lines = [
        "", "## nginx ceiling (`return 200`, 13 bytes, no upstream)", "",
        "| conc | rps | p50 ms | p99 ms |", "|---:|---:|---:|---:|",
    ]
    for row in ceiling:
        lines.append(
            f"| {row.connections} | {_fmt(row.rps_median, ',.0f')} | "
            f"{_fmt(_median(row.p50_ms), '.2f')} | {_fmt(_median(row.p99_ms), '.2f')} |"
        )
    return lines


def _memory_table(memory: List[Dict[str, object]], app: str) -> List[str]:
    if not memory:
        return []
    lines = [
        "", f"## Worker memory (after the `{app}` runs, MiB, median per worker)", "",
        "| server | workers | RSS | PSS | USS | all workers' PSS | master RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in memory:
        lines.append(
            f"| {m['server']} | {m['workers']:g} | {_fmt(m['rss_mib'], '.1f')} | "
            f"{_fmt(m['pss_mib'], '.1f')} | {_fmt(m['uss_mib'], '.1f')} | "
            f"{_fmt(m['total_pss_mib'], '.1f')} | {_fmt(m['master_rss_mib'], '.1f')} |"
        )
    return lines


def _problems(failures: List[Dict[str, object]]) -> List[str]:
    if not failures:
        return []
    lines = ["", "## Problems", ""]
    for failure in failures:
        message = str(failure["message"]).strip().splitlines()
        where = " ".join(
            str(failure[k]) for k in ("server", "app", "stage") if failure.get(k) is not None
        )
        lines.append(f"- **{where}**: {message[0] if message else ''}")
    return lines


def render_markdown(
    meta: Dict, plan: Dict, rows: List[Row], memory: List[Dict], failures: List[Dict]
) -> str:
    """The human-readable report: settings, results, ceiling, memory, problems."""
    lines = [
        f"# fcgi-manager benchmark — {meta['started_at']}",
        "",
        f"`{meta['command']}` on {meta['cpus']} CPUs ({meta['platform']}); "
        f"load average {meta['loadavg_start']} at start, {meta['loadavg_end']} at end.",
        "",
        f"Every server: {plan['workers']} worker processes behind nginx "
        f"(`worker_processes 1`), unix sockets; wrk `-t1`, {plan['duration_s']:g} s per run, "
        f"{plan['reps']} repetition(s), {plan['warmup_s']:g} s warm-up per server start; "
        f"`post` sends {plan['post_bytes'] // 1024} KiB.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
    ]
    if meta.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(meta["skipped"]) + "."]
    if meta.get("interrupted"):
        lines += ["", "**Interrupted: partial results.**"]
    lines += ["", "## Throughput and latency", ""] + _results_table(rows)
    lines += _ceiling_table(rows)
    lines += _memory_table(memory, plan["memory_app"])
    lines += _problems(failures)
    return "\n".join(lines) + "\n"


def render_png(path: Path, rows: List[Row], servers: List[str]) -> bool:
    """Median rps (top) and p99 latency (bottom, log scale) per cell; False without matplotlib.

    Whiskers on the rps bars span the repetitions' min and max.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    apps = sorted({row.app for row in rows if row.server != CEILING}, key=_app_order)
    if not apps:
        return False
    fig, axes = plt.subplots(2, len(apps), figsize=(5.5 * len(apps), 8), squeeze=False)
    for column, app in enumerate(apps):
        app_rows = [r for r in rows if r.app == app and r.server != CEILING]
        _plot_app(axes[0][column], app_rows, servers, "rps")
        _plot_app(axes[1][column], app_rows, servers, "p99")
        axes[0][column].set_title(app)
        axes[1][column].set_yscale("log")
    axes[0][0].set_ylabel("requests/s (median, min-max)")
    axes[1][0].set_ylabel("p99 latency, ms (median)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _app_order(app: str) -> Tuple[int, str]:
    order = ["hello", "page", "post"]
    return (order.index(app) if app in order else len(order), app)


def _plot_app(ax, rows: List[Row], servers: List[str], metric: str) -> None:
    """Grouped bars: one group per (concurrency, keep-conn), one bar per server."""
    groups = sorted({(r.connections, bool(r.keep_conn)) for r in rows})
    width = 0.8 / max(1, len(servers))
    for index, server in enumerate(servers):
        xs, heights, low, high = [], [], [], []
        for g, (conns, keep) in enumerate(groups):
            row = next((r for r in rows if r.server == server and r.connections == conns
                        and bool(r.keep_conn) == keep and r.rps), None)
            if row is None or row.rps_median is None:
                continue
            xs.append(g + (index - (len(servers) - 1) / 2) * width)
            if metric == "rps":
                heights.append(row.rps_median)
                low.append(row.rps_median - min(row.rps))
                high.append(max(row.rps) - row.rps_median)
            else:
                heights.append(statistics.median(row.p99_ms))
        if not xs:
            continue
        if metric == "rps":
            ax.bar(xs, heights, width, yerr=[low, high], capsize=2, label=server)
        else:
            ax.bar(xs, heights, width, label=server)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"c{c}\nkeep-conn {'on' if k else 'off'}" for c, k in groups])
    ax.grid(axis="y", alpha=0.3)


def syscall_table(entries: List[Dict]) -> str:
    """System calls per request (from ``--syscalls``), the five most frequent by name."""
    if not entries:
        return ""
    lines = ["", "## System calls per request (`strace -c -f` on the workers, c = lowest)", "",
             "| server | app | keep-conn | total | most frequent (calls per request) |",
             "|---|---|---|---:|---|"]
    for entry in entries:
        per = dict(entry["per_request"])
        total = per.pop("total", 0.0)
        top = ", ".join(f"{name} {count:.2f}" for name, count in list(per.items())[:6])
        lines.append(f"| {entry['server']} | {entry['app']} | "
                     f"{_keep_conn_label(entry['keep_conn'])} | {total:.2f} | {top} |")
    return "\n".join(lines) + "\n"
