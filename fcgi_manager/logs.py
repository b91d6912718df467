"""Logging for operators: one line per event, tagged with who said it.

Master lines read ``2026-11-25 12:00:00 [master 1234] INFO: message``. Workers log to
their stderr, which the master reads line by line and writes as
``2026-11-25 12:00:00 [worker 3 pid 1240] ERROR: message`` -- the same tag for the app's
own prints, ``wsgi.errors`` and stack dumps, so ``grep 'worker 3'`` finds everything.
When the log is a file, a worker writes its own lines to it in that same form
(:func:`worker_lines`, ``outpipe.FileLineWriter``) and the master relays only what comes
through fd 1 and 2 (child processes, stack dumps), so an error flood costs it nothing.

With ``[manager] log_format = "json"`` every line is one JSON object instead::

    {"ts": "2026-11-25T12:00:00.123+00:00", "level": "error", "pid": 1240, "worker": 3,
     "event": "log", "message": "...", ...the event's own fields}

``worker`` is null on the master's own lines. A worker then writes its log records to its
stderr as RFC 7464 JSON texts (``\x1e`` + object), so a record that spans lines (a
traceback) stays one object; the master adds ``ts``/``pid``/``worker``. Anything else a
worker prints (the app's ``print``, faulthandler's stacks) becomes
``{"event": "output", "message": line}``.

The log file is reopened on ``reopen-logs``/``SIGUSR1`` (logrotate). A log that cannot be
written (disk full, permissions) never stops serving: the failure is reported once on
stderr and logging goes on trying.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, TextIO

from . import fsafe
from .escaping import escape

LOGGER = "fcgi_manager"
RECORD_SEPARATOR = "\x1e"  # starts a worker's JSON log record (RFC 7464)
# LogRecord attributes that are not fields of the event (everything else given with
# ``extra=`` is).
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "tag", "event"}


def iso_time(ts: float) -> str:
    """``2026-11-25T12:00:00.123+00:00``: local time with its offset, milliseconds."""
    local = time.localtime(ts)
    offset = time.strftime("%z", local)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", local) + f".{int(ts % 1 * 1000):03d}"
            + offset[:3] + ":" + offset[3:])


def _event_fields(record: logging.LogRecord) -> Dict[str, Any]:
    """The event name and the fields a caller passed with ``extra=``."""
    fields: Dict[str, Any] = {"event": getattr(record, "event", "log")}
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_"):
            fields[key] = value
    return fields


def _dumps(obj: Dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, default=str)


class _JsonFormatter(logging.Formatter):
    """The master's lines as JSON objects (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        obj: Dict[str, Any] = {"ts": iso_time(record.created),
                               "level": record.levelname.lower(), "pid": os.getpid(),
                               "worker": getattr(record, "worker", None)}
        obj.update(_event_fields(record))
        obj["message"] = msg
        return _dumps(obj)

def shown_uri(uri: str, show_query: bool) -> str:
    """A request URI as status and logs show it: the query string (where tokens and
    session ids travel) as ``?…`` unless ``status.show_query`` is true."""
    if show_query:
        return uri
    path, sep, _ = uri.partition("?")
    return path + "?\u2026" if sep else uri


class _Formatter(logging.Formatter):
    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        tag = getattr(record, "tag", None) or f"{self.tag} {os.getpid()}"
        return f"{ts} [{tag}] {record.levelname}: {msg}"


class ReopenableHandler(logging.Handler):
    """Writes to a file (reopened on demand) or to stderr; never raises into the caller."""

    def __init__(self, path: str, json_lines: bool = False) -> None:
        super().__init__()
        self.path = path
        self.json = json_lines  # log_format = "json": worker lines are written as JSON too
        self.stream: Optional[TextIO] = None
        self._failed = False
        self.lost = 0  # lines dropped since writing last worked
        self.lost_total = 0  # lines dropped in all (status: log_lines_lost)
        self.failing = ""  # "ENOSPC on PATH" while writing fails
        self.errno = 0  # its errno (status shows "log write failing: ENOSPC on PATH")
        self.open_error = self.reopen()

    def reopen(self) -> Optional[str]:
        """Open the log file again; on failure the old stream stays and the reason is
        returned (so ``reopen-logs`` can fail instead of claiming success)."""
        if self.path in ("", "-"):
            self.stream = sys.stderr
            return None
        old = self.stream
        try:
            fd = fsafe.open_append(self.path)
            self.stream = open(fd, "a", encoding="utf-8", errors="replace", buffering=1)
            self._failed = False
        except OSError as exc:
            error = f"cannot open log file {self.path}: {exc.strerror}"
            self._report(error)
            if old is None:
                self.stream = None
            return error
        if old is not None and old is not sys.stderr:
            try:
                old.close()
            except OSError:
                pass
        return None

    def _report(self, text: str) -> None:
        if self._failed:
            return
        self._failed = True
        stderr = sys.__stderr__
        if stderr is None:  # started without any stderr: nobody to tell
            return
        try:
            stderr.write(f"fcgi-manager: {text}; serving goes on\n")
            stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass

    def write_line(self, line: str) -> None:
        stream = self.stream
        if stream is None:
            return
        if stream is sys.stderr or self.path in ("", "-"):
            try:
                stream.write(line + "\n")
                stream.flush()
            except (OSError, ValueError) as exc:
                self._report(f"cannot write the log {self.path}: "
                             f"{getattr(exc, 'strerror', exc)}")
            return
        self._write_whole(stream, line)

    def _write_whole(self, stream: TextIO, line: str) -> None:
        """One ``write`` per line on the ``O_APPEND`` descriptor, never through a buffer:
        a line that cannot be written whole (disk full) is dropped and counted, and a
        part already written is cut off again, so the file never holds a fragment; the
        first line written once it works again says how many were lost."""
        data = (line + "\n").encode("utf-8", "replace")
        if self.lost:
            data = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} [master {os.getpid()}] WARNING: "
                    f"{self.lost} log line(s) were lost while writing failed "
                    f"({self.failing})\n").encode() + data
        try:
            append_whole(stream.fileno(), data)
        except (OSError, ValueError) as exc:
            code = getattr(exc, "errno", None)
            self.failing = (f"{errno.errorcode.get(code, 'error')} on {self.path}"
                            if code else f"{exc} on {self.path}")
            self.errno = code or 0
            self.lost += 1
            self.lost_total += 1
            self._report(f"log write failing: {self.failing}; lines are counted and dropped "
                         "until it works again")
            return
        self.lost = 0
        self.failing = ""
        self.errno = 0
        self._failed = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a bad format string must not take the master down
            line = f"(unformattable log record: {record.msg!r})"
        self.write_line(line)

    def close(self) -> None:
        # Only a file we opened: stderr (path "-") is not ours to close, even once a
        # forked worker has replaced sys.stderr with its own.
        if self.stream is not None and self.path not in ("", "-"):
            try:
                self.stream.close()
            except OSError:
                pass
        self.stream = None
        super().close()


def setup_master(path: str, level: str, log_format: str = "text") -> ReopenableHandler:
    """Route the package's logger to ``path`` ("-" = stderr) for the master."""
    logger = logging.getLogger(LOGGER)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    handler = ReopenableHandler(path, json_lines=log_format == "json")
    handler.setFormatter(_JsonFormatter() if handler.json else _Formatter("master"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    logging.raiseExceptions = False
    return handler


class _WorkerFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return f"{record.levelname}: {msg}"


class _WorkerJsonFormatter(logging.Formatter):
    """A worker's record as ``\x1e`` + one JSON object; the master completes it."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        obj: Dict[str, Any] = {"ts": iso_time(record.created),
                               "level": record.levelname.lower()}
        obj.update(_event_fields(record))
        obj["message"] = msg
        return RECORD_SEPARATOR + _dumps(obj)


def setup_worker(level: str, log_format: str = "text") -> None:
    """In a worker: plain ``LEVEL: message`` lines on stderr; the master adds time and tag.
    With ``log_format = "json"``: one JSON text per record (see the module docstring)."""
    logger = logging.getLogger(LOGGER)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_WorkerJsonFormatter() if log_format == "json"
                         else _WorkerFormatter())
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    logging.raiseExceptions = False


def append_whole(fd: int, data: bytes) -> None:
    """Append ``data`` (whole lines) to the ``O_APPEND`` file ``fd`` with one ``write``, so
    that lines of other writers of the same file (the master, the other workers) never
    land inside them. A short write (disk full) is cut off again, so the file never holds
    a fragment, and raises OSError(ENOSPC)."""
    n = os.write(fd, data)
    if n < len(data):
        end = os.lseek(fd, 0, os.SEEK_END)
        os.ftruncate(fd, end - n)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def worker_lines(json_lines: bool, worker_id: int, pid: int, lines: List[str]) -> str:
    """Lines of a worker's output as the log shows them, each tagged, escaped and ended
    with a newline: the master writes them so for what it relays, a worker for what it
    writes to the log file itself (outpipe.FileLineWriter), so both read the same."""
    if json_lines:
        return "".join(worker_json_line(worker_id, pid, line) + "\n" for line in lines)
    prefix = f"{time.strftime('%Y-%m-%d %H:%M:%S')} [worker {worker_id} pid {pid}] "
    return "".join(prefix + escape(line) + "\n" for line in lines)


def worker_line(handler: ReopenableHandler, worker_id: int, pid: int, line: str) -> None:
    """Write one captured line of a worker's output, tagged."""
    handler.write_line(worker_lines(handler.json, worker_id, pid, [line])[:-1])


def worker_json_line(worker_id: int, pid: int, line: str) -> str:
    """A worker's captured line as a JSON object: its own record, or its raw output."""
    head = {"ts": iso_time(time.time()), "level": "info", "pid": pid, "worker": worker_id}
    if line.startswith(RECORD_SEPARATOR):
        try:
            record = json.loads(line[1:])
        except ValueError:
            record = None
        if isinstance(record, dict):
            head.update({k: _escape_lines(v) if isinstance(v, str) else v
                         for k, v in record.items()})
            head["pid"], head["worker"] = pid, worker_id
            return _dumps(head)
        line = line[1:]
    head["event"] = "output"
    head["message"] = escape(line)
    return _dumps(head)


def _escape_lines(text: str) -> str:
    """A record's text escaped line by line: a traceback keeps its line breaks (JSON
    writes them as ``\\n``), and everything else that does not print is escaped."""
    if text.isprintable():
        return text
    return "\n".join(escape(part) for part in text.split("\n"))
