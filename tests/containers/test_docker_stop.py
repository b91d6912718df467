"""``docker stop`` as the README and the Dockerfile write it is graceful: every
``docker run`` they show gives the container a stop timeout longer than the image's
``shutdown_delay + graceful_timeout`` (Docker's default is 10 s, then SIGKILL), and the
Kubernetes grace period agrees. Docker is not needed: the files are read as data."""

from __future__ import annotations

import re
from typing import Dict, List

from support import ROOT

from .examples import DOCKERFILE, final_stage, resource

DOCKER_DEFAULT_STOP_TIMEOUT = 10.0


def _image_stop_needs() -> float:
    env: Dict[str, str] = final_stage().env({"PATH": "/usr/bin"})
    return (float(env.get("FCGI_MANAGER_MANAGER_SHUTDOWN_DELAY", "0"))
            + float(env.get("FCGI_MANAGER_WORKERS_GRACEFUL_TIMEOUT", "30")))


def _docker_runs(text: str) -> List[str]:
    return [line for line in text.splitlines() if re.search(r"\bdocker run\b.*yourapplication",
                                                            line)]


def _stop_timeout(line: str) -> float:
    found = re.search(r"--stop-timeout[ =](\d+)", line)
    return float(found.group(1)) if found else DOCKER_DEFAULT_STOP_TIMEOUT


def test_every_docker_run_shown_stops_gracefully() -> None:
    needs = _image_stop_needs()
    assert needs > DOCKER_DEFAULT_STOP_TIMEOUT  # the case: the default would SIGKILL
    shown = {"README.md": _docker_runs((ROOT / "README.md").read_text()),
             "Dockerfile": _docker_runs(DOCKERFILE.read_text())}
    for where, lines in shown.items():
        assert lines, f"{where} shows no docker run of the image"
        for line in lines:
            assert _stop_timeout(line) > needs, \
                f"{where}: `{line.strip()}` stops after {_stop_timeout(line)} s; the image " \
                f"needs {needs} s (shutdown_delay + graceful_timeout)"


def test_the_stop_signal_is_term_and_the_numbers_agree_with_kubernetes() -> None:
    stage = final_stage()
    assert stage.last("STOPSIGNAL") == "SIGTERM"
    needs = _image_stop_needs()
    pod = resource("Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > needs
    readme = (ROOT / "README.md").read_text()
    for line in _docker_runs(readme):
        assert _stop_timeout(line) <= pod["terminationGracePeriodSeconds"]
    assert f"--stop-timeout {int(_stop_timeout(_docker_runs(readme)[0]))}" in readme
