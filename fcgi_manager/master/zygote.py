"""The zygote: where ``preload`` imports the app when the master runs as root.

``preload`` means "import once, fork every worker from the imported state". Importing in
the master itself would run the app's code as root (gunicorn does that), and changing
only the effective uid for the import is no drop at all: the code can switch back. So
when the master is root and ``manager.user`` is set, it forks this child instead. The
zygote drops to the user for good (``initgroups``, ``setresgid``, ``setresuid``), imports
the app, and from then on forks the generation's workers on request::

    master                                   zygote (manager.user)
      -- fork -->                            drop, import the app
      <-- "R" (ready) | "E" {json error} --
      -- {"slot": S, "max_requests": N} ->   pipes, fork: the child forks the worker
                                             and exits, so the worker is an orphan
      <-- "P" {"pid": P} + [out_r, note_r]   (read ends passed with SCM_RIGHTS)

The master is ``PR_SET_CHILD_SUBREAPER``: an orphaned worker becomes its child, so its
one reaper, its timeouts and its signals work on zygote-forked workers unchanged. The
worker waits until it is the master's child before it sets its parent-death signal.

Messages travel on a ``SOCK_SEQPACKET`` socketpair (one message per send). The master
never waits on it: its end is non-blocking and sits in the master's selector, and every
question has a deadline (the import: the reload timeout; a spawn: ``SPAWN_TIMEOUT``). A
zygote past a deadline (stopped, hung) or dead is SIGKILLed and replaced; a pid it
reports is believed only if the kernel says it is the master's child (``kinship.py``).
The master's end is close-on-exec: when the master re-executes itself on reload, or
exits, the zygote sees EOF and exits; it also watches the death pipe. Each generation has
its own zygote (a reload imports fresh code in a fresh one, also without root: a
re-executed master never imports in its own loop); it holds the listener, the
scoreboard, its generation's hand-off channel and the death pipe's read end, nothing else
of the master's.

Cost: one more process per generation, holding the imported app (its pages are shared
with the workers forked from it, as with a preloading master), and a round trip through
it per worker spawn (well under a millisecond beside the fork itself).
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import struct
import time
import traceback
from typing import Any, Callable, List, Tuple

from ..errors import AppImportError, FcgiManagerError
from . import procctl

SPAWN_TIMEOUT = 5.0  # a fork takes milliseconds: past this the zygote is hung or stopped
MAX_MESSAGE = 262144
MAX_TRACEBACK = 60000
READY, IMPORT_ERROR, SPAWNED, FAILED = "ready", "import-error", "spawned", "failed"


def _encode(kind: bytes, obj: Any) -> bytes:
    return kind + json.dumps(obj).encode("utf-8", "replace")


def _decode(data: bytes) -> Tuple[bytes, Any]:
    kind, body = data[:1], data[1:]
    try:
        return kind, json.loads(body.decode("utf-8", "replace")) if body else None
    except ValueError:
        return kind, None


class Zygote:
    """The master's handle on one zygote process: a state machine the master's selector
    drives (:meth:`on_readable`) and its tick times out (:meth:`expired`). Nothing here
    waits, except :meth:`wait_ready` at the first start, before the loop runs.

    ``generation`` is the generation whose workers it forks (their hand-off channel was
    in the setup it was forked with)."""

    def __init__(self, pid: int, sock: socket.socket, generation: int, deadline: float) -> None:
        self.pid = pid
        self.sock = sock
        self.generation = generation
        self.alive = True
        self.ready = False
        self.ready_deadline = deadline  # the import must be done by then
        self.timeout = max(0.0, deadline - time.monotonic())
        self.queued: List[Tuple[int, int]] = []  # (slot, max_requests) until it is ready
        self.asked: List[Tuple[int, float]] = []  # (slot, deadline) sent, in order

    # -- in the master ------------------------------------------------------------------

    @classmethod
    def start(cls, prepare_child: Callable[[], None], load: Callable[[], Any],
              spawn: Callable[[int, int, int, int], None], watch_fd: int,
              timeout: float, generation: int = 0) -> Zygote:
        """Fork the zygote; it imports the app while the master goes on.

        ``prepare_child`` runs first in the zygote (close what belongs to the master and
        drop privileges for good), ``load`` imports the app there, ``spawn(slot, out_w,
        note_w, max_requests)`` becomes a worker (never returns)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the zygote never returns
            code = 1
            try:
                ours.close()
                code = _zygote_main(theirs, prepare_child, load, spawn, watch_fd)
            except BaseException:
                try:
                    traceback.print_exc()
                except Exception:
                    pass
            finally:
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        return cls(pid, ours, generation, time.monotonic() + timeout)

    def wait_ready(self) -> None:
        """Block until the import is done (the first start only: ``start`` waits for it
        anyway). Raises AppImportError with the app's traceback if it fails."""
        while True:
            left = self.ready_deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                self.stop()
                raise FcgiManagerError(f"importing the app took longer than {self.timeout:.0f} s")
            for event in self.on_readable():
                if event[0] == READY:
                    return
                if event[0] == IMPORT_ERROR:
                    self.stop()
                    raise event[1]
            if not self.alive:
                self.stop()
                raise FcgiManagerError("the process importing the app (as manager.user) died "
                                       "before it said whether the import worked",
                                       "see the log for what it printed")

    def request(self, slot: int, max_requests: int) -> None:
        """Ask for a worker for ``slot``: its SPAWNED or FAILED event comes later."""
        if not self.ready:
            self.queued.append((slot, max_requests))
            return
        try:
            self.sock.send(_encode(b"S", {"slot": slot, "max_requests": max_requests}))
        except OSError:
            self.alive = False
        self.asked.append((slot, time.monotonic() + SPAWN_TIMEOUT))

    def on_readable(self) -> List[Tuple[Any, ...]]:
        """Every message waiting, as events: (READY,), (IMPORT_ERROR, exc),
        (SPAWNED, slot, pid, out_r, note_r), (FAILED, slot, text). The slot of a reply is
        the oldest one asked (the zygote answers in order), never what the zygote says.
        Sets :attr:`alive` False at EOF."""
        events: List[Tuple[Any, ...]] = []
        while self.alive:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 2)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data, fds = b"", []
            if not data:
                for fd in fds:
                    os.close(fd)
                self.alive = False
                break
            kind, body = _decode(data)
            if not self.ready:
                for fd in fds:
                    os.close(fd)
                if kind == b"R":
                    self.ready = True
                    events.append((READY,))
                    queued, self.queued = self.queued, []
                    for slot, max_requests in queued:
                        self.request(slot, max_requests)
                    continue
                body = body if isinstance(body, dict) else {}
                events.append((IMPORT_ERROR, AppImportError(
                    str(body.get("message", "the import failed")),
                    str(body.get("traceback", "")), str(body.get("hint", "")))))
                self.alive = False
                break
            if not self.asked:  # a reply nobody asked for: the zygote is not to be trusted
                for fd in fds:
                    os.close(fd)
                self.alive = False
                break
            slot, _ = self.asked.pop(0)
            if kind == b"P" and isinstance(body, dict) and len(fds) == 2 \
                    and isinstance(body.get("pid"), int):
                events.append((SPAWNED, slot, int(body["pid"]), fds[0], fds[1]))
                continue
            for fd in fds:
                os.close(fd)
            events.append((FAILED, slot, body if isinstance(body, str)
                           else "the zygote could not fork"))
        return events

    def pending_slots(self) -> List[int]:
        """Slots asked for and not answered (a dead zygote fails them all)."""
        return [slot for slot, _ in self.asked] + [slot for slot, _ in self.queued]

    def expired(self, now: float) -> bool:
        """Stopped or hung: the import or the oldest spawn is past its deadline."""
        if not self.ready:
            return now > self.ready_deadline
        return bool(self.asked) and now > self.asked[0][1]

    def kill(self) -> None:
        """End the zygote now, without waiting (the master's reaper reaps it)."""
        self.alive = False
        try:
            self.sock.close()
        except OSError:
            pass
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """End the zygote now (it holds no state worth a graceful exit) and reap it:
        outside the loop only (a failed start)."""
        self.kill()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


# -- in the zygote ----------------------------------------------------------------------

def _zygote_main(sock: socket.socket, prepare_child: Callable[[], None],
                 load: Callable[[], Any], spawn: Callable[[int, int, int, int], None],
                 watch_fd: int) -> int:
    try:
        prepare_child()
        load()
    except AppImportError as exc:
        sock.send(_encode(b"E", {"message": exc.message,
                                 "traceback": (exc.traceback_text or "")[-MAX_TRACEBACK:],
                                 "hint": exc.hint}))
        return 1
    except FcgiManagerError as exc:
        sock.send(_encode(b"E", {"message": exc.message, "traceback": "", "hint": exc.hint}))
        return 1
    except OSError as exc:  # the drop itself failed
        sock.send(_encode(b"E", {"message": f"cannot become manager.user: {exc}",
                                 "traceback": "", "hint": ""}))
        return 1
    gc.collect()
    if hasattr(gc, "freeze"):
        gc.freeze()  # keep the imported app's pages shared with the workers
    sock.send(b"R")
    master_pid = os.getppid()
    sock.settimeout(None)
    sock_fd = sock.fileno()
    while True:
        ready, _, _ = select.select([sock_fd, watch_fd], [], [])
        if watch_fd in ready:
            try:
                if not os.read(watch_fd, 1):
                    return 0  # the master is gone
            except OSError:
                return 0
        if sock_fd not in ready:
            continue
        try:
            data = sock.recv(MAX_MESSAGE)
        except OSError:
            return 0
        if not data:
            return 0  # the master closed its end: exit, reload or stop
        kind, body = _decode(data)
        if kind != b"S" or not isinstance(body, dict):
            continue
        _fork_worker(sock, int(body["slot"]), int(body["max_requests"]), master_pid, spawn)
        _reap_quietly()


def _fork_worker(sock: socket.socket, slot: int, max_requests: int, master_pid: int,
                 spawn: Callable[[int, int, int, int], None]) -> None:
    """Fork twice so that the worker is orphaned at once and becomes the master's child
    (the master is a subreaper); send its pid and its pipes' read ends to the master."""
    out_r, out_w = os.pipe()
    note_r, note_w = os.pipe()
    pid_r, pid_w = os.pipe()
    try:
        middle = os.fork()
    except OSError as exc:
        for fd in (out_r, out_w, note_r, note_w, pid_r, pid_w):
            os.close(fd)
        sock.send(_encode(b"F", f"cannot fork a worker: {exc}"))
        return
    if middle == 0:  # pragma: no cover - the intermediate child
        code = 0
        try:
            sock.close()
            os.close(out_r)
            os.close(note_r)
            os.close(pid_r)
            worker = os.fork()
            if worker == 0:
                os.close(pid_w)
                _await_reparenting(master_pid)
                spawn(slot, out_w, note_w, max_requests)  # never returns
            os.write(pid_w, struct.pack("!i", worker))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    for fd in (out_w, note_w, pid_w):
        os.close(fd)
    try:
        os.waitpid(middle, 0)
        raw = os.read(pid_r, 4)
    finally:
        os.close(pid_r)
    try:
        if len(raw) != 4:
            sock.send(_encode(b"F", "cannot fork a worker"))
            return
        (pid,) = struct.unpack("!i", raw)
        socket.send_fds(sock, [_encode(b"P", {"pid": pid})], [out_r, note_r])
    finally:
        os.close(out_r)
        os.close(note_r)


def _await_reparenting(master_pid: int, limit: float = 5.0) -> None:
    """In a new worker: wait until the intermediate process has exited and the master
    (the subreaper) is our parent, so the parent-death signal set next watches it."""
    deadline = time.monotonic() + limit
    while os.getppid() != master_pid and time.monotonic() < deadline:
        time.sleep(0.0005)


def _reap_quietly() -> None:
    """Reap children of the zygote other than the intermediates (the app's own)."""
    for _ in procctl.exited_children():
        pass


def new_zygote_wanted(preload: bool, app_given: bool, user: Any) -> bool:
    """Preload as root with manager.user: import in a zygote, never in the master."""
    return preload and not app_given and user.switching and user.uid not in (None, 0)


__all__ = ["Zygote", "new_zygote_wanted"]

