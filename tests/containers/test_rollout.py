"""A pod's life and a rollout, simulated with real processes and the shipped examples.

Two "pods", each as examples/kubernetes/deployment.yaml describes it: fcgi-manager
running the image's command with the image's ENV and the pod's env
(examples/docker/Dockerfile), as the image's user and PID 1 of its own PID namespace, and
nginx with the nginx.conf of examples/kubernetes/nginx-configmap.yaml, the two sharing a
socket directory (the emptyDir). In front, an nginx that plays the Service: an upstream
of both pods' HTTP ports, without retries (a Service does not retry). The test plays the
kubelet and the endpoints controller: it probes each pod's readiness as the Deployment
says (path, period, failure threshold) and takes a pod out of the Service's upstream when
the probe fails.

The rollout: clients send requests through the Service; pod A is deleted (TERM to its
fcgi-manager; its nginx runs the preStop hook, then gets the image's STOPSIGNAL, QUIT).
The ping turns 503 "draining" at once, the probe takes A out, A still serves what reaches
it until shutdown_delay is over, then stops gracefully with exit status 0, and the load
moves to pod B: not one request fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import psutil
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from support import (
    GiveUp,
    free_port,
    http_request,
    require_program,
    wait_for,
)

from .examples import ImageRoot, container, container_env, final_stage, nginx_conf
from .support import Pid1Master

CLIENTS = 4
NGINX_STOPSIGNAL = signal.SIGQUIT  # the official nginx image's STOPSIGNAL: graceful


def _write_nginx_conf(directory: Path, conf: str) -> None:
    """``conf`` as ``directory``/nginx.conf, with nginx's temp files kept in there."""
    temp = "".join(f"\n    {kind}_temp_path {directory / kind};"
                   for kind in ("client_body", "fastcgi", "proxy", "uwsgi", "scgi"))
    assert conf.count("\nhttp {") == 1
    (directory / "nginx.conf").write_text(conf.replace("\nhttp {", "\nhttp {" + temp, 1))


def _start_nginx(directory: Path, conf: str) -> subprocess.Popen:
    nginx = require_program("nginx")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    _write_nginx_conf(directory, conf)
    with open(directory / "out.log", "wb") as out:
        return subprocess.Popen(
            [nginx, "-p", str(directory), "-e", str(directory / "error.log"),
             "-c", str(directory / "nginx.conf"),
             "-g", f"daemon off; pid {directory / 'nginx.pid'};"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def _wait_port(proc: subprocess.Popen, port: int, log: Path) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise GiveUp(f"nginx exited with {proc.returncode}:\n{log.read_text()}")
        http_request(port, "GET", "/", timeout=2)
        return True
    wait_for(up, 15, f"nginx on port {port}")


def _stop(proc: Optional[subprocess.Popen]) -> bool:
    """Kill an nginx we started and its workers, by pid; True if it was running."""
    if proc is None or proc.poll() is not None:
        return False
    children = psutil.Process(proc.pid).children()
    proc.kill()
    proc.wait(10)
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    return True


class Pod:
    """fcgi-manager (the image) and nginx (the ConfigMap) sharing a socket directory."""

    def __init__(self, name: str, base: Path) -> None:
        self.name = name
        self.image = ImageRoot(base / name, final_stage())
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.app: Optional[Pid1Master] = None
        self.nginx: Optional[subprocess.Popen] = None
        self.nginx_dir = base / name / "nginx"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self) -> Pod:
        setpriv = require_program("setpriv")
        image = self.image.build()
        # The emptyDir as the kubelet makes it (root's, mode 0777), then the init container.
        socket_dir = Path(image.path("/run/fcgi"))
        os.chown(socket_dir, 0, 0)
        socket_dir.chmod(0o777)
        init = container("socket-dir", "initContainers")
        assert init["securityContext"]["runAsUser"] == 0
        subprocess.run([image.rewrite(word) for word in init["command"]], check=True,
                       timeout=30)
        env = image.environment(container_env("app"))
        self.workers = int(env["WEB_CONCURRENCY"])
        self.shutdown_delay = float(env["FCGI_MANAGER_MANAGER_SHUTDOWN_DELAY"])
        self.app = Pid1Master(
            Path(image.path("/app/fcgi-manager.toml")),
            argv=[setpriv, f"--reuid={image.uid}", f"--regid={image.gid}", "--clear-groups",
                  "--", *image.command()],
            env=env, cwd=Path(image.path(final_stage().last("WORKDIR"))),
            output=image.root / "app.log").start()
        self.app.wait_serving(Path(image.path("/run/fcgi/fcgi.sock")), self.workers)
        conf = nginx_conf()
        ports = {p["name"]: p["containerPort"] for p in container("nginx")["ports"]}
        for name, port in (("http", self.http_port), ("metrics", self.metrics_port)):
            assert f"listen {ports[name]};" in conf
            conf = conf.replace(f"listen {ports[name]};", f"listen 127.0.0.1:{port};")
        self.nginx = _start_nginx(self.nginx_dir, image.rewrite(conf))
        _wait_port(self.nginx, self.http_port, self.nginx_dir / "out.log")
        return self

    def get(self, path: str, port: int = 0) -> Tuple[int, bytes]:
        r = http_request(port or self.http_port, "GET", path, timeout=10)
        return r.status, r.body

    def delete(self, pre_stop: List[str]) -> threading.Thread:
        """What the kubelet does to a pod being deleted: the app container (no preStop)
        gets TERM now; nginx runs its preStop hook first, then gets its STOPSIGNAL."""
        assert self.app is not None and self.nginx is not None
        self.app.signal(signal.SIGTERM)
        nginx = self.nginx

        def stop_nginx() -> None:
            subprocess.run(pre_stop, check=True, timeout=120)
            nginx.send_signal(NGINX_STOPSIGNAL)
        thread = threading.Thread(target=stop_nginx)
        thread.start()
        return thread

    def cleanup(self) -> bool:
        leaked = _stop(self.nginx)
        if self.app is not None:
            leaked = self.app.cleanup() or leaked
        return leaked


class Service:
    """The Service, as an nginx upstream of the ready pods' HTTP ports (no retries)."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "service"
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    def conf(self, endpoints: List[str]) -> str:
        servers = "".join(f"\n        server {e};" for e in endpoints)
        return f"""worker_processes 1;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    upstream pods {{{servers}
    }}
    server {{
        listen 127.0.0.1:{self.port};
        location / {{
            proxy_pass http://pods;
            proxy_next_upstream off;
            add_header X-Pod $upstream_addr always;
        }}
    }}
}}
"""

    def start(self, endpoints: List[str]) -> Service:
        self.proc = _start_nginx(self.dir, self.conf(endpoints))
        _wait_port(self.proc, self.port, self.dir / "out.log")
        return self

    def cleanup(self) -> bool:
        return _stop(self.proc)

    def set_endpoints(self, endpoints: List[str]) -> None:
        """The endpoints controller's update: a new upstream, by a graceful nginx reload."""
        assert self.proc is not None
        master = psutil.Process(self.proc.pid)
        old = {c.pid for c in master.children()}
        _write_nginx_conf(self.dir, self.conf(endpoints))
        self.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: {c.pid for c in master.children()} - old, 10,
                 "nginx to start workers with the new upstream")


class Load:
    """CLIENTS threads sending GET /hello/NAME through the Service until stopped; every
    answer is checked and recorded with the pod that served it and when it was sent."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.done = threading.Event()
        self.served: List[Tuple[float, str]] = []
        self.failures: List[str] = []
        self.threads = [threading.Thread(target=self._client, args=(n,)) for n in range(CLIENTS)]

    def _client(self, n: int) -> None:
        i = 0
        while not self.done.is_set():
            i += 1
            try:
                sent = time.monotonic()
                r = http_request(self.port, "GET", f"/hello/c{n}-{i}", timeout=30)
                if r.status == 200 and r.body == f"Hello, c{n}-{i}!\n".encode():
                    self.served.append((sent, r.header("X-Pod") or ""))
                else:
                    self.failures.append(f"{r.status} from {r.header('X-Pod')}: {r.body[:200]!r}")
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                self.failures.append(repr(exc))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        for t in self.threads:
            t.join(60)

    def by(self, pod: Pod, after: float = 0.0, before: float = float("inf")) -> int:
        return sum(1 for t, who in self.served if who == pod.address and after <= t < before)


@pytest.fixture
def pods() -> Iterator[Dict[str, Union[Pod, Service]]]:
    made: Dict[str, Union[Pod, Service]] = {}
    yield made
    for thing in made.values():  # by pid: nginx and its workers, the namespaces' PID 1
        thing.cleanup()


@pytest.mark.needs("unshare", "setpriv", "nginx")
def test_a_rollout_loses_no_request(image_root: Path,
                                    pods: Dict[str, Union[Pod, Service]]) -> None:
    nginx_spec = container("nginx")
    readiness = nginx_spec["readinessProbe"]
    probe_path = readiness["httpGet"]["path"]
    period = float(readiness["periodSeconds"])
    threshold = int(readiness["failureThreshold"])
    pre_stop = nginx_spec["lifecycle"]["preStop"]["exec"]["command"]

    a = Pod("a", image_root)
    pods["a"] = a
    a.start()
    b = Pod("b", image_root)
    pods["b"] = b
    b.start()
    for pod in (a, b):
        assert pod.get(probe_path) == (200, b"pong\n")
    service = Service(image_root)
    pods["service"] = service
    service.start([a.address, b.address])

    with Load(service.port) as load:
        wait_for(lambda: load.by(a) > 20 and load.by(b) > 20, 20, "requests on both pods")
        deleted_at = time.monotonic()
        nginx_stopper = a.delete(pre_stop)

        # The ping turns 503 "draining" at once; everything else is still served.
        wait_for(lambda: a.get(probe_path) == (503, b"draining\n"), 2.0,
                 "pod A's ping to answer 503 draining")
        first_503 = time.monotonic() - deleted_at
        assert a.get("/hello/direct") == (200, b"Hello, direct!\n")

        # The kubelet probes every periodSeconds; after failureThreshold failures the
        # endpoints controller takes A out of the Service.
        failures = 0
        while failures < threshold:
            time.sleep(period)  # the probe's own period, as the Deployment sets it
            status, _ = a.get(probe_path)
            failures = failures + 1 if status != 200 else 0
        service.set_endpoints([b.address])
        removed_at = time.monotonic()
        assert removed_at - deleted_at < a.shutdown_delay, "out of the Service while draining"

        assert a.app is not None
        code = a.app.wait_exit(a.shutdown_delay + 40)
        stopped_at = time.monotonic()
        nginx_stopper.join(60)
        assert a.nginx is not None and a.nginx.wait(30) == 0
        wait_for(lambda: load.by(b, after=stopped_at) > 20, 20, "requests on pod B after")
    assert not load.failures, f"{len(load.failures)} failed requests of " \
                              f"{len(load.served) + len(load.failures)}: {load.failures[:5]}"
    assert code == 0, a.app.text()
    assert stopped_at - deleted_at >= a.shutdown_delay
    assert first_503 < 2.0
    assert load.by(a, after=deleted_at) > 0, "pod A served while draining"
    assert load.by(a, after=removed_at + 1.0) == 0, "nothing reaches A once out"
    log = a.app.text()
    assert "draining: the ping path answers 503" in log and "master stopped" in log, log


@pytest.mark.needs("unshare", "setpriv", "nginx")
def test_metrics_feed_the_autoscaler_rule(image_root: Path,
                                          pods: Dict[str, Union[Pod, Service]]) -> None:
    """nginx's metrics port serves the OpenMetrics page, with the series the
    prometheus-adapter rule selects (fcgi_manager_workers{state="busy"})."""
    pod = Pod("m", image_root)
    pods["m"] = pod
    pod.start()
    status, body = pod.get("/metrics", port=pod.metrics_port)
    assert status == 200, body
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {tuple(sorted(s.labels.items())): s.value
               for s in families["fcgi_manager_workers"].samples}
    assert (("state", "busy"),) in samples, samples
    assert samples[(("state", "busy"),)] >= 1, "the worker answering counts itself busy"
    assert sum(samples.values()) == pod.workers
    # The page is not public: the Service's port answers 404 for it.
    assert pod.get("/fcgi-status?openmetrics")[0] == 404
