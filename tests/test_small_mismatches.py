"""The smaller mismatches between the README, ``--help`` and the code,
each checked where a user meets it (the CLI, the README's text), one by one."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from support import ROOT, Manager, fcgi_manager, need_root

MakeManager = Callable[..., Manager]
README = (ROOT / "README.md").read_text()


def test_readme_does_not_call_app_toml_the_full_list() -> None:
    assert "full list is in `examples/app.toml`" not in README


def test_every_key_config_prints_is_in_the_readme_table(tmp_path: Path) -> None:
    r = fcgi_manager(["config", "hello:app"], cwd=tmp_path)
    assert r.returncode == 0, r
    section = ""
    for line in r.stdout.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
            continue
        m = re.match(r"(?:# )?(\w+) (?:=|is unset)", line)
        if not m or not section:
            continue
        key = m.group(1)
        rows = [row for row in README.splitlines() if row.startswith(f"| `{section}.")]
        cells = [row.split(" | ")[0] for row in rows]
        assert any(f"{section}.{key}`" in cell or f"`{key}`" in cell
                   or f"(+`_{key.split('_')[-1]}`)" in cell for cell in cells), \
            f"{section}.{key} is not in the README's table"
    assert "| `status.ping_response` | `\"pong\"` |" in README
    assert "| `status.show_query` | `false` |" in README


def test_defaults_in_the_table_are_what_config_prints(tmp_path: Path) -> None:
    r = fcgi_manager(["config", "hello:app"], cwd=tmp_path)
    for key, shown in (("max_memory", "0"), ("max_body", "0")):
        assert re.search(rf"^{key} = {shown}\b", r.stdout, re.MULTILINE), r.stdout
        assert f"| `workers.{key}` | `{shown}` |" in README


def test_readme_names_every_flag_help_shows() -> None:
    for flag in ("`start [--foreground, -f]`", "--timeout S", "-m M", "--interval, -n",
                 "--chmod-socket", "--chown-socket", "-m/--umask"):
        assert flag in README, flag


def test_request_timeout_has_help(tmp_path: Path) -> None:
    r = fcgi_manager(["request", "--help"], cwd=tmp_path)
    assert re.search(r"--timeout SECONDS\s+give up", r.stdout), r.stdout


def test_request_on_an_fd0_config_says_use_bind(tmp_path: Path) -> None:
    cfg = tmp_path / "fd0.toml"
    cfg.write_text('[app]\nmodule = "hello:app"\n[listen]\nbind = "fd:0"\n')
    r = fcgi_manager(["-c", str(cfg), "request", "/"], cwd=tmp_path)
    assert r.returncode == 2, r
    assert "--bind" in r.stderr and "fd:0" in r.stderr, r


def test_mode_as_a_toml_integer_is_read_as_written(tmp_path: Path) -> None:
    cfg = tmp_path / "mode.toml"
    cfg.write_text('[app]\nmodule = "hello:app"\n[listen]\nbind = "unix:x.sock"\nmode = 666\n')
    r = fcgi_manager(["-c", str(cfg), "config"], cwd=tmp_path)
    assert r.returncode == 0, r
    assert re.search(r'^mode = "0?666"', r.stdout, re.MULTILINE), r.stdout
    env = fcgi_manager(["config", "hello:app"], cwd=tmp_path,
                       env={"FCGI_MANAGER_LISTEN_MODE": "666"})
    assert re.search(r'^mode = "0?666"', env.stdout, re.MULTILINE), env


def test_run_without_an_app_is_a_usage_error(tmp_path: Path) -> None:
    r = fcgi_manager(["run"], cwd=tmp_path, env={"FCGI_MANAGER_APP_MODULE": ""})
    assert r.returncode == 2, r
    assert "no app given" in r.stderr


def test_run_without_a_file_names_its_pidfile_after_the_socket(tmp_path: Path) -> None:
    sock = tmp_path / "application_run" / "wsgi.sock"
    r = fcgi_manager(["config", "hello:app", "--bind", f"unix:{sock}"], cwd=tmp_path)
    m = re.search(r'^pidfile = "([^"]+)"', r.stdout, re.MULTILINE)
    assert m, r.stdout
    assert re.fullmatch(r"fcgi-manager-wsgi-[0-9a-f]{8}\.pid", os.path.basename(m.group(1))), m


def test_stop_during_shutdown_delay_says_it_drains() -> None:
    from fcgi_manager.cli import progress

    data = {"workers": [{"id": 1, "state": "idle", "current": None}]}
    text = progress.stop_text(data, 123, time.monotonic(), 40.0, drain=10.0)
    assert text.startswith("draining") and "waiting for 1 worker" not in text, text
    later = progress.stop_text(data, 123, time.monotonic() - 11, 40.0, drain=10.0)
    assert "waiting for 1 worker" in later, later


@pytest.fixture
def open_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fcgi-small-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _as_nobody(body: Callable[[], str]) -> str:
    """Run ``body`` in a child switched to nobody (the package is already imported, so the
    child needs no file of ours); what it returns, or its exception's text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            nobody = pwd.getpwnam("nobody")
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            try:
                out = body()
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                out = f"{type(exc).__name__}: {getattr(exc, 'message', exc)} " \
                      f"{getattr(exc, 'hint', '')}"
            os.write(w, out.encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return b"".join(chunks).decode()


def test_a_plain_user_stopping_roots_master_is_told_whose_it_is() -> None:
    need_root("a master of another user needs root")
    from fcgi_manager.cli import commands as cli

    me = os.getpid()  # root's process, as a master started by root
    text = _as_nobody(lambda: cli._signal_master(me, 0, "stop") or "signalled")
    assert "runs as root" in text and "sudo fcgi-manager" in text, text


def test_check_with_a_group_it_is_not_in_prints_no_bind_ok(open_dir: Path) -> None:
    need_root("a user outside the group needs root to make")
    from fcgi_manager import config
    from fcgi_manager.cli import check

    cfg_path = open_dir / "app.toml"
    cfg_path.write_text(f'[app]\nmodule = "hello:app"\n[listen]\nbind = "unix:{open_dir}/'
                        f's/app.sock"\ngroup = "root"\n[manager]\npidfile = '
                        f'"{open_dir}/s/app.pid"\n')
    (open_dir / "s").mkdir(mode=0o777)
    os.chmod(open_dir / "s", 0o1777)  # nobody may create the socket; sticky, as /tmp
    cfg = config.load(str(cfg_path))

    def run() -> str:
        import contextlib
        import io

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = check.run_check(cfg)
        return f"{code}\n{out.getvalue()}\n--\n{err.getvalue()}"

    text = _as_nobody(run)
    assert text.startswith("1\n"), text
    assert "listen.group = 'root'" in text and "bind " not in text.split("--")[0], text
    assert sys.executable
