"""The WSGI side of a request (PEP 3333): environ from FastCGI params, the app's output
as STDOUT records.

This module knows WSGI and the FastCGI record format, and nothing of sockets: the worker
hands :func:`run_app` a ``send(bytes)`` callable.

Output follows PEP 3333's "must not delay the transmission of any block": every block an
app's iterable yields, and every ``write()``, is sent before the app is asked for the next
one, so a progress page or server-sent events reach a front end with buffering off as they
are produced. Only what is already there is coalesced: a list or tuple (the usual
``return [body]``) is gathered with its END_REQUEST into one ``send`` (64 KiB at a time when
large), so the common response costs one write. Headers go out with the first non-empty
block, which leaves ``start_response(..., exc_info)`` free to replace them until then.

What the app sends is checked before it reaches the front end: a status line that is not
``NNN Reason``, a header name that is not an HTTP token, a value with CR/LF or other control
characters or outside latin-1 -- any of them is a 500 with a logged traceback, never a forged
header or a response the front end cannot parse. So is ``SystemExit`` from the app: the
worker lives on.

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

When the path is read from REQUEST_URI, every request-target form of RFC 9112 §3.2 is
understood: origin-form (``/path?query``), absolute-form (``http://host/path?query``, which
an HTTP/1.1 server must accept and a raw FastCGI client may pass through) and asterisk-form
(``OPTIONS *``, read as an empty PATH_INFO: the server as a whole). The query string is never
part of PATH_INFO.
"""

from __future__ import annotations

import io
import re
import sys
import tempfile
import traceback
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)
from urllib.parse import unquote

from ..escaping import escape
from ..wire import protocol

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

    def __iter__(self) -> Iterator[bytes]:
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

    STDERR_CAP: ClassVar[int] = 8 * 1024

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

    def write(self, text: object) -> int:
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


# "scheme://authority" at the start of an absolute-form request target (RFC 3986 §3).
_SCHEME_AUTHORITY = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def target_path(target: str) -> str:
    """The path of a request target, undecoded and without its query.

    Origin-form gives its path; absolute-form drops ``scheme://authority`` (``/`` if no
    path follows); asterisk-form (``*``) gives "" -- the validator and every framework
    want PATH_INFO empty or starting with "/", and "" routes to the root, where ``OPTIONS``
    is answered for the whole app; REQUEST_URI still says ``*``.
    """
    path = target.split("?", 1)[0]
    if path[:1] == "/" or not path:
        return path
    if path == "*":
        return ""
    match = _SCHEME_AUTHORITY.match(path)
    if match is not None:
        return path[match.end():] or "/"
    return path


def request_path(params: Dict[str, str]) -> str:
    """The decoded path of the request URI (for status/ping pages and root-mount detection)."""
    uri = params.get("DOCUMENT_URI") or params.get("REQUEST_URI", "")
    path = target_path(uri)
    if "%" in path:
        path = unquote(path, encoding="latin-1")
    return path


def _split_host(host: str) -> Tuple[str, str]:
    """``name[:port]`` or ``[v6]:port`` into (name, port); a bare IPv6 address has no port."""
    if host.startswith("["):
        name, _, port = host[1:].partition("]")
        return name, port[1:]
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name, port
    return host, ""


def content_length(params: Dict[str, str]) -> Optional[int]:
    """CONTENT_LENGTH as an integer; None when absent, empty or not a plain decimal."""
    value = params.get("CONTENT_LENGTH")
    if value and value.isdigit() and value.isascii():
        return int(value)
    return None


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
        self.template: Dict[str, Any] = {
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
            "GATEWAY_INTERFACE": "CGI/1.1",
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
        port = params.get("SERVER_PORT")
        name = params.get("SERVER_NAME")
        if not port or not name or not port.isdigit() or ":" in name:
            self._server_address(environ, params)
        if "QUERY_STRING" not in params or not environ["REQUEST_METHOD"] or \
                not environ["SERVER_PROTOCOL"]:
            self._fill_request_line(environ, params)
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
        script = environ["SCRIPT_NAME"]
        path = environ["PATH_INFO"]
        if (script and (script[0] != "/" or script[-1] == "/")) or (path and path[0] != "/"):
            _normalize_split(environ, script, path)
        cl = params.get("CONTENT_LENGTH")
        if cl is not None and not (cl.isdigit() and cl.isascii()):
            # Empty (nginx for a GET) or not a number: absent, as gunicorn does.
            del environ["CONTENT_LENGTH"]
        ct = params.get("CONTENT_TYPE")
        if ct is not None and not ct:
            del environ["CONTENT_TYPE"]
        return environ

    @staticmethod
    def _server_address(environ: Dict[str, Any], params: Dict[str, str]) -> None:
        """SERVER_NAME and SERVER_PORT when the front end sent them incomplete.

        A port inside SERVER_NAME (some front ends pass the Host header there) is split
        off; a missing name comes from HTTP_HOST; a missing port from SERVER_NAME, then
        HTTP_HOST, then the scheme's default. The FastCGI socket's own port is never used:
        it is the front end's hop to us, and URLs built from it would point there.
        """
        sent_name = params.get("SERVER_NAME") or ""
        host = params.get("HTTP_HOST") or ""
        sent_port = params.get("SERVER_PORT") or ""
        if not sent_name and sent_port.isdigit() and host[:1] != "[":
            # The common case (nginx with no server_name sends it empty): the name from
            # the Host header, the port as sent -- what the general path below gives.
            environ["SERVER_NAME"] = (host.partition(":")[0] if host.count(":") == 1
                                      else host) or "localhost"
            environ["SERVER_PORT"] = sent_port
            return
        name, port = _split_host(sent_name)
        host_name, host_port = _split_host(host)
        if not sent_port.isdigit():
            sent_port = ""
        default = "443" if environ["wsgi.url_scheme"] == "https" else "80"
        environ["SERVER_NAME"] = name or host_name or "localhost"
        candidates = (sent_port, port, host_port, default)
        environ["SERVER_PORT"] = next(p for p in candidates if p and p.isdigit())

    @staticmethod
    def _fill_request_line(environ: Dict[str, Any], params: Dict[str, str]) -> None:
        """REQUEST_METHOD, SERVER_PROTOCOL and QUERY_STRING a front end left out or empty."""
        if not environ["REQUEST_METHOD"]:
            environ["REQUEST_METHOD"] = "GET"
        if not environ["SERVER_PROTOCOL"]:
            environ["SERVER_PROTOCOL"] = "HTTP/1.0"
        if "QUERY_STRING" not in params:
            environ["QUERY_STRING"] = params.get("REQUEST_URI", "").partition("?")[2]

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


def _normalize_split(environ: Dict[str, Any], script: str, path: str) -> None:
    """PEP 3333's shape for a split a front end sent oddly: SCRIPT_NAME empty or starting
    with "/" and never ending with one, PATH_INFO empty or starting with "/" (the full
    path SCRIPT_NAME + PATH_INFO is unchanged, but for a doubled slash)."""
    if script and script[0] != "/":
        script = "/" + script if script != "*" else ""
    if script[-1:] == "/":
        script = script.rstrip("/")
        if path[:1] != "/":
            path = "/" + path
    if path and path[0] != "/":
        path = "/" + path
    environ["SCRIPT_NAME"] = script
    environ["PATH_INFO"] = path


def status_code(status: str) -> int:
    try:
        return int(status[:3])
    except ValueError:
        return 0


# A valid CGI response head: "Status: NNN Reason", header names that are HTTP tokens
# (RFC 9110 §5.6.2) and not "Status", values and reason without control characters (a
# horizontal tab is allowed), all of it latin-1 -- so no CR/LF can start a line of the app's
# choosing. Names are checked once per distinct name (apps reuse a few); values with
# str.isprintable(), falling back to a regular expression for tabs and non-ASCII.
_GOOD_NAMES: Set[str] = set()
_GOOD_NAMES_MAX = 1024
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _bad_head(status: Any, headers: Any) -> Exception:
    """Say precisely what is wrong with a status and headers that failed the check."""
    if type(status) is not str:
        return TypeError(f"status must be str, not {type(status).__name__}")
    if len(status) < 4 or status[3] != " " or not status[:3].isdecimal() or status[0] == "0" \
            or _BAD_VALUE.search(status):
        return ValueError(f"status must be 'NNN Reason' without control characters, "
                          f"got {status!r}")
    try:
        status.encode("latin-1")
    except UnicodeEncodeError:
        return ValueError(f"status must be latin-1, got {status!r}")
    if type(headers) is not list and type(headers) is not tuple:
        return TypeError(f"headers must be a list, not {type(headers).__name__}")
    for header in headers:
        if type(header) is not tuple or len(header) != 2:
            return TypeError(f"headers must be (name, value) tuples, got {header!r}")
        name, value = header
        if type(name) is not str or type(value) is not str:
            return TypeError(f"header name and value must be str: {header!r}")
        if not _TOKEN.match(name):
            return ValueError(f"header name is not an HTTP token: {name!r}")
        if name.lower() == "status":
            return ValueError("a 'Status' header conflicts with the CGI status line; "
                              "give the status to start_response()")
        if _BAD_VALUE.search(value):
            return ValueError(f"header value contains CR, LF or a control character: "
                              f"{header!r}")
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            return ValueError(f"header value is not latin-1 (encode it, RFC 8187): {header!r}")
    return ValueError(f"bad status or headers: {status!r} {headers!r}")


def _good_name(name: Any) -> bool:
    """Is ``name`` a header name we may send? Remembered, since apps reuse a few names."""
    if type(name) is not str or not _TOKEN.match(name) or name.lower() == "status":
        return False
    if len(_GOOD_NAMES) < _GOOD_NAMES_MAX:
        _GOOD_NAMES.add(name)
    return True


def response_head(status: Any, headers: Any) -> bytes:
    """The CGI response head for ``status`` and ``headers``; ValueError or TypeError
    saying what is wrong when they would not make a valid one.

    The common case costs a few string predicates per header, one join and one encode.
    """
    try:
        if status[3] == " " and status[:3].isdecimal() and status[0] != "0" and \
                (status.isprintable() or not _BAD_VALUE.search(status)) and \
                (type(headers) is list or type(headers) is tuple):
            parts = ["Status: ", status, "\r\n"]
            for header in headers:
                name, value = header
                if type(header) is not tuple or (
                        name not in _GOOD_NAMES and not _good_name(name)) or not (
                        value.isprintable() or not _BAD_VALUE.search(value)):
                    break
                parts += (name, ": ", value, "\r\n")
            else:
                parts.append("\r\n")
                return "".join(parts).encode("latin-1")
    except (TypeError, ValueError, AttributeError, IndexError):
        pass
    raise _bad_head(status, headers)


class Response:
    """``start_response`` and ``write`` for one request, and the records they produce.

    ``add`` queues a block; ``flush`` sends what is queued. ``sent`` says whether anything
    went out: until then an error can still become a clean 500.
    """

    __slots__ = ("status", "headers", "head", "headers_sent", "pending", "pending_len",
                 "send", "request_id", "check_abort", "sent", "unchecked")

    def __init__(self, send: Callable[[bytes], None], request_id: int,
                 check_abort: Optional[Callable[[], bool]] = None) -> None:
        self.status: Optional[str] = None
        self.headers: Sequence[Tuple[str, str]] = []
        self.head = b""
        self.headers_sent = False
        self.pending: List[bytes] = []
        self.pending_len = 0
        self.send = send
        self.request_id = request_id
        self.check_abort = check_abort
        self.sent = False
        self.unchecked = 0

    def start_response(self, status: Any, headers: Any,
                       exc_info: Any = None) -> Callable[[Any], None]:
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called twice without exc_info")
        self.head = response_head(status, headers)
        self.status = status
        self.headers = headers
        return self.write

    def add(self, data: Any) -> None:
        """Queue a block of body; the headers go with the first non-empty one."""
        if type(data) is not bytes:
            if isinstance(data, (bytearray, memoryview)):
                data = bytes(data)
            else:
                raise TypeError(f"the app must produce bytes, not {type(data).__name__}")
        if not data:
            return
        if not self.headers_sent:
            if self.status is None:
                raise AssertionError("the app wrote body data before calling start_response()")
            self.headers_sent = True
            head = self.head
            n = len(head) + len(data)
            if n <= _MAX:  # head and body in one record, without copying the body here
                self.pending += (_HEADER.pack(_VERSION, _STDOUT, self.request_id, n, 0),
                                 head, data)
                self.pending_len += n
                return
            data = head + data
        n = len(data)
        if n <= _MAX:
            self.pending.append(_HEADER.pack(_VERSION, _STDOUT, self.request_id, n, 0))
            self.pending.append(data)
        else:
            self.pending.append(protocol.encode_stream(_STDOUT, self.request_id, data))
        self.pending_len += n

    def write(self, data: Any) -> None:
        """The legacy ``write()`` callable: the bytes are sent before it returns."""
        self.add(data)
        if self.pending:
            self.flush()

    def flush(self) -> None:
        """Send what is queued.

        Once per 64 KiB sent -- never on the one-send path of a small response -- the web
        server's side is checked for FCGI_ABORT_REQUEST, so an aborted download stops.
        """
        if self.check_abort is not None:
            self.unchecked += self.pending_len
            if self.unchecked >= FLUSH_AT:
                self.unchecked = 0
                if self.check_abort():
                    raise RequestAborted(
                        "the web server aborted the request (FCGI_ABORT_REQUEST)")
        if self.pending:
            out = b"".join(self.pending)
            self.pending = []
            self.pending_len = 0
            self.sent = True
            self.send(out)

    def discard(self) -> None:
        """Forget what is queued and not sent (an error turns the response into a 500)."""
        self.pending = []
        self.pending_len = 0

    def finish(self, stderr: bytes = b"", app_status: int = 0) -> None:
        """Send what is pending, FCGI_STDERR if any, then the empty STDOUT and END_REQUEST."""
        if not self.headers_sent:
            if self.status is None:
                raise AssertionError("the app returned without calling start_response()")
            self.headers_sent = True
            self.pending.append(protocol.encode_stream(_STDOUT, self.request_id, self.head))
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
        self.sent = True
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
    resp.add(body)
    resp.finish(stderr)


def _send_body(resp: Response, result: Any) -> None:
    """Send the app's iterable: every block before the next is asked for.

    A list or tuple is already complete, so its blocks are coalesced (one send with the
    END_REQUEST for a small response, 64 KiB at a time otherwise). Any other iterable may
    take its time to produce the next block (a generator sleeping between server-sent
    events): each block leaves at once -- except the block that completes a declared
    Content-Length. Nothing may follow it, so it waits for the iterable to end and leaves
    with the END_REQUEST: a client that has its whole body would otherwise close at once,
    and nginx, seeing that, drops the FastCGI connection before END_REQUEST arrives (no
    keep-conn reuse, a "client abort" for every Flask or Django response).
    """
    add = resp.add
    kind = type(result)
    if kind is list or kind is tuple:
        if len(result) == 1:
            add(result[0])  # the common case: one body string
            if resp.pending_len >= FLUSH_AT:
                resp.flush()
            return
        for data in result:
            add(data)
            if resp.pending_len >= FLUSH_AT:
                resp.flush()
        return
    left = None
    for data in result:
        add(data)
        if not resp.pending:
            continue
        if left is None:
            left = declared_length(resp.headers)
        if left >= 0:
            left -= len(data)
            if left <= 0 and resp.pending_len < FLUSH_AT:
                continue  # the body is complete: it goes with END_REQUEST
        resp.flush()


def declared_length(headers: Sequence[Tuple[str, str]]) -> int:
    """The Content-Length the app declared, or -1."""
    for name, value in headers:
        if len(name) == 14 and name.lower() == "content-length":
            return int(value) if value.isdigit() and value.isascii() else -1
    return -1


def run_app(
    app: Callable[..., Any],
    environ: Dict[str, Any],
    send: Callable[[bytes], None],
    request_id: int,
    errors: ErrorStream,
    log_exception: Callable[[str, str], None],
    check_abort: Optional[Callable[[], bool]] = None,
) -> int:
    """Call the app for one request and send its response; return the HTTP status code.

    The app's exceptions never escape, ``SystemExit`` included (``sys.exit()`` in a view
    must not end the worker): before anything was sent they become a 500, after they end
    the response early; both are logged with the traceback. ``close()`` on the app's
    iterable is always called. :class:`ClientGone` escapes (the caller logs it once).
    """
    resp = Response(send, request_id, check_abort)
    result = None
    try:
        result = app(environ, resp.start_response)
        _send_body(resp, result)
    except ClientGone:
        _close(result, errors, log_exception)
        raise
    except (Exception, SystemExit):
        return _failed(resp, result, environ, errors, log_exception)
    if result is not None and hasattr(result, "close"):
        if not _close(result, errors, log_exception):
            resp.discard()
            if not resp.sent:
                simple_response(send, request_id, "500 Internal Server Error",
                                INTERNAL_ERROR_BODY, "text/html; charset=utf-8")
                return 500
    try:
        resp.finish(errors.take_stderr() if errors._stderr or errors._partial else b"")
    except (AssertionError, TypeError, ValueError):
        text = traceback.format_exc()
        log_exception(f"the app returned a bad response for {_describe(environ)}", text)
        resp.discard()
        simple_response(send, request_id, "500 Internal Server Error", INTERNAL_ERROR_BODY,
                        "text/html; charset=utf-8")
        return 500
    return status_code(resp.status or "")


def _failed(resp: Response, result: Any, environ: Dict[str, Any], errors: ErrorStream,
            log_exception: Callable[[str, str], None]) -> int:
    """The app (or its iterable) raised: log it, close the iterable, answer what we can."""
    exc_type, exc, _ = sys.exc_info()
    text = traceback.format_exc()
    summary = escape(f"{exc_type.__name__}: {exc}") if exc_type else "error"
    _close(result, errors, log_exception)
    log_exception(f"the app raised {summary} for {_describe(environ)}", text)
    stderr = (f"fcgi-manager: app raised {summary}; traceback in the fcgi-manager log\n"
              ).encode("utf-8", "replace")[:2048]
    request_id = resp.request_id
    resp.discard()
    if resp.sent:
        # Too late for a 500: end the response early so the server sees it cut short.
        errors.reset()
        resp.send(protocol.encode_stream(_STDERR, request_id, stderr)
                  + protocol.end_of_request(request_id, 1))
        return 500
    simple_response(resp.send, request_id, "500 Internal Server Error", INTERNAL_ERROR_BODY,
                    "text/html; charset=utf-8", stderr=errors.take_stderr() + stderr)
    return 500


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
    except (Exception, SystemExit):
        log_exception("the app's close() raised", traceback.format_exc())
        return False


def _describe(environ: Dict[str, Any]) -> str:
    """The request in a log line, escaped: a CR LF in the URI must not start a line."""
    uri = environ.get("REQUEST_URI") or environ.get("PATH_INFO", "")
    return escape(f"{environ.get('REQUEST_METHOD', '?')} {uri}")


class BodyBuffer:
    """Collects the request body: in memory up to a limit, then in a temporary file.

    Bodies are read whole before the app runs, so the connection is always in a known
    state for the next request (keep-conn) and the app gets a seekable ``wsgi.input``;
    large uploads go to disk, so a worker's memory stays flat whatever the size.

    ``keep`` is CONTENT_LENGTH when the front end sent one: bytes past it are read (the
    connection must stay in step) but never stored, so ``wsgi.input`` cannot return more
    than CONTENT_LENGTH says. ``max_body`` (``workers.max_body``, 0 = none): a body that
    announces or brings more is ``too_large``; from then on nothing is stored, and the
    worker answers 413 without calling the app.
    """

    __slots__ = ("limit", "_mem", "_file", "size", "_room", "max_body", "too_large")

    def __init__(self, limit: int, expected: int = 0, keep: int = -1,
                 max_body: int = 0) -> None:
        self.limit = limit
        self._mem: Optional[List[Union[bytes, memoryview]]] = []
        self._file: Any = None
        self.size = 0  # bytes received
        self._room = keep  # bytes still to store; -1 = all of them
        self.max_body = max_body
        self.too_large = False
        if max_body and expected > max_body:
            self._refuse()
        elif expected > limit:
            self._spill()

    def _spill(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="fcgi-manager-body-")
        if self._mem:
            self._file.writelines(self._mem)
        self._mem = None

    def _refuse(self) -> None:
        """Past ``max_body``: drop what was stored and store nothing more."""
        self.too_large = True
        self._room = 0
        self._mem = []
        if self._file is not None:
            self._file.close()
            self._file = None

    def append(self, data: Union[bytes, memoryview]) -> None:
        n = len(data)
        self.size += n
        room = self._room
        if room >= 0:
            if n > room:
                if self.max_body and self.size > self.max_body and not self.too_large:
                    self._refuse()
                    return
                if not room:
                    return
                data = data[:room]
                n = room
            self._room = room - n
        elif self.max_body and self.size > self.max_body:
            self._refuse()
            return
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


def new_body(params: Dict[str, str], in_memory: int, max_body: int = 0) -> BodyBuffer:
    """The :class:`BodyBuffer` for a request with these params."""
    length = content_length(params)
    if length is None:
        return BodyBuffer(in_memory, 0, -1, max_body)
    return BodyBuffer(in_memory, length, length, max_body)
