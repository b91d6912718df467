"""examples/ and the README's "Deploying" section stay true: every excerpt quoted there is
in its example file word for word, and every example file is documented and run by a
test in this directory."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import List, Tuple

import pytest

from .support import EXAMPLES

HERE = Path(__file__).resolve().parent
DOC = EXAMPLES.parent / "README.md"
# Written and tested elsewhere: the README's quick start.
NOT_OURS = {"hello.py", "app.toml"}


def _excerpts() -> List[Tuple[str, str]]:
    pattern = re.compile(r"<!-- example: (\S+) -->\n```[^\n]*\n(.*?)```", re.DOTALL)
    return pattern.findall(DOC.read_text())


def _example_files() -> List[str]:
    out = []
    for path in sorted(EXAMPLES.rglob("*")):
        rel = path.relative_to(EXAMPLES)
        if path.is_file() and rel.parts[0] != "run" and str(rel) not in NOT_OURS \
                and "__pycache__" not in rel.parts:
            out.append(str(rel))
    return out


def test_there_are_excerpts() -> None:
    assert len(_excerpts()) >= 15


@pytest.mark.parametrize("name, excerpt", _excerpts(), ids=lambda v: str(v)[:40])
def test_excerpt_is_in_its_file(name: str, excerpt: str) -> None:
    assert excerpt in (EXAMPLES / name).read_text(), \
        f"README.md quotes examples/{name}, which now says otherwise"


# Which test module runs each example file (it must name the file).
RUN_BY = {
    "apache/.htaccess": "test_apache.py",
    "apache/fcgid.conf": "test_apache.py",
    "apache/proxy_fcgi.conf": "test_apache.py",
    "apache/yourapplication.fcgi": "test_apache.py",
    "docker/Dockerfile": "../containers/test_dockerfile.py",
    "docker/fcgi-manager.toml": "../containers/test_dockerfile.py",
    "docker/requirements.txt": "../containers/test_dockerfile.py",
    "flask_app/fcgi-manager-fd0.toml": "test_spawn_fcgi.py",
    "flask_app/fcgi-manager.toml": "test_nginx.py",
    "flask_app/yourapplication.fcgi": "test_wsgiserver.py",
    "flask_app/yourapplication.py": "support.py",
    "init.d/fcgi-manager": "test_initd.py",
    "kubernetes/deployment.yaml": "../containers/test_rollout.py",
    "kubernetes/hpa.yaml": "../containers/test_manifests.py",
    "kubernetes/nginx-configmap.yaml": "../containers/test_rollout.py",
    "kubernetes/poddisruptionbudget.yaml": "../containers/test_manifests.py",
    "kubernetes/prometheus-adapter.yaml": "../containers/test_manifests.py",
    "kubernetes/service.yaml": "../containers/test_manifests.py",
    "lighttpd/bin-path.conf": "test_lighttpd.py",
    "lighttpd/socket.conf": "test_lighttpd.py",
    "nginx/keepconn.conf": "test_nginx.py",
    "nginx/root.conf": "test_nginx.py",
    "nginx/sse.conf": "test_nginx_sse.py",
    "nginx/subpath.conf": "test_nginx.py",
    "nginx/upstream.conf": "test_nginx_upstream.py",
    "pools.d/admin.toml": "test_pool_units.py",
    "pools.d/yourapplication.toml": "test_pool_units.py",
    "spawn-fcgi.sh": "test_spawn_fcgi.py",
    "sse/events.py": "test_nginx_sse.py",
    "supervisor-pools.conf": "test_pool_units.py",
    "supervisord.conf": "test_supervisor.py",
    "systemd/fcgi-manager.service": "test_systemd_units.py",
    "systemd/fcgi-manager.socket": "test_systemd_units.py",
    "systemd/fcgi-manager-pools.service": "test_pool_units.py",
    "systemd/fcgi-manager@.service": "test_pool_units.py",
}


@pytest.mark.parametrize("name", _example_files())
def test_example_is_documented_and_tested(name: str) -> None:
    doc = DOC.read_text()
    assert name in doc or Path(name).name in doc, f"examples/{name} is not in the README"
    assert name in RUN_BY, f"examples/{name}: which test runs it? (add it to RUN_BY)"
    module = (HERE / RUN_BY[name]).read_text()
    assert name in module or Path(name).name in module, \
        f"{RUN_BY[name]} does not run examples/{name}"


@pytest.mark.parametrize("script", ["init.d/fcgi-manager", "spawn-fcgi.sh"])
def test_shell_scripts_parse(script: str) -> None:
    r = subprocess.run(["sh", "-n", str(EXAMPLES / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
