"""Fixtures of the container tests."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest


@pytest.fixture
def image_root() -> Iterator[Path]:
    """A directory for the image's files (/app, /run/fcgi, /opt/venv). Not pytest's
    tmp_path: its parents are private to root, and the image's user must reach it."""
    root = Path(tempfile.mkdtemp(prefix="fcgi-image-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)
