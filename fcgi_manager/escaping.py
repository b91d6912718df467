"""The one escape for untrusted text shown to operators: request data and app output.

Everything a client or the app controls (method, URI, headers, the app's prints, the
strings a worker writes into the scoreboard) reaches log lines, the JSON access log and
the screen (``status``, ``status --watch``) through :func:`escape`. It turns every code
point that does not print into a visible escape, so such text can neither start a forged
line (CR, LF, U+2028), nor drive the terminal that shows it (ESC, and the C1 controls
such as U+009B CSI, which some terminals obey as ESC ``[``), nor hide itself (U+200E,
U+202E)::

    \\n \\r \\t        line feed, carriage return, tab
    \\xHH           other C0 controls, DEL, the C1 controls (0x80-0x9F), U+00A0
    \\uHHHH \\UHHHHHHHH   any other code point that does not print (format characters,
                   separators, lone surrogates, unassigned)

``quoted=True`` writes the access log's way, nginx's, for a field between quotes: CR, LF
and tab as ``\\x0d``, ``\\x0a``, ``\\x09`` too (parsers of nginx's format decode
``\\xHH``), and ``"`` and ``\\`` as ``\\x22`` and ``\\x5c``.

It runs once or more per request (the access log), so text that is printable already --
nearly every URI -- costs one ``str.isprintable()`` (a C loop) and comes back as is.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_QUOTED = {'"': "\\x22", "\\": "\\x5c"}


def _code(ch: str, named: bool = True) -> str:
    if named and ch in _NAMED:
        return _NAMED[ch]
    n = ord(ch)
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def escape(text: str, quoted: bool = False) -> str:
    """``text`` with every non-printing code point shown as an escape (see the module
    docstring); with ``quoted``, ``"`` and ``\\`` too."""
    if text.isprintable() and not (quoted and ('"' in text or "\\" in text)):
        return text
    if quoted:
        return "".join(_QUOTED.get(c) or (c if c.isprintable() else _code(c, False))
                       for c in text)
    return "".join(c if c.isprintable() else _code(c) for c in text)
