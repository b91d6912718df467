"""``fcgi-manager config``: the effective configuration, written back as TOML.

Every key of every section, after defaults, the file, the environment and the flags (as
``nginx -T``, ``php-fpm -tt`` and ``gunicorn --print-config`` do), so "which value is in
force, and who set it?" has one answer. A key not set by the file carries a comment
naming what did (``# default``, ``# FCGI_MANAGER_WORKERS_COUNT``, ``# --workers``).
The output is itself a valid config file that loads to the same values.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, List

from ..config import SECTIONS, SIZE_KEYS, Config

_SIZE_SUFFIXES = (("G", 1024**3), ("M", 1024**2), ("K", 1024))


def toml_value(value: Any) -> str:
    """One TOML value: strings as basic strings (JSON's escapes are TOML's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if value != int(value) else f"{value:.1f}"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _size(n: int) -> str:
    for suffix, unit in _SIZE_SUFFIXES:
        if n and n % unit == 0:
            return f'"{n // unit}{suffix}"'
    return str(n)


def _key_value(cfg: Config, section: str, key: str, value: Any) -> str:
    full = f"{section}.{key}"
    if full in SIZE_KEYS:
        return _size(value)
    if full == "app.env":
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value) + " }" \
            if value else "{}"
    if full == "manager.umask":
        return f'"{value:03o}"'
    if full == "workers.count" and not value:
        return str(cfg.workers.effective_count)
    return toml_value(value)


def render(cfg: Config) -> str:
    """The whole config as TOML text, one commented line per key."""
    lines: List[str] = []
    if cfg.source:
        lines.append(f"# effective configuration of {cfg.source}")
    else:
        lines.append("# effective configuration (no config file)")
    lines.append("# precedence: flags > environment > file > defaults")
    for section in SECTIONS:
        lines.append("")
        lines.append(f"[{section}]")
        values = getattr(cfg, section)
        for f in dataclasses.fields(values):
            key = f.name
            value = getattr(values, key)
            origin = cfg.origin(f"{section}.{key}")
            if value is None:  # app.script_name unset: no TOML for "absent"
                lines.append(f"# {key} is unset ({origin})")
                continue
            text = f"{key} = {_key_value(cfg, section, key, value)}"
            note = ""
            if origin != "file":
                note = origin
            if section == "workers" and key == "count" and not cfg.workers.count:
                note = f"{origin}: the number of CPUs"
            lines.append(f"{text:<40} # {note}" if note else text)
    return "\n".join(lines) + "\n"
