"""The shipped container examples, read as data: the Dockerfile's final stage
(``examples/docker/Dockerfile``) and the Kubernetes manifests (``examples/kubernetes/``).

The tests run what these files say (the image's command and environment, the pod's env,
probes, preStop hook and grace period) instead of repeating their values, so an example
that changes is tested as changed. Paths of the image (``/app``, ``/run/fcgi``,
``/opt/venv``) are mapped into a directory of the test (:class:`ImageRoot`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import yaml
from frontends.support import python_for
from support import ROOT

EXAMPLES = ROOT / "examples"
DOCKERFILE = EXAMPLES / "docker" / "Dockerfile"
KUBERNETES = EXAMPLES / "kubernetes"


# -- the Dockerfile -------------------------------------------------------------------


@dataclass
class Stage:
    """One stage of a Dockerfile: its instructions, in order, continuation lines joined."""

    base: str
    instructions: List[Tuple[str, str]] = field(default_factory=list)

    def all(self, name: str) -> List[str]:
        return [args for instr, args in self.instructions if instr == name]

    def last(self, name: str) -> str:
        found = self.all(name)
        assert found, f"the Dockerfile's final stage has no {name}"
        return found[-1]

    def env(self, inherited: Dict[str, str]) -> Dict[str, str]:
        """Every ENV, in order, with ``$VAR``/``${VAR}`` expanded as Docker does."""
        env: Dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                name, sep, value = item.partition("=")
                assert sep, f"ENV {args!r}: write ENV NAME=value"
                env[name] = _expand(value, {**inherited, **env})
        return env

    def cmd(self) -> List[str]:
        return json.loads(self.last("CMD"))

    def user(self) -> Tuple[int, int]:
        uid, _, gid = self.last("USER").partition(":")
        return int(uid), int(gid or uid)

    def copies(self) -> List[Tuple[List[str], str, str]]:
        """(sources, destination, --from) of every COPY."""
        out = []
        for args in self.all("COPY"):
            words = shlex.split(args)
            source_stage = ""
            while words[0].startswith("--"):
                flag = words.pop(0)
                if flag.startswith("--from="):
                    source_stage = flag[len("--from="):]
            out.append((words[:-1], words[-1], source_stage))
        return out


def _expand(value: str, env: Dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""),
                  value)


def dockerfile_stages(path: Path = DOCKERFILE) -> List[Stage]:
    stages: List[Stage] = []
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        instr, _, args = logical.partition(" ")
        logical = ""
        instr = instr.upper()
        if instr == "FROM":
            stages.append(Stage(base=args.split()[0]))
        else:
            assert stages, "the Dockerfile must begin with FROM"
            stages[-1].instructions.append((instr, args.strip()))
    return stages


def final_stage() -> Stage:
    return dockerfile_stages()[-1]


# -- the image's paths, mapped into a test directory ----------------------------------


class ImageRoot:
    """The final stage's files under ``root``: the COPY lines from this checkout, the
    venv as an ``fcgi-manager`` launcher of the Python running the tests, and ``/run/fcgi``
    made as the RUN line makes it. :meth:`path` maps a path of the image to the test's."""

    MAPPED = ("/app", "/run/fcgi", "/opt/venv")

    def __init__(self, root: Path, stage: Stage) -> None:
        self.root = root
        self.stage = stage
        self.uid, self.gid = stage.user()
        self.python_path = [str(ROOT)]

    def path(self, image_path: str) -> str:
        for prefix in self.MAPPED:
            if image_path == prefix or image_path.startswith(prefix + "/"):
                return str(self.root) + image_path
        return image_path

    def rewrite(self, text: str) -> str:
        """Every mapped image path in ``text`` replaced by the test's."""
        for prefix in self.MAPPED:
            text = re.sub(re.escape(prefix) + r"(?=[/\"':\s]|$)", str(self.root) + prefix, text)
        return text

    def build(self) -> ImageRoot:
        for sources, dest, from_stage in self.stage.copies():
            if from_stage:
                assert dest == "/opt/venv", f"COPY --from={from_stage} ... {dest}"
                self._venv()
                continue
            for source in sources:
                target = Path(self.path(dest))
                if dest.endswith("/"):
                    target = target / Path(source).name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / source, target)
        run = " ".join(self.stage.all("RUN"))
        made = re.search(r"install -d -o app -g app -m (\d+) /run/fcgi", run)
        assert made, "the Dockerfile makes /run/fcgi for the app user"
        socket_dir = Path(self.path("/run/fcgi"))
        socket_dir.mkdir(parents=True, exist_ok=True)
        os.chown(socket_dir, self.uid, self.gid)
        socket_dir.chmod(int(made.group(1), 8))
        app_dir = Path(self.path("/app"))
        text = (app_dir / "fcgi-manager.toml").read_text()
        (app_dir / "fcgi-manager.toml").write_text(self.rewrite(text))
        for directory, _, files in os.walk(self.root):
            os.chmod(directory, 0o755)
            for name in files:
                mode = os.stat(Path(directory) / name).st_mode
                os.chmod(Path(directory) / name, stat.S_IMODE(mode) | 0o444)
        return self

    def _venv(self) -> None:
        """/opt/venv/bin/fcgi-manager: this checkout, run by a Python that the image's
        user can run (the tests' own, or the system's with a copy of the packages: a
        Python under root's home, as pyenv installs it, is closed to other users)."""
        venv = Path(self.path("/opt/venv"))
        (venv / "bin").mkdir(parents=True, exist_ok=True)
        python, extra = python_for("nobody", venv)  # any user but root: "others"
        self.python_path = [str(ROOT)] + [p for p in [extra.get("PYTHONPATH", "")] if p]
        launcher = venv / "bin" / "fcgi-manager"
        launcher.write_text(f"#!/bin/sh\nexec {shlex.quote(python)} -m fcgi_manager "
                            f'"$@"\n')
        launcher.chmod(0o755)

    def environment(self, extra: Dict[str, str]) -> Dict[str, str]:
        """What the container's process gets: the base image's PATH and locale, the
        Dockerfile's ENV, then ``extra`` (a pod's ``env:``), image paths mapped; plus this
        checkout on PYTHONPATH (the venv would hold it, and the packages the app needs)."""
        base = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
                "LANG": "C.UTF-8"}
        env = {**base, **self.stage.env(base), **extra}
        env = {k: self.rewrite(v) for k, v in env.items()}
        env["PYTHONPATH"] = os.pathsep.join(self.python_path)
        return env

    def command(self) -> List[str]:
        return [self.rewrite(word) for word in self.stage.cmd()]


# -- the Kubernetes manifests ---------------------------------------------------------


def manifest_files() -> List[Path]:
    return sorted(KUBERNETES.glob("*.yaml"))


def manifests() -> Iterator[Tuple[Path, Dict[str, Any]]]:
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def resource(kind: str, name: str = "") -> Dict[str, Any]:
    found = [doc for _, doc in manifests()
             if doc["kind"] == kind and (not name or doc["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name} in {KUBERNETES}"
    return found[0]


def container(name: str, kind: str = "containers") -> Dict[str, Any]:
    """A container of the Deployment's pod (``kind="initContainers"`` for those)."""
    pod = resource("Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod[kind] if c["name"] == name)


def container_env(name: str) -> Dict[str, str]:
    return {e["name"]: e["value"] for e in container(name).get("env", [])}


def nginx_conf() -> str:
    return resource("ConfigMap", "yourapplication-nginx")["data"]["nginx.conf"]
