"""Digests that identify content: a file by the sha256 of its bytes, plain data by the sha256 of its sorted JSON."""

import hashlib
import json
from pathlib import Path


def file_digest(path: str | Path) -> str:
    """The sha256 of a file's content (hex): what identifies a file that determines a result."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def json_digest(data, length: int = 16) -> str:
    """The first `length` hex digits of the sha256 of `data` as sorted JSON (values JSON lacks as their str)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:length]
