"""Local files: atomic writes and the cache folder."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """`$FLOWCURATE_CACHE` (default `~/.cache/flowcurate`): tiny models, downloaded SSCD files."""
    return Path(os.environ.get("FLOWCURATE_CACHE", Path.home() / ".cache" / "flowcurate")).expanduser()


def umask() -> int:
    """This process's umask, read without changing it (os.umask would, for a moment, in every thread)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):  # not Linux: the classic two calls
        old = os.umask(0o022)
        os.umask(old)
        return old


def readable_mode(path: str | os.PathLike) -> None:
    """Give a file the mode a plain `open(path, "w")` would have (0644 under the usual umask 022).
    For files made by writers that ignore the umask: `tempfile.mkstemp` and safetensors' `save_file`
    both create 0600 files, which a team sharing a run folder cannot read."""
    os.chmod(path, 0o666 & ~umask())


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[str], None]) -> Path:
    """Write `data` (bytes, or a function that writes a given file name) to a temporary file beside
    `path`, then rename it onto `path`: a reader sees the old file or the new one, never half of one.
    The temporary file is removed when writing fails. Parent folders are created. The file gets the
    mode the umask allows (0644 by default), not mkstemp's 0600."""
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
        readable_mode(tmp)  # mkstemp made it 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
