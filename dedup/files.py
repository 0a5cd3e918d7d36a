"""Input files for `flowcurate dedup`: local paths, or URIs on any filesystem pyarrow knows (`gs://`,
`s3://`, `hdfs://`, `file://`), the same as `flowcurate run` reads, without Beam.

`Remote` carries the few `pathlib.Path` attributes the dedup inputs use (suffix, stem, parent,
relative_to), so listing and keying work alike for both; `open_binary` opens either as a seekable
binary file (tar members are read by offset).
"""

from __future__ import annotations

import fnmatch
import functools
from pathlib import Path, PurePosixPath

GLOB_CHARS = "*?["


def is_uri(spec: str) -> bool:
    return "://" in str(spec)


@functools.lru_cache(maxsize=16)
def _filesystem(scheme_and_host: str):
    """One pyarrow filesystem per scheme and bucket/host (a GCS or S3 client is costly to make)."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(scheme_and_host)[0]


def _split(uri: str) -> tuple[str, str, str]:
    """`s3://bucket/a/b` -> ("s3", "bucket", "a/b"); `file:///x/y` -> ("file", "", "/x/y")."""
    scheme, _, rest = uri.partition("://")
    if scheme == "file":
        return scheme, "", rest
    host, _, path = rest.partition("/")
    return scheme, host, path


class Remote:
    """A file (or folder) on a pyarrow filesystem."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/") if not uri.endswith("://") else uri
        self.scheme, self.host, path = _split(self.uri)
        self.path = PurePosixPath(path)

    def _with(self, path: PurePosixPath) -> Remote:
        if self.scheme == "file":
            return Remote(f"file://{path}")
        return Remote(f"{self.scheme}://{self.host}/{str(path).lstrip('/')}")

    @property
    def fs(self):
        return _filesystem(f"{self.scheme}://{self.host}" if self.scheme != "file" else "file:///")

    @property
    def fs_path(self) -> str:
        return str(self.path) if self.scheme == "file" else f"{self.host}/{str(self.path).lstrip('/')}"

    suffix = property(lambda self: self.path.suffix)
    stem = property(lambda self: self.path.stem)
    name = property(lambda self: self.path.name)
    parent = property(lambda self: self._with(self.path.parent))

    def relative_to(self, other: Remote) -> PurePosixPath:
        return self.path.relative_to(other.path)

    def resolve(self) -> Remote:
        return self

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Remote({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Remote) and self.uri == other.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __lt__(self, other) -> bool:
        return str(self) < str(other)


def expand_uri(spec: str) -> list[Remote]:
    """A URI naming a file, a folder (recursively) or a glob (`**` recursive) -> its files."""
    from pyarrow import fs

    root = Remote(spec)
    pattern = str(root.path)
    if any(c in pattern for c in GLOB_CHARS):
        base = PurePosixPath(pattern)
        while any(c in str(base) for c in GLOB_CHARS):
            base = base.parent
        listed = root._with(base)
        infos = listed.fs.get_file_info(fs.FileSelector(listed.fs_path, recursive=True, allow_not_found=True))
        files = [root._with(PurePosixPath(_strip_host(i.path, root))) for i in infos if i.type == fs.FileType.File]
        return sorted(f for f in files if fnmatch.fnmatch(str(f.path), pattern))
    info = root.fs.get_file_info(root.fs_path)
    if info.type == fs.FileType.File:
        return [root]
    if info.type == fs.FileType.Directory:
        infos = root.fs.get_file_info(fs.FileSelector(root.fs_path, recursive=True))
        return sorted(root._with(PurePosixPath(_strip_host(i.path, root))) for i in infos
                      if i.type == fs.FileType.File)
    return []


def _strip_host(fs_path: str, like: Remote) -> str:
    return fs_path if like.scheme == "file" else fs_path.partition("/")[2]


def open_binary(location: str | Path | Remote):
    """A seekable binary file object for a local path or a URI."""
    if isinstance(location, Remote) or is_uri(str(location)):
        r = location if isinstance(location, Remote) else Remote(str(location))
        return r.fs.open_input_file(r.fs_path)
    return open(location, "rb")
