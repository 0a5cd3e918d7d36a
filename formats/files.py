"""Local files: atomic writes and the cache folder."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """`$FLOWCURATE_CACHE` (default `~/.cache/flowcurate`): tiny models, downloaded SSCD files."""
    return Path(os.environ.get("FLOWCURATE_CACHE", Path.home() / ".cache" / "flowcurate")).expanduser()


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[str], None]) -> Path:
    """Write `data` (bytes, or a function that writes a given file name) to a temporary file beside
    `path`, then rename it onto `path`: a reader sees the old file or the new one, never half of one.
    The temporary file is removed when writing fails. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        else:
            os.close(fd)
            data(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
