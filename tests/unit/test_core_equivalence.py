"""The compiled request core and the pure one are the same program: for any input, the
same records, events, params, environ and response bytes, and the same errors.

Both run in this process: the compiled modules as imported, the pure ones loaded from
their source under private names (``compiled.load_pure``). Skipped where the compiled
core is not built or not in use (``FCGI_MANAGER_PURE=1``): CI builds it.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import describe_event

from fcgi_manager import compiled
from fcgi_manager.wire import protocol as cp
from fcgi_manager.worker import wsgi as cw

if compiled.core() != "compiled":
    if os.environ.get("CI") == "true" and not os.environ.get("FCGI_MANAGER_PURE"):
        pytest.fail(f"CI=true builds the compiled core, but it does not run here "
                    f"({compiled.reason()})", pytrace=False)
    pytest.skip(f"the compiled core does not run here ({compiled.reason()})",
                allow_module_level=True)

PURE = compiled.load_pure()
pp = PURE["protocol"]
pw = PURE["wsgi"]

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

LATIN1 = st.characters(min_codepoint=0, max_codepoint=255)
texts = st.one_of(st.text(LATIN1, max_size=40),
                  st.builds(lambda s, n: s * n, st.text(LATIN1, min_size=1, max_size=4),
                            st.integers(30, 400)))
param_dicts = st.dictionaries(st.text(LATIN1, min_size=1, max_size=30), texts, max_size=30)
cuts = st.lists(st.integers(min_value=0, max_value=1 << 18), max_size=12)


def test_the_two_cores_are_different_modules() -> None:
    assert not (cp.__file__ or "").endswith(".py")
    assert (pp.__file__ or "").endswith(".py") and (pw.__file__ or "").endswith(".py")
    assert pw.protocol is pp  # the pure wsgi runs on the pure protocol


def _split(data: bytes, points: List[int]) -> List[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(marks, marks[1:])]


def _events(module: Any, chunks: List[bytes], **limits: int) -> List[Any]:
    """Everything a ServerConnection makes of ``chunks``; an error ends the list."""
    conn = module.ServerConnection(**limits)
    out: List[Any] = []
    try:
        for chunk in chunks:
            for ev in conn.feed(chunk):
                desc = describe_event(ev)
                out.append(tuple(bytes(v) if isinstance(v, memoryview) else v for v in desc))
                if type(ev).__name__ == "StdinEnd":
                    conn.request_done()
    except Exception as exc:  # the error is part of the behaviour compared
        out.append(("raised", type(exc).__name__, str(exc)))
    return out


@SETTINGS
@given(params=param_dicts, body=st.binary(max_size=70000), keep=st.booleans(),
       rid=st.integers(1, 0xFFFF), points=cuts)
def test_same_records_and_events_for_any_request(params: Dict[str, str], body: bytes,
                                                 keep: bool, rid: int,
                                                 points: List[int]) -> None:
    raw = pp.encode_request(params, body, rid, keep)
    assert cp.encode_request(params, body, rid, keep) == raw
    chunks = _split(raw, points)
    assert _events(cp, chunks) == _events(pp, chunks)
    assert cp.decode_pairs(pp.encode_pairs(params.items())) == params


@SETTINGS
@given(data=st.binary(max_size=600), points=cuts, max_params=st.integers(0, 300),
       max_buffer=st.integers(0, 300))
def test_same_events_or_errors_for_any_bytes(data: bytes, points: List[int], max_params: int,
                                             max_buffer: int) -> None:
    chunks = _split(data, points)
    assert _events(cp, chunks) == _events(pp, chunks)
    limits = {"max_params": max_params, "max_buffer": max_buffer}
    assert _events(cp, chunks, **limits) == _events(pp, chunks, **limits)


def _decoded(module: Any, data: bytes) -> Any:
    try:
        return module.decode_pairs(data)
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


@SETTINGS
@given(data=st.binary(max_size=300))
def test_same_params_or_error_for_any_pair_stream(data: bytes) -> None:
    assert _decoded(cp, data) == _decoded(pp, data)
    assert _decoded(cp, bytearray(data)) == _decoded(pp, bytearray(data))


# -- environ ------------------------------------------------------------------------------

PATHISH = st.text(st.sampled_from("/ab?%2F:*.x"), max_size=12)
HOSTISH = st.text(st.sampled_from("ab.[]:19"), max_size=10)
ENVIRON_KEYS: Dict[str, Any] = {
    "REQUEST_METHOD": st.sampled_from(["GET", "POST", ""]),
    "SERVER_PROTOCOL": st.sampled_from(["HTTP/1.1", ""]),
    "REQUEST_URI": st.one_of(PATHISH, st.sampled_from(["*", "http://h:8/p?q", "https://h"])),
    "DOCUMENT_URI": PATHISH,
    "SCRIPT_NAME": PATHISH,
    "PATH_INFO": PATHISH,
    "QUERY_STRING": st.text(max_size=5),
    "SERVER_NAME": HOSTISH,
    "SERVER_PORT": st.sampled_from(["80", "8080", "", "x1"]),
    "HTTP_HOST": HOSTISH,
    "HTTPS": st.sampled_from(["on", "1", "off", ""]),
    "REQUEST_SCHEME": st.sampled_from(["http", "https"]),
    "CONTENT_LENGTH": st.sampled_from(["", "12", "x", "٣"]),
    "CONTENT_TYPE": st.sampled_from(["", "text/plain"]),
}
environ_params = st.fixed_dictionaries({}, optional=ENVIRON_KEYS)


def _environ(module: Any, params: Dict[str, str], script_name: Optional[str],
             fix_root_url: bool) -> Any:
    errors = module.ErrorStream(lambda line: None)
    builder = module.EnvironBuilder(errors, True, script_name, fix_root_url)
    try:
        env = builder.build(dict(params), None)
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))
    # The objects the environ carries are each core's own; compare their kind only.
    return {k: (type(v).__name__ if k in ("wsgi.errors", "wsgi.file_wrapper") else v)
            for k, v in env.items()}


@SETTINGS
@given(params=environ_params, script_name=st.one_of(st.none(), PATHISH),
       fix_root_url=st.booleans())
def test_same_environ_for_any_params(params: Dict[str, str], script_name: Optional[str],
                                     fix_root_url: bool) -> None:
    assert _environ(cw, params, script_name, fix_root_url) == \
        _environ(pw, params, script_name, fix_root_url)
    assert cw.request_path(params) == pw.request_path(params)
    assert cw.content_length(params) == pw.content_length(params)


# -- the response -------------------------------------------------------------------------

statuses = st.one_of(st.sampled_from(["200 OK", "404 Not Found", "500 Oops", "200", "099 X",
                                      "200 \r\nX: y", "200 Caf\u00e9", "200 \u20ac"]),
                     st.binary(max_size=3), st.none())
header_names = st.one_of(st.sampled_from(["Content-Type", "X-A", "Status", "Bad Name", "É"]),
                         st.integers(0, 3))
header_values = st.one_of(st.sampled_from(["text/plain", "a\tb", "x\ny", "\u20ac", ""]),
                          st.binary(max_size=2))
header_lists = st.one_of(st.lists(st.tuples(header_names, header_values), max_size=4),
                         st.lists(st.tuples(header_names, header_values), max_size=3).map(tuple),
                         st.sampled_from([None, "x", [("A",)], [["A", "b"]]]))
blocks = st.lists(st.one_of(st.binary(max_size=40), st.binary(min_size=70000, max_size=70001),
                            st.sampled_from(["text", 3, None])), max_size=4)


def _make_app(status: Any, headers: Any, body: List[Any], shape: str,
              raise_at: Optional[int]) -> Callable[..., Any]:
    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        write = start_response(status, headers)
        if shape == "write":
            for i, block in enumerate(body):
                if raise_at == i:
                    raise RuntimeError("boom")
                write(block)
            return []
        if shape == "list":
            if raise_at is not None:
                raise RuntimeError("boom")
            return list(body)

        def gen() -> Any:
            for i, block in enumerate(body):
                if raise_at == i:
                    raise RuntimeError("boom")
                yield block
        return gen()
    return app


def _respond(module: Any, app: Callable[..., Any], rid: int) -> Tuple[Any, ...]:
    sent: List[bytes] = []
    logged: List[str] = []
    errors = module.ErrorStream(lambda line: None)
    environ = module.EnvironBuilder(errors).build({"REQUEST_URI": "/x"}, None)
    code = module.run_app(app, environ, sent.append, rid, errors,
                          lambda summary, text: logged.append(summary))
    return code, b"".join(sent), logged


@SETTINGS
@given(status=statuses, headers=header_lists, body=blocks,
       shape=st.sampled_from(["list", "gen", "write"]),
       raise_at=st.one_of(st.none(), st.integers(0, 3)), rid=st.integers(1, 3))
def test_same_response_bytes_for_any_app(status: Any, headers: Any, body: List[Any],
                                         shape: str, raise_at: Optional[int],
                                         rid: int) -> None:
    app = _make_app(status, headers, body, shape, raise_at)
    assert _respond(cw, app, rid) == _respond(pw, app, rid)
