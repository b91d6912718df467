"""The access log: one line per request, written by the worker that served it.

``[manager] access_log`` is a path, ``"-"`` (the master's stderr) or ``""`` (off, the
default). Each line says when, who, what, how it ended, how long it took, and what it cost
the worker -- php-fpm's ``%M`` and ``%C``: the worker's resident memory (as of the last
second) and the CPU time the request used::

    127.0.0.1 - - [25/Nov/2026:12:00:00 +0000] "GET /hello?x=1 HTTP/1.1" 200 61 0.412ms
    worker=1 rss=24.3MiB cpu=0.310ms    (one line)

``access_format`` changes the text line with gunicorn-style ``%(name)s`` atoms (see
:data:`ATOMS`); with ``log_format = "json"`` each line is instead one JSON object with
every field (``access_format`` then does not apply).

What it costs, and why it is cheap (it runs on the hot path):

* CPU time is one ``getrusage(RUSAGE_THREAD)`` per request (the thread's own clock,
  right with ``workers.threads`` too; the cheapest per-thread CPU clock measured here,
  cheaper than ``time.thread_time()`` and half the cost of ``RUSAGE_SELF``). A request's
  CPU time is the thread's CPU since the previous request ended: receiving and parsing
  the request, the app, sending the answer (an idle worker uses none).
* RSS is read once a second (one ``pread`` of ``/proc/self/statm``): reading it per
  request cost more than the rest of the line, and a worker's memory moves slowly.
* The time stamps are formatted once a second; the default line and the JSON object are
  written out as f-strings (``%`` on a dict and ``json.dumps`` cost two to three times
  more); fields a custom format does not use are never computed (:class:`_Fields`).
* Lines are buffered and written with one ``write`` when 32 KiB are waiting or the oldest
  is a second old (nginx's ``access_log ... buffer= flush=``), and when the worker exits:
  a busy worker makes one system call per hundred-odd requests.

Reopening (logrotate): ``reopen-logs``/``SIGUSR1`` makes the master create the new file
(owned by ``manager.user``, never following a link) and bump a byte in the scoreboard;
each worker sees it at its next flush and reopens the file by path.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import threading
import time
from json.encoder import encode_basestring as _encode_json_string
from typing import Any, Callable, Dict, List, Optional

from . import fsafe
from .escaping import escape

log = logging.getLogger("fcgi_manager.worker")

FLUSH_BYTES = 32 * 1024
FLUSH_AFTER = 1.0  # seconds a line may wait in the buffer
FILE_MODE = 0o640

DEFAULT_FORMAT = ('%(h)s - - [%(t)s] "%(r)s" %(s)s %(b)s %(duration_ms)sms worker=%(w)s '
                  'rss=%(rss_mib)sMiB cpu=%(cpu_ms)sms')

_DEFAULT_LINE = '%s - - [%s] "%s" %d %s %.3fms worker=%d rss=%sMiB cpu=%.3fms\n'
_JSON_LINE = ('{"ts": "%s.%03d%s", "level": "info", "pid": %d, "worker": %d, '
              '"event": "request", "remote_addr": %s, "method": %s, "uri": %s, '
              '"protocol": %s, "status": %d, "bytes": %d, "duration_ms": %.3f, '
              '"rss_bytes": %d, "cpu_ms": %.3f, "referer": %s, "user_agent": %s}\n')

ATOMS = {
    "h": "remote address",
    "t": "time, [25/Nov/2026:12:00:00 +0000]",
    "r": 'request line, "GET /path?query HTTP/1.1"',
    "m": "method",
    "U": "path, without the query string",
    "q": "query string",
    "H": "protocol",
    "s": "status code",
    "b": "response bytes, '-' for none",
    "B": "response bytes (the FastCGI stream the web server received: headers, body, framing)",
    "f": "Referer",
    "a": "User-Agent",
    "T": "duration, whole seconds",
    "D": "duration, microseconds",
    "L": "duration, seconds with decimals",
    "duration_ms": "duration, milliseconds with 3 decimals",
    "p": "worker pid",
    "w": "worker id",
    "rss": "worker resident memory (read at most once a second), bytes",
    "rss_mib": "the same, MiB with one decimal",
    "cpu_ms": "CPU time the request used (user + system), milliseconds",
    "cpu_pct": "CPU time / duration, percent (php-fpm's %C)",
}

_RUSAGE = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
_getrusage = resource.getrusage
_monotonic = time.monotonic
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# The master's stderr, for access_log = "-" (a worker's own stderr is the pipe that the
# master tags as worker output). Set by prepare_master before the workers are forked.
_stderr_fd = -1


class _Fields(Dict[str, Any]):
    """The atoms of one line, computed only when the format asks for them."""

    __slots__ = ("params", "entry")
    params: Dict[str, str]
    entry: _Entry

    def __missing__(self, key: str) -> Any:
        p = self.params
        e = self.entry
        value: Any
        if key == "r":
            value = f"{escape(p.get('REQUEST_METHOD', '-'), True)} " \
                    f"{escape(e.uri, True)} {escape(p.get('SERVER_PROTOCOL', '-'), True)}"
        elif key == "m":
            value = escape(p.get("REQUEST_METHOD", "-"), True)
        elif key == "U":
            value = escape(e.uri.partition("?")[0], True)
        elif key == "q":
            value = escape(p.get("QUERY_STRING", ""), True)
        elif key == "H":
            value = escape(p.get("SERVER_PROTOCOL", "-"), True)
        elif key == "f":
            value = escape(p.get("HTTP_REFERER", "-"), True)
        elif key == "a":
            value = escape(p.get("HTTP_USER_AGENT", "-"), True)
        elif key == "B":
            value = e.nbytes
        elif key == "T":
            value = int(e.duration)
        elif key == "D":
            value = int(e.duration * 1e6)
        elif key == "L":
            value = f"{e.duration:.6f}"
        elif key == "p":
            value = os.getpid()
        elif key == "rss":
            value = e.rss
        elif key == "cpu_pct":
            value = f"{e.cpu / e.duration * 100:.1f}" if e.duration > 0 else "0.0"
        else:
            raise KeyError(key)
        self[key] = value
        return value


class _Entry:
    """What one finished request measured (shared by the text and JSON writers)."""

    __slots__ = ("uri", "nbytes", "duration", "cpu", "rss")
    uri: str
    nbytes: int
    duration: float  # seconds
    cpu: float  # seconds
    rss: int  # bytes


class _Meter:
    """What measures one request, for the log itself (one-thread workers) and for each app
    thread (:class:`ThreadMeter`): when it began, the bytes that went out, and where the
    CPU clock stood (``-1`` until the first request: counted from there, not the fork)."""

    __slots__ = ("_t0", "_cpu0", "nbytes", "_send")

    def __init__(self) -> None:
        self._t0 = 0.0
        self._cpu0 = -1.0  # CPU time is counted from one request's end to the next one's
        self.nbytes = 0
        self._send: Callable[[bytes], None] = _nowhere

    def begin(self) -> None:
        self._t0 = _monotonic()
        self.nbytes = 0
        if self._cpu0 < 0:  # the first request: count from here, not from the fork
            r = _getrusage(_RUSAGE)
            self._cpu0 = r.ru_utime + r.ru_stime

    def counting(self, send: Callable[[bytes], None]) -> Callable[[bytes], None]:
        """``send`` for this request, counting the bytes that go out."""
        self._send = send
        return self._counting_send

    def _counting_send(self, data: bytes) -> None:
        self.nbytes += len(data)
        self._send(data)


class AccessLog(_Meter):
    """A worker's access log: measures each request and writes its line.

    The worker calls :meth:`begin` when a request starts, wraps the connection's ``send``
    with :meth:`counting` so the response is measured, and calls :meth:`end` when it is
    done; its loop calls :meth:`flush_due` now and then (and :attr:`pending` tells it a
    line is waiting), and :meth:`close` at exit.
    """

    def __init__(self, path: str, fmt: str, json_lines: bool, worker_id: int,
                 log_epoch: Callable[[], int]) -> None:
        super().__init__()
        self.path = path
        self.format = fmt or DEFAULT_FORMAT
        self.json = json_lines
        self.worker_id = worker_id
        self.pid = os.getpid()
        self._log_epoch = log_epoch
        self.epoch = log_epoch()
        self.fd = -1
        self.buf: List[str] = []
        self.buf_len = 0
        self.pending = False
        self.flush_at = 0.0
        self._failed = False
        self.lock: Optional[threading.Lock] = None  # set when app threads share this log
        # Refreshed once a second (see _tick): the time stamps and the RSS.
        self._next_tick = 0.0
        self._sec = 0
        self._time_text = ""
        self._iso_prefix = ""
        self._iso_offset = ""
        self.rss = 0
        self._rss_mib = "0.0"
        try:
            self._statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._statm = -1
        if self.json:
            self._line = self._json_line
        elif self.format == DEFAULT_FORMAT:
            self._line = self._default_line
        else:
            self._line = self._custom_line
        self._open()

    # -- the request path (begin and counting: _Meter) -----------------------------------

    def end(self, params: Dict[str, str], uri: str, status: int) -> None:
        """The request is over: measure it and queue its line."""
        now = _monotonic()
        r = _getrusage(_RUSAGE)
        cpu = r.ru_utime + r.ru_stime
        self._record(now, params, uri, status, self.nbytes, now - self._t0, cpu - self._cpu0)
        self._cpu0 = cpu

    def _record(self, now: float, params: Dict[str, str], uri: str, status: int,
                nbytes: int, duration: float, cpu: float) -> None:
        if now >= self._next_tick:
            self._tick(now)
        line = self._line(params, uri, status, nbytes, duration, cpu)
        self.buf.append(line)
        self.buf_len += len(line)
        if not self.pending:
            self.pending = True
            self.flush_at = now + FLUSH_AFTER
        if self.buf_len >= FLUSH_BYTES or now >= self.flush_at:
            self.flush()

    def _tick(self, now: float) -> None:
        """Once a second: the RSS (a read of /proc costs more than the rest of a line, and
        memory moves slowly) and the time stamp's text."""
        wall = time.time()
        self._sec = sec = int(wall)
        self._next_tick = now + (sec + 1 - wall)
        local = time.localtime(sec)
        self._time_text = time.strftime("%d/%b/%Y:%H:%M:%S %z", local)
        offset = time.strftime("%z", local)
        self._iso_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", local)
        self._iso_offset = offset[:3] + ":" + offset[3:]
        if self._statm >= 0:
            try:
                self.rss = int(os.pread(self._statm, 64, 0).split()[1]) * _PAGE
            except (OSError, ValueError, IndexError):
                self.rss = 0
        self._rss_mib = f"{self.rss / 1048576:.1f}"

    def _default_line(self, params: Dict[str, str], uri: str, status: int, nbytes: int,
                      duration: float, cpu: float) -> str:
        """:data:`DEFAULT_FORMAT`, as one ``%`` on a tuple: a third of the cost of ``%`` on
        a dict of atoms."""
        get = params.get
        request = f"{get('REQUEST_METHOD', '-')} {uri} {get('SERVER_PROTOCOL', '-')}"
        return _DEFAULT_LINE % (escape(get("REMOTE_ADDR", "-"), True), self._time_text,
                                escape(request, True), status, nbytes or "-", duration * 1000,
                                self.worker_id, self._rss_mib, cpu * 1000)

    def _custom_line(self, params: Dict[str, str], uri: str, status: int, nbytes: int,
                     duration: float, cpu: float) -> str:
        e = _Entry()
        e.uri, e.nbytes, e.duration, e.cpu, e.rss = uri, nbytes, duration, cpu, self.rss
        fields = _Fields(
            h=escape(params.get("REMOTE_ADDR", "-"), True), t=self._time_text, s=status,
            b=nbytes or "-", w=self.worker_id, duration_ms=f"{duration * 1000:.3f}",
            rss_mib=self._rss_mib, cpu_ms=f"{cpu * 1000:.3f}")
        fields.params = params
        fields.entry = e
        try:
            return self.format % fields + "\n"
        except (KeyError, ValueError, TypeError) as exc:
            self.format = DEFAULT_FORMAT  # checked at start; never fail a request for it
            self._line = self._default_line
            log.error("manager.access_format cannot be used (%s): using the default", exc)
            return self._default_line(params, uri, status, nbytes, duration, cpu)

    def _json_line(self, params: Dict[str, str], uri: str, status: int, nbytes: int,
                   duration: float, cpu: float) -> str:
        """One JSON object as one ``%`` on a tuple (``json.dumps`` of a dict costs twice as
        much); strings go through :func:`escape`, then json's own C escaper."""
        get = params.get
        ms = int((time.time() - self._sec) * 1000) % 1000
        return _JSON_LINE % (
            self._iso_prefix, ms, self._iso_offset, self.pid, self.worker_id,
            _json_str(get("REMOTE_ADDR")), _json_str(get("REQUEST_METHOD")), _json_str(uri),
            _json_str(get("SERVER_PROTOCOL")), status, nbytes, duration * 1000, self.rss,
            cpu * 1000, _json_str(get("HTTP_REFERER")), _json_str(get("HTTP_USER_AGENT")))

    # -- writing ----------------------------------------------------------------------------

    def flush_due(self, now: float) -> None:
        """From the worker's loop: write lines that have waited long enough."""
        if self.pending and now >= self.flush_at:
            if self.lock is None:
                self.flush()
            else:
                with self.lock:
                    self.flush()

    def thread_meter(self) -> ThreadMeter:
        """A meter for one app thread of a threaded worker (``workers.threads`` > 1):
        each thread measures its own requests; the lines meet in this log under a lock."""
        if self.lock is None:
            self.lock = threading.Lock()
        return ThreadMeter(self)

    def flush(self) -> None:
        if self._log_epoch() != self.epoch:
            self.epoch = self._log_epoch()
            self._open()
        data = "".join(self.buf).encode("utf-8", "replace")
        self.buf = []
        self.buf_len = 0
        self.pending = False
        if self.fd < 0:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            self._failed = False
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.error("cannot write the access log %s: %s (lines are dropped until it "
                          "works again)", self.path, exc.strerror or exc)

    def _open(self) -> None:
        """Open (or reopen) the file; on failure keep the old descriptor."""
        if self.path == "-":
            self.fd = _stderr_fd if _stderr_fd >= 0 else 2
            return
        try:
            fd = fsafe.open_append(self.path, FILE_MODE)
        except OSError as exc:
            log.error("cannot open the access log %s: %s (check that manager.user may write "
                      "it)", self.path, exc.strerror or exc)
            return
        old, self.fd = self.fd, fd
        if old >= 0 and old != _stderr_fd and old != 2:
            os.close(old)

    def close(self) -> None:
        if self.pending:
            if self.lock is None:
                self.flush()
            else:
                with self.lock:
                    self.flush()
        if self.fd >= 0 and self.fd not in (_stderr_fd, 2):
            os.close(self.fd)
        self.fd = -1
        if self._statm >= 0:
            os.close(self._statm)
            self._statm = -1


class ThreadMeter(_Meter):
    """:meth:`AccessLog.begin`/:meth:`~AccessLog.counting`/:meth:`~AccessLog.end` for
    one app thread: the measuring state is the thread's own (its CPU clock is
    ``RUSAGE_THREAD``), the line goes into the shared log under its lock."""

    __slots__ = ("log",)

    def __init__(self, access_log: AccessLog) -> None:
        super().__init__()
        self.log = access_log

    def end(self, params: Dict[str, str], uri: str, status: int) -> None:
        now = _monotonic()
        r = _getrusage(_RUSAGE)
        cpu = r.ru_utime + r.ru_stime
        with self.log.lock:  # type: ignore[union-attr]  # set by threaded(), before any ThreadMeter
            self.log._record(now, params, uri, status, self.nbytes, now - self._t0,
                             cpu - self._cpu0)
        self._cpu0 = cpu


def _json_str(value: Optional[str]) -> str:
    """A JSON string of request data: :func:`escape` first (JSON's own escaper lets DEL
    and the C1 controls through raw), then JSON's quoting."""
    return "null" if value is None else _encode_json_string(escape(value))


def _nowhere(data: bytes) -> None:  # pragma: no cover - never called
    raise RuntimeError("the access log's send was used outside a request")


def for_worker(cfg: Any, worker_id: int, log_epoch: Callable[[], int]) -> Optional[AccessLog]:
    """The worker's access log, or None when ``manager.access_log`` is off."""
    m = cfg.manager
    if not m.access_log:
        return None
    return AccessLog(m.access_log, m.access_format, m.log_format == "json", worker_id,
                     log_epoch)


def prepare_master(cfg: Any, uid: Optional[int] = None, gid: Optional[int] = None) -> None:
    """In the master, before forking: create the access log file (so that workers running
    as ``manager.user`` can open it), or keep a descriptor of stderr for ``"-"``.

    Raises OSError (naming the file) when the file cannot be created.
    """
    global _stderr_fd
    path = cfg.manager.access_log
    if not path:
        return
    if path == "-":
        if _stderr_fd < 0:
            try:
                _stderr_fd = os.dup(sys.__stderr__.fileno() if sys.__stderr__ else 2)
            except (OSError, ValueError):
                _stderr_fd = -1
        return
    # Never through a link someone else made, nor into a file of a third user.
    fd = fsafe.open_append(path, FILE_MODE, owners=(uid,))
    try:
        if os.geteuid() == 0 and uid is not None:
            os.fchown(fd, uid, -1 if gid is None else gid)
    finally:
        os.close(fd)


def check_format(fmt: str) -> Optional[str]:
    """Why ``access_format`` cannot be used (None if it can): every atom must be known."""
    if not fmt:
        return None
    fields = {name: 0 for name in ATOMS}
    try:
        fmt % fields
    except KeyError as exc:
        return f"unknown atom %({exc.args[0]})s; known: {', '.join(ATOMS)}"
    except (ValueError, TypeError) as exc:
        return f"{exc}: write atoms as %(name)s"
    return None
