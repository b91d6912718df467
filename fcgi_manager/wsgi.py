"""The WSGI side of a request (PEP 3333): environ from FastCGI params, the app's output
as STDOUT records.

This module knows WSGI and the FastCGI record format, and nothing of sockets: the worker
hands :func:`run_app` a ``send(bytes)`` callable. Output is gathered so that a small
response (headers + body + END_REQUEST) leaves in one ``send``; a large or streamed one is
flushed whenever 64 KiB are pending.

Path rules (so that routing works at the root and under a sub-path):

* params are taken as sent (nginx with ``fastcgi_split_path_info``, Apache ``ScriptAlias``);
* a front end that sends no PATH_INFO at all and puts the whole request path in
  SCRIPT_NAME (nginx's stock ``fastcgi_params`` at the root) is read as a root mount;
* ``app.script_name`` forces SCRIPT_NAME (the Flask guide's ScriptNameStripper). A sent
  SCRIPT_NAME that is empty or a parent of the forced one is re-split: the forced prefix
  is taken off the front of the full path (Apache ``mod_proxy_fcgi`` sends it all); one
  that names the script (``/yourapplication.fcgi`` after mod_fcgid's RewriteRule) is
  replaced and PATH_INFO kept as sent. ``app.fix_root_url`` moves SCRIPT_NAME into
  PATH_INFO (lighttpd mounted at "/").
"""

from __future__ import annotations

import io
import sys
import tempfile
import traceback
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple
from urllib.parse import unquote

from . import protocol

FLUSH_AT = 64 * 1024
_HEADER = protocol.HEADER
_STDOUT = protocol.STDOUT
_STDERR = protocol.STDERR
_VERSION = protocol.VERSION
_MAX = protocol.MAX_CONTENT

INTERNAL_ERROR_BODY = (
    b"<!DOCTYPE html><title>500 Internal Server Error</title>"
    b"<h1>Internal Server Error</h1><p>The application raised an error; "
    b"its traceback is in the fcgi-manager log.</p>\n"
)


class ClientGone(Exception):
    """The web server closed the connection while we were answering (client abort)."""


class RequestAborted(ClientGone):
    """The web server sent FCGI_ABORT_REQUEST: stop the output, end the request, keep the
    connection."""


class FileWrapper:
    """``wsgi.file_wrapper``: iterate a file in blocks, close it when done."""

    __slots__ = ("filelike", "blksize", "close")

    def __init__(self, filelike: Any, blksize: int = FLUSH_AT) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        read = self.filelike.read
        size = self.blksize
        while True:
            block = read(size)
            if not block:
                return
            yield block


class ErrorStream:
    """``wsgi.errors``: lines go to the log and, capped, to FCGI_STDERR of the request.

    nginx writes FCGI_STDERR to its error log ("FastCGI sent in stderr"), so the operator
    sees app warnings where they look first; the cap keeps a chatty app from flooding it.
    """

    __slots__ = ("_log", "_partial", "_stderr", "_stderr_left")

    STDERR_CAP = 8 * 1024

    def __init__(self, log: Callable[[str], None]) -> None:
        self._log = log
        self._partial = ""
        self._stderr: List[bytes] = []
        self._stderr_left = self.STDERR_CAP

    def reset(self) -> None:
        self._partial = ""
        if self._stderr_left != self.STDERR_CAP:
            self._stderr = []
            self._stderr_left = self.STDERR_CAP

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"wsgi.errors.write() takes str, not {type(text).__name__}")
        data = self._partial + text
        lines = data.split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._emit(line)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = ""

    def _emit(self, line: str) -> None:
        self._log(line)
        if self._stderr_left > 0:
            data = (line + "\n").encode("utf-8", "replace")[: self._stderr_left]
            self._stderr_left -= len(data)
            self._stderr.append(data)

    def take_stderr(self) -> bytes:
        """What to send as FCGI_STDERR for this request (and forget it)."""
        self.flush()
        data = b"".join(self._stderr)
        self._stderr = []
        self._stderr_left = self.STDERR_CAP
        return data


def request_path(params: Dict[str, str]) -> str:
    """The decoded path of the request URI (for status/ping pages and root-mount detection)."""
    uri = params.get("DOCUMENT_URI") or params.get("REQUEST_URI", "")
    path = uri.split("?", 1)[0]
    if "%" in path:
        path = unquote(path, encoding="latin-1")
    return path


class EnvironBuilder:
    """Builds environ dicts from params, starting from a template built once per worker."""

    __slots__ = ("template", "script_name", "fix_root_url")

    def __init__(
        self,
        errors: ErrorStream,
        multiprocess: bool = True,
        script_name: Optional[str] = None,
        fix_root_url: bool = False,
    ) -> None:
        self.template = {
            "wsgi.version": (1, 0),
            "wsgi.errors": errors,
            "wsgi.multithread": False,
            "wsgi.multiprocess": multiprocess,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
            "wsgi.url_scheme": "http",
            "SCRIPT_NAME": "",
            "QUERY_STRING": "",
            "REQUEST_METHOD": "GET",
            "SERVER_PROTOCOL": "HTTP/1.0",
        }
        self.script_name = script_name.rstrip("/") if script_name is not None else None
        self.fix_root_url = fix_root_url

    def build(self, params: Dict[str, str], body: Any) -> Dict[str, Any]:
        environ = self.template.copy()
        environ.update(params)
        environ["wsgi.input"] = body
        https = params.get("HTTPS")
        if (https and https.lower() in ("on", "1", "yes")) or params.get(
            "REQUEST_SCHEME"
        ) == "https":
            environ["wsgi.url_scheme"] = "https"
        default_port = "443" if environ["wsgi.url_scheme"] == "https" else "80"
        if "SERVER_NAME" not in params:
            host = params.get("HTTP_HOST", "localhost")
            if host.startswith("["):
                name, _, port = host[1:].partition("]")
                port = port[1:]
            else:
                name, _, port = host.partition(":")
            environ["SERVER_NAME"] = name or "localhost"
            if "SERVER_PORT" not in params:
                environ["SERVER_PORT"] = port or default_port
        elif "SERVER_PORT" not in params:
            environ["SERVER_PORT"] = default_port
        if "PATH_INFO" not in params:
            self._guess_path_info(environ, params)
        if self.script_name is not None:
            sent = environ["SCRIPT_NAME"]
            prefix = self.script_name
            path = environ["PATH_INFO"]
            if not sent or sent == prefix or prefix.startswith(sent.rstrip("/") + "/"):
                path = sent + path
                if prefix and (path == prefix or path.startswith(prefix + "/")):
                    path = path[len(prefix) :]
            environ["SCRIPT_NAME"] = prefix
            environ["PATH_INFO"] = path
        elif self.fix_root_url:
            environ["PATH_INFO"] = environ["SCRIPT_NAME"] + environ["PATH_INFO"]
            environ["SCRIPT_NAME"] = ""
        cl = params.get("CONTENT_LENGTH")
        if cl is not None and not cl:
            del environ["CONTENT_LENGTH"]
        ct = params.get("CONTENT_TYPE")
        if ct is not None and not ct:
            del environ["CONTENT_TYPE"]
        return environ

    @staticmethod
    def _guess_path_info(environ: Dict[str, Any], params: Dict[str, str]) -> None:
        script = params.get("SCRIPT_NAME", "")
        path = request_path(params)
        if not script or script == path:
            # Root mount: the server put the whole path in SCRIPT_NAME, or sent neither.
            environ["SCRIPT_NAME"] = ""
            environ["PATH_INFO"] = path or script
        else:
            environ["PATH_INFO"] = ""


def status_code(status: str) -> int:
    try:
        return int(status[:3])
    except ValueError:
        return 0


class Response:
    """``start_response`` and ``write`` for one request, and the records they produce."""

    __slots__ = ("status", "headers", "headers_sent", "pending", "pending_len", "send",
                 "request_id", "check_abort")

    def __init__(self, send: Callable[[bytes], None], request_id: int,
                 check_abort: Optional[Callable[[], bool]] = None) -> None:
        self.status: Optional[str] = None
        self.headers: List[Tuple[str, str]] = []
        self.headers_sent = False
        self.pending: List[bytes] = []
        self.pending_len = 0
        self.send = send
        self.request_id = request_id
        self.check_abort = check_abort

    def start_response(self, status: str, headers: List[Tuple[str, str]], exc_info: Any = None):
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called twice without exc_info")
        if type(status) is not str:
            raise TypeError(f"status must be str, not {type(status).__name__}")
        if len(status) < 4 or status[3] != " " or not status[:3].isdigit():
            raise ValueError(f"status must look like '200 OK', got {status!r}")
        for header in headers:
            if type(header) is not tuple or len(header) != 2:
                raise TypeError(f"headers must be (name, value) tuples, got {header!r}")
            name, value = header
            if type(name) is not str or type(value) is not str:
                raise TypeError(f"header name and value must be str: {header!r}")
            if "\n" in value or "\r" in value or "\n" in name or ":" in name:
                raise ValueError(f"header contains a newline or a bad name: {header!r}")
        self.status = status
        self.headers = headers
        return self.write

    def _head(self) -> bytes:
        lines = ["Status: ", self.status, "\r\n"]  # type: ignore[list-item]
        for name, value in self.headers:
            lines += (name, ": ", value, "\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def _stdout(self, data: bytes) -> None:
        """Queue ``data`` as STDOUT records (never an empty one)."""
        n = len(data)
        if n <= _MAX:
            self.pending.append(_HEADER.pack(_VERSION, _STDOUT, self.request_id, n, 0))
            self.pending.append(data)
        else:
            self.pending.append(protocol.encode_stream(_STDOUT, self.request_id, data))
        self.pending_len += n

    def write(self, data: bytes) -> None:
        """The legacy ``write()`` callable, also used for each item the app yields."""
        if type(data) is not bytes:
            if isinstance(data, (bytearray, memoryview)):
                data = bytes(data)
            else:
                raise TypeError(f"the app must produce bytes, not {type(data).__name__}")
        if not self.headers_sent:
            if self.status is None:
                raise AssertionError("the app wrote body data before calling start_response()")
            self.headers_sent = True
            data = self._head() + data
        elif not data:
            return
        self._stdout(data)
        if self.pending_len >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Send what is pending (a streamed or large response, 64 KiB at a time).

        Before each flush -- never on the one-send path of small responses -- the web
        server's side is checked for FCGI_ABORT_REQUEST, so an aborted download stops.
        """
        if self.check_abort is not None and self.check_abort():
            raise RequestAborted("the web server aborted the request (FCGI_ABORT_REQUEST)")
        if self.pending:
            out = b"".join(self.pending)
            self.pending = []
            self.pending_len = 0
            self.send(out)

    def finish(self, stderr: bytes = b"", app_status: int = 0) -> None:
        """Send what is pending, FCGI_STDERR if any, then the empty STDOUT and END_REQUEST."""
        if not self.headers_sent:
            if self.status is None:
                raise AssertionError("the app returned without calling start_response()")
            self.write(b"")
        if stderr:
            self.pending.append(protocol.encode_stream(_STDERR, self.request_id, stderr))
            self.pending.append(protocol.encode_record(_STDERR, self.request_id))
        if self.request_id == 1 and not app_status:
            self.pending.append(protocol.END_OF_REQUEST_1)
        else:
            self.pending.append(protocol.end_of_request(self.request_id, app_status))
        out = b"".join(self.pending)
        self.pending = []
        self.pending_len = 0
        self.send(out)


def simple_response(
    send: Callable[[bytes], None],
    request_id: int,
    status: str,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    extra: Iterable[Tuple[str, str]] = (),
    stderr: bytes = b"",
) -> None:
    """A response made by the worker itself (errors, status page, ping, shedding)."""
    resp = Response(send, request_id)
    resp.start_response(
        status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *extra]
    )
    resp.write(body)
    resp.finish(stderr)


def run_app(
    app: Callable,
    environ: Dict[str, Any],
    send: Callable[[bytes], None],
    request_id: int,
    errors: ErrorStream,
    log_exception: Callable[[str, str], None],
    check_abort: Optional[Callable[[], bool]] = None,
) -> int:
    """Call the app for one request and send its response; return the HTTP status code.

    The app's exceptions never escape: before the headers went out they become a 500, after
    they end the response early; both are logged with the traceback. ``close()`` on the
    app's iterable is always called. :class:`ClientGone` escapes (the caller logs it once).
    """
    resp = Response(send, request_id, check_abort)
    result = None
    try:
        result = app(environ, resp.start_response)
        write = resp.write
        if type(result) is list and len(result) == 1 and not resp.headers_sent:
            write(result[0])  # the common case: one body string
        else:
            for data in result:
                write(data)
    except ClientGone:
        _close(result, errors, log_exception)
        raise
    except Exception:
        exc_type, exc, _ = sys.exc_info()
        text = traceback.format_exc()
        summary = f"{exc_type.__name__}: {exc}" if exc_type else "error"
        _close(result, errors, log_exception)
        result = None
        log_exception(f"the app raised {summary} for {_describe(environ)}", text)
        stderr = (f"fcgi-manager: app raised {summary}; traceback in the fcgi-manager log\n"
                  ).encode("utf-8", "replace")[:2048]
        if resp.headers_sent:
            # Too late for a 500: end the response early so the server sees it cut short.
            resp.pending.append(protocol.encode_stream(_STDERR, request_id, stderr))
            resp.pending.append(protocol.end_of_request(request_id, 1))
            resp.flush()
            errors.reset()
            return 500
        resp.pending = []
        resp.pending_len = 0
        simple_response(send, request_id, "500 Internal Server Error", INTERNAL_ERROR_BODY,
                        "text/html; charset=utf-8", stderr=errors.take_stderr() + stderr)
        return 500
    if result is not None and hasattr(result, "close"):
        if not _close(result, errors, log_exception):
            resp.pending = []
            resp.pending_len = 0
            if not resp.headers_sent:
                simple_response(send, request_id, "500 Internal Server Error",
                                INTERNAL_ERROR_BODY, "text/html; charset=utf-8")
                return 500
    try:
        resp.finish(errors.take_stderr() if errors._stderr or errors._partial else b"")
    except (AssertionError, TypeError, ValueError):
        text = traceback.format_exc()
        log_exception(f"the app returned a bad response for {_describe(environ)}", text)
        resp.pending = []
        simple_response(send, request_id, "500 Internal Server Error", INTERNAL_ERROR_BODY,
                        "text/html; charset=utf-8")
        return 500
    return status_code(resp.status or "")


def _close(result: Any, errors: ErrorStream, log_exception: Callable[[str, str], None]) -> bool:
    """Call the iterable's ``close()`` (PEP 3333 requires it); False if it raised."""
    close = getattr(result, "close", None)
    if close is None:
        return True
    try:
        close()
        return True
    except ClientGone:
        raise
    except Exception:
        log_exception("the app's close() raised", traceback.format_exc())
        return False


def _describe(environ: Dict[str, Any]) -> str:
    uri = environ.get("REQUEST_URI") or environ.get("PATH_INFO", "")
    return f"{environ.get('REQUEST_METHOD', '?')} {uri}"


class BodyBuffer:
    """Collects the request body: in memory up to a limit, then in a temporary file.

    Bodies are read whole before the app runs, so the connection is always in a known
    state for the next request (keep-conn) and the app gets a seekable ``wsgi.input``;
    large uploads go to disk, so a worker's memory stays flat whatever the size.
    """

    __slots__ = ("limit", "_mem", "_file", "size")

    def __init__(self, limit: int, expected: int = 0) -> None:
        self.limit = limit
        self._mem: Optional[List[bytes]] = []
        self._file: Any = None
        self.size = 0
        if expected > limit:
            self._spill()

    def _spill(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="fcgi-manager-body-")
        if self._mem:
            self._file.writelines(self._mem)
        self._mem = None

    def append(self, data: bytes) -> None:
        self.size += len(data)
        if self._mem is not None:
            self._mem.append(data)
            if self.size > self.limit:
                self._spill()
        else:
            self._file.write(data)

    def stream(self) -> Any:
        if self._mem is not None:
            if not self._mem:
                return io.BytesIO()
            return io.BytesIO(self._mem[0] if len(self._mem) == 1 else b"".join(self._mem))
        self._file.seek(0)
        return self._file
