"""Reading WebDataset / img2dataset tars as untrusted input.

`scan_tar(fileobj, source)` lists the samples of one tar: each key with its members' extensions,
byte offsets and sizes, without reading image bytes, so a reader can fetch one member later with a
seek (map-style datasets, parallel decoding). Member names are only ever used as strings: a name
such as `../../etc/passwd.jpg` gives the key `../../etc/passwd`, sanitised to `etc/passwd`, and is
never joined to a filesystem path. A truncated or corrupt tar yields every sample before the damage
and then one `TarTail` saying where reading stopped.

Key rule (WebDataset's): the member's directory plus its base name up to the first dot; the rest is
the extension (`a/b/0001.clip_l.npy` -> key `a/b/0001`, ext `clip_l.npy`).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]+")


@dataclass(frozen=True)
class Member:
    ext: str
    offset: int  # byte offset of the member's data in the tar
    size: int


@dataclass
class TarSample:
    key: str  # sanitised key: [A-Za-z0-9_-/], no dots, no leading slash or '..'
    source: str  # "uri#member" of the image member (or of the first member when there is none)
    members: dict[str, Member] = field(default_factory=dict)
    raw_key: str = ""  # the key as the archive spelled it

    def image_ext(self) -> str | None:
        for ext in IMAGE_EXTS:
            if ext in self.members:
                return ext
        return None


@dataclass(frozen=True)
class TarTail:
    """Reading stopped early: `source` is the tar, `offset` where the damage starts."""

    source: str
    offset: int
    error: str


def sanitize_key(raw: str) -> str:
    """A key safe to use as a string anywhere (shard member names, Parquet, file names in reports)."""
    parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    key = _UNSAFE.sub("_", "/".join(parts)).strip("_")
    return key or "_"


def split_name(name: str) -> tuple[str, str]:
    """`dir/0001.clip_l.npy` -> (`dir/0001`, `clip_l.npy`)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


def _walk(fileobj: BinaryIO, source: str, read: bool) -> Iterator[tuple[TarSample, dict[str, bytes]] | TarTail]:
    """The one walk over a tar (streaming, so non-seekable files work): (sample, {ext: bytes}) per
    sample in archive order, the bytes read as the stream passes when `read`, else {}. A damaged
    archive ends with one `TarTail`; the sample being read when the damage was met is yielded only
    if all of it is provably whole, otherwise the tail starts at its first member, so nothing is
    dropped without a row saying where."""
    current: TarSample | None = None
    data: dict[str, bytes] = {}
    offset = 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for info in tar:
                offset = info.offset
                if not info.isfile():
                    continue  # directories, links, devices: never followed
                raw_key, ext = split_name(info.name)
                if current is None or raw_key != current.raw_key:
                    if current is not None:
                        yield current, data
                    current, data = TarSample(sanitize_key(raw_key), f"{source}#{info.name}", raw_key=raw_key), {}
                current.members[ext] = Member(ext, info.offset_data, info.size)
                if ext in IMAGE_EXTS:
                    current.source = f"{source}#{info.name}"
                if read:
                    fh = tar.extractfile(info)
                    blob = fh.read() if fh is not None else b""
                    if len(blob) != info.size:
                        raise EOFError(f"member {info.name!r} is cut short ({len(blob)} of {info.size} bytes)")
                    data[ext] = blob
                offset = info.offset_data + info.size
    except (tarfile.TarError, EOFError, OSError) as e:
        if current is not None and current.members:
            end = max(m.offset + m.size for m in current.members.values())
            # read: every member's bytes arrived; scan: the file really extends past the last member
            # (checkable when seekable: members before it were skipped over, so they are whole)
            if (len(data) == len(current.members)) if read else end <= _size(fileobj):
                yield current, data
                offset = end
            else:
                offset = min(m.offset for m in current.members.values()) - tarfile.BLOCKSIZE
        yield TarTail(source, max(offset, 0), f"{type(e).__name__}: {e}")
        return
    if current is not None:
        yield current, data


def scan_tar(fileobj: BinaryIO, source: str) -> Iterator[TarSample | TarTail]:
    """Samples of one tar in archive order, with members' offsets and sizes but no bytes (a reader
    fetches one member later with `read_member`). Members of a key are adjacent in WebDataset tars; a
    key that reappears later starts a new sample, which the caller sees as a repeated key."""
    for item in _walk(fileobj, source, read=False):
        yield item if isinstance(item, TarTail) else item[0]


def iter_tar(fileobj: BinaryIO, source: str) -> Iterator[tuple[TarSample, dict[str, bytes]] | TarTail]:
    """Like `scan_tar`, reading each member's bytes as the stream passes (one pass; works on
    non-seekable streams such as cloud storage reads): (sample, {ext: bytes}) per sample, then a
    `TarTail` if the archive is damaged."""
    return _walk(fileobj, source, read=True)


def _size(fileobj: BinaryIO) -> int:
    try:
        return fileobj.seek(0, 2)
    except (OSError, AttributeError, ValueError):
        return -1  # not seekable: the last sample cannot be proven whole, so it counts as the tail


def read_member(fileobj: BinaryIO, member: Member) -> bytes:
    fileobj.seek(member.offset)
    data = fileobj.read(member.size)
    if len(data) != member.size:
        raise EOFError(f"member at {member.offset} is cut short ({len(data)} of {member.size} bytes)")
    return data
