"""Where running masters can be found: a per-user directory of one small file per master.

``fcgi-manager status --all`` (like ``supervisorctl status``) lists every master the user
can reach, and ``status``/``stop`` find a master whose config on disk is now broken, or
one started by ``run`` or ``WSGIServer`` that has no config file at all. Neither can be
read off a config file, so each master registers itself::

    <registry>/<pid>.json   {"pid": 1234, "started": 1767225600.12, "uid": 1000,
                             "name": "app", "config": "/srv/app/app.toml",
                             "pidfile": "/srv/app/run/app.pid",
                             "control": "/srv/app/run/app.ctl",
                             "bind": "unix:/srv/app/run/fcgi.sock",
                             "graceful_timeout": 30.0, "shutdown_delay": 0.0}

``started`` is the process start time, so an entry whose pid died and was reused by
another process is stale. The master writes its entry once it has bound its sockets and
removes it when it exits; whoever reads the registry removes the stale entries of a
master that was killed. Writes are atomic (``mkstemp`` + ``rename``) and never follow a
link.

The registry of a user (first that is usable):

* ``$FCGI_MANAGER_REGISTRY``, when set (tests, unusual layouts);
* root: ``/run/fcgi-manager``;
* others: ``/run/user/<uid>/fcgi-manager`` (the logind runtime directory), else
  ``/tmp/fcgi-manager-<uid>``.

A directory that is not ours, or that others can write to, is neither written nor read
(OpenSSH's StrictModes): a forged entry could send ``status`` to the wrong socket, and
another user can pre-create ``/tmp/fcgi-manager-<uid>``. An entry file is believed only
if it is a plain file of the directory's owner that no one else can write. Root also
reads the other users' registries (it can reach every master), without cleaning them,
and believes an entry there only if its master and its control socket belong to that
user. ``status --all`` lists those; a command aimed at one master (``-c FILE``,
``--pidfile``) follows only the caller's own entries (:func:`find`).
"""

from __future__ import annotations

import glob
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import psutil

ROOT_REGISTRY = "/run/fcgi-manager"


@dataclass(frozen=True)
class Entry:
    """One registered master."""

    pid: int
    started: float
    uid: int
    name: str
    config: str
    pidfile: str
    control: str
    bind: str
    graceful_timeout: float
    shutdown_delay: float
    path: str  # the entry file itself
    owner: int = -1  # who owns the entry file, as the kernel says (not what it claims)

    @classmethod
    def from_json(cls, data: Dict[str, Any], path: str, owner: int = -1) -> Entry:
        return cls(int(data["pid"]), float(data.get("started", 0.0)), int(data.get("uid", -1)),
                   str(data.get("name", "")), str(data.get("config", "")),
                   str(data.get("pidfile", "")), str(data.get("control", "")),
                   str(data.get("bind", "")), float(data.get("graceful_timeout", 30.0)),
                   float(data.get("shutdown_delay", 0.0)), path, owner)

    def alive(self) -> bool:
        """The same process still runs (not a zombie, not a reused pid)."""
        try:
            proc = psutil.Process(self.pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            return not self.started or abs(proc.create_time() - self.started) < 1.0
        except psutil.Error:
            return False


def candidates(uid: Optional[int] = None) -> List[str]:
    """The registry directories of ``uid`` (default: ours), the one to write first."""
    override = os.environ.get("FCGI_MANAGER_REGISTRY", "")
    if override:
        return [os.path.abspath(override)]
    uid = os.geteuid() if uid is None else uid
    if uid == 0:
        return [ROOT_REGISTRY]
    out = []
    runtime = f"/run/user/{uid}"
    if _owned_dir(runtime, uid):
        out.append(os.path.join(runtime, "fcgi-manager"))
    out.append(os.path.join(tempfile.gettempdir(), f"fcgi-manager-{uid}"))
    return out


def _owned_dir(path: str, uid: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid


def _safe_dir(path: str, uid: int) -> str:
    """'' if ``path`` is a directory only ``uid`` can write to, else why not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return exc.strerror or str(exc)
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != uid:
        return f"belongs to uid {st.st_uid}, not {uid}"
    if st.st_mode & 0o022:
        return f"can be written by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def _writable_dir() -> str:
    """Our registry directory, created if needed; raise OSError naming it if unusable."""
    uid = os.geteuid()
    problems = []
    for path in candidates():
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror}")
            continue
        why = _safe_dir(path, uid)
        if not why:
            return path
        problems.append(f"{path} {why}")
    raise OSError("no usable registry directory: " + "; ".join(problems))


def register(*, name: str, config: str, pidfile: str, control: str, bind: str,
             graceful_timeout: float, shutdown_delay: float = 0.0) -> str:
    """Write this process's entry; returns its path (for :func:`unregister`)."""
    directory = _writable_dir()
    pid = os.getpid()
    data = {"pid": pid, "started": psutil.Process(pid).create_time(), "uid": os.geteuid(),
            "name": name, "config": config, "pidfile": pidfile, "control": control,
            "bind": bind, "graceful_timeout": graceful_timeout,
            "shutdown_delay": shutdown_delay}
    fd, tmp = tempfile.mkstemp(prefix=f".{pid}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.chmod(tmp, 0o600)
        path = os.path.join(directory, f"{pid}.json")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def unregister(path: str) -> None:
    """Remove our entry, if it is still ours (a reload keeps the pid and the entry)."""
    entry = _read(path, os.geteuid())
    if entry is not None and entry.pid == os.getpid():
        try:
            os.unlink(path)
        except OSError:
            pass


def _read(path: str, owner: int) -> Optional[Entry]:
    """The entry at ``path`` if it is a plain file of ``owner`` that nobody else can
    write (checked on the open descriptor), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, encoding="utf-8") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != owner or st.st_mode & 0o022:
                return None
            return Entry.from_json(json.load(f), path, st.st_uid)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _directories() -> Iterator[Tuple[str, bool, int]]:
    """(directory, may_clean, owner) for every registry this user can read: ours only if
    it is safe (a squatted one is skipped), and, for root, the other users' safe ones,
    whose entries must prove they are that user's."""
    uid = os.geteuid()
    seen = set()
    for path in candidates():
        seen.add(path)
        if not _safe_dir(path, uid):
            yield path, True, uid
    if uid == 0 and not os.environ.get("FCGI_MANAGER_REGISTRY"):
        others = glob.glob("/run/user/*/fcgi-manager") + glob.glob(
            os.path.join(tempfile.gettempdir(), "fcgi-manager-*"))
        for path in sorted(others):
            if path in seen:
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and not _safe_dir(path, st.st_uid):
                yield path, False, st.st_uid


def _vouched(entry: Entry, owner: int) -> bool:
    """An entry in another user's registry names that user's own master and socket (root
    must not be sent to a socket of the writer's choosing)."""
    if owner == os.geteuid():
        return True
    try:
        st = os.lstat(entry.control)
        return entry.uid == owner and stat.S_ISSOCK(st.st_mode) and st.st_uid == owner \
            and psutil.Process(entry.pid).uids().effective == owner
    except (OSError, psutil.Error):
        return False


def entries(clean: bool = True) -> List[Entry]:
    """Every live master registered, oldest first; stale entries are removed on the way."""
    found = []
    for directory, may_clean, owner in _directories():
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for filename in names:
            if not filename.endswith(".json") or filename.startswith("."):
                continue
            entry = _read(os.path.join(directory, filename), owner)
            if entry is None:
                continue
            if entry.alive():
                if _vouched(entry, owner):
                    found.append(entry)
            elif clean and may_clean:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass
    found.sort(key=lambda e: (e.started, e.pid))
    return found


def find_all(*, config: str = "", pidfile: str = "", pid: int = 0) -> List[Entry]:
    """The live masters registered by this user with this config file, pidfile or pid:
    a command aimed at one master never follows another user's entry."""
    uid = os.geteuid()
    return [e for e in entries() if e.owner == uid and e.uid == uid and (
        (config and e.config == config) or (pidfile and e.pidfile == pidfile)
        or (pid and e.pid == pid))]


def find(*, config: str = "", pidfile: str = "", pid: int = 0) -> Optional[Entry]:
    """The live master this user registered with this config file, pidfile or pid (the
    oldest)."""
    found = find_all(config=config, pidfile=pidfile, pid=pid)
    return found[0] if found else None
