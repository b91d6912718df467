"""examples/kubernetes/: every manifest validates against the Kubernetes API schemas
(offline, strict: an unknown field is an error), and the numbers and names that must
agree across the files, the Dockerfile and fcgi-manager's config do agree.

The manifests: deployment.yaml and nginx-configmap.yaml (also run by test_rollout.py),
service.yaml, poddisruptionbudget.yaml, hpa.yaml, prometheus-adapter.yaml."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any, Dict

import kubernetes_validate
import pytest
import yaml

from .examples import (
    DOCKERFILE,
    EXAMPLES,
    container,
    container_env,
    final_stage,
    manifest_files,
    manifests,
    nginx_conf,
    resource,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the examples are meant for


def _image_config() -> Dict[str, Any]:
    return tomllib.loads((EXAMPLES / "docker" / "fcgi-manager.toml").read_text())


def _settings() -> Dict[str, str]:
    """The app container's environment: the image's ENV, then the pod's env."""
    return {**final_stage().env({"PATH": "/usr/bin"}), **container_env("app")}


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
@pytest.mark.parametrize("version", [KUBERNETES_VERSION, kubernetes_validate.latest_version()])
def test_manifest_validates(path: Path, version: str) -> None:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs, f"{path} holds no resource"
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_catches_mistakes() -> None:
    """Strict validation works offline here: a misspelt field and a wrong type fail."""
    deployment = resource("Deployment")
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["terminationGracePeriod"] = 50
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][1]["ports"][0]["containerPort"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)


def test_the_pod_stops_within_its_grace_period() -> None:
    settings = _settings()
    delay = float(settings["FCGI_MANAGER_MANAGER_SHUTDOWN_DELAY"])
    graceful = float(settings["FCGI_MANAGER_WORKERS_GRACEFUL_TIMEOUT"])
    pod = resource("Deployment")["spec"]["template"]["spec"]
    assert delay > 0
    assert pod["terminationGracePeriodSeconds"] > delay + graceful
    nginx = container("nginx")
    pre_stop = nginx["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # nginx keeps accepting while fcgi-manager drains, and stops accepting before it.
    assert delay - 2 <= float(pre_stop[1]) < delay
    live = nginx["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > delay, \
        "a draining pod must not be restarted by its liveness probe"
    ready = nginx["readinessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] < delay / 2, \
        "the readiness probe sees 503 early in the drain"


def test_probes_and_sockets_meet() -> None:
    image = _image_config()
    ping = image["status"]["ping_path"]
    nginx = container("nginx")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = nginx[probe]["httpGet"]
        assert get["path"] == ping and get["port"] == "http", probe
    ports = {p["name"]: p["containerPort"] for p in nginx["ports"]}
    conf = nginx_conf()
    assert f"listen {ports['http']};" in conf and f"listen {ports['metrics']};" in conf
    deployment = resource("Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert f"location = {annotations['prometheus.io/path']}" in conf
    assert f"rewrite ^ {image['status']['path']}?openmetrics break;" in conf
    # Both containers mount the emptyDir where the image's socket lives.
    socket_path = image["listen"]["bind"][len("unix:"):]
    for name in ("app", "nginx"):
        mounts = {m["name"]: m["mountPath"] for m in container(name)["volumeMounts"]}
        assert socket_path.startswith(mounts["fcgi-socket"] + "/"), name
    assert f"server unix:{socket_path};" in conf
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["fcgi-socket"]
    assert volumes["nginx-config"]["configMap"]["name"] == "yourapplication-nginx"
    assert Path(image["manager"]["pidfile"]).parent == Path(socket_path).parent


def test_the_app_container_runs_the_image_as_its_user() -> None:
    app = container("app")
    assert "command" not in app and "args" not in app, "the image's CMD runs as written"
    uid, gid = final_stage().user()
    security = app["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (uid, gid)
    assert security["runAsNonRoot"] and not security["allowPrivilegeEscalation"]
    assert "WEB_CONCURRENCY" in container_env("app")
    if security.get("readOnlyRootFilesystem"):
        mounts = {m["mountPath"]: m["name"] for m in app["volumeMounts"]}
        assert "/tmp" in mounts, "large request bodies are spooled to a temp file"
    cmd = final_stage().cmd()
    assert cmd == ["fcgi-manager", "-c", "/app/fcgi-manager.toml", "start", "--foreground"]
    assert "ENTRYPOINT" not in DOCKERFILE.read_text(), "no wrapper before fcgi-manager"


def test_the_socket_directory_is_given_to_the_app_user() -> None:
    """An emptyDir is mode 0777; the init container hands it to the image's user before
    fcgi-manager creates its socket, pidfile and control socket there."""
    init = container("socket-dir", "initContainers")
    uid, gid = final_stage().user()
    socket_dir = str(Path(_image_config()["listen"]["bind"][len("unix:"):]).parent)
    script = init["command"][-1]
    assert f"chown {uid}:{gid} {socket_dir}" in script and f"chmod 0755 {socket_dir}" in script
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts == {"fcgi-socket": socket_dir}
    assert init["image"] == container("app")["image"], "no other image to pull"


def test_selectors_names_and_the_autoscaler_agree() -> None:
    deployment = resource("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = resource("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = resource("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = resource("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2, "one pod stopping leaves the others serving"
    metric = hpa["spec"]["metrics"][0]["pods"]
    rule = _adapter_rule()
    assert metric["metric"]["name"] == rule["name"]["as"]
    workers = int(container_env("app")["WEB_CONCURRENCY"])
    assert 0 < float(metric["target"]["averageValue"]) < workers


def _adapter_rule() -> Dict[str, Any]:
    adapter = resource("ConfigMap", "adapter-config")
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert len(rules) == 1
    return rules[0]


def test_the_adapter_rule_selects_busy_workers() -> None:
    """The rule reads the series SPEC names: fcgi_manager_workers{state="busy"}, per pod
    (tests/containers/test_rollout.py checks a running pod's /metrics against it)."""
    rule = _adapter_rule()
    series = re.fullmatch(r"(\w+)\{(.*)\}", rule["seriesQuery"])
    assert series, rule["seriesQuery"]
    assert series.group(1) == "fcgi_manager_workers"
    assert 'state="busy"' in series.group(2)
    assert re.fullmatch(rule["name"]["matches"], "fcgi_manager_workers")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert 'state="busy"' in rule["metricsQuery"] and "sum(" in rule["metricsQuery"]


def test_every_manifest_is_in_the_readme() -> None:
    readme = (EXAMPLES.parent / "README.md").read_text()
    for path in manifest_files():
        assert f"examples/kubernetes/{path.name}" in readme, path.name
    assert "examples/docker/Dockerfile" in readme
    kinds = sorted({doc["kind"] for _, doc in manifests()})
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler",
                     "PodDisruptionBudget", "Service"]
