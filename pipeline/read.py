"""Reading raw inputs: the sorted list of input files, and one file's items in reading order.

Inputs: img2dataset / WebDataset tars (`{key}.jpg|png|webp`, optional `.txt` alt text), image folders
or globs (caption from a sibling `.txt`), Parquet with image bytes (columns remappable; read one row
group at a time). Any path Beam's FileSystems read (local, gs://, s3://, hdfs://).

`read_items(path, root)` yields every input of one file as a `RawItem`, in the file's order, so the
n-th item of a file is the same item on every read (pass 2 re-reads files by that ordinal). A tar
sample without an image -> `missing_image`; a damaged tar -> what is readable plus one
`{stem}#truncated` item (`unreadable_archive_tail`). Archive member names are sanitised
(`flowcurate.formats.tars.sanitize_key`) and never used as file paths.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Iterator
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from flowcurate.formats.manifest import MISSING_IMAGE, UNREADABLE_ARCHIVE_TAIL
from flowcurate.formats.tars import IMAGE_EXTS, TarTail, iter_tar, sanitize_key

PARQUET_EXTS = ("parquet",)
SKIPPED_FILES = beam.metrics.Metrics.counter("flowcurate", "skipped_files")


class RawItem(NamedTuple):
    key: str
    source: str  # "uri#member" (tar) or "uri" (file) or "uri#row" (Parquet)
    image: bytes | None  # None for rejected rows
    caption: str | None  # the original caption (alt text), if any
    reason: str | None  # rejection reason, None when the item goes on to validation


def input_patterns(spec: str) -> tuple[str, str]:
    """A user's --input -> (match pattern, root that image keys are relative to). A glob matches as
    given; a file matches itself; anything else is a folder and matches everything below it."""
    if any(c in spec for c in "*?["):
        head = spec
        while any(c in head for c in "*?["):
            head = posixpath.dirname(head)
        return spec, head
    found = FileSystems.match([spec])[0].metadata_list
    is_file = len(found) == 1 and found[0].path.rstrip("/") == spec.rstrip("/") and not spec.endswith("/")
    if is_file and not FileSystems.match([spec.rstrip("/") + "/*"])[0].metadata_list:
        return spec, posixpath.dirname(spec)
    root = spec.rstrip("/")
    return f"{root}/**", root


def _ext(path: str) -> str:
    return posixpath.basename(path).rpartition(".")[2].lower() if "." in posixpath.basename(path) else ""


def read_tar(path: str) -> Iterator[RawItem]:
    stem = sanitize_key(posixpath.basename(path).rpartition(".")[0] or posixpath.basename(path))
    with FileSystems.open(path) as fh:
        for s in iter_tar(fh, path):
            if isinstance(s, TarTail):
                yield RawItem(f"{stem}#truncated", f"{path}@{s.offset}", None, None, UNREADABLE_ARCHIVE_TAIL)
                continue
            sample, data = s
            ext = sample.image_ext()
            caption = data["txt"].decode("utf-8", "replace").strip() if "txt" in data else None
            if ext is None:
                yield RawItem(sample.key, sample.source, None, caption, MISSING_IMAGE)
            else:
                yield RawItem(sample.key, sample.source, data[ext], caption, None)


def read_image(path: str, root: str) -> RawItem:
    rel = path[len(root):].lstrip("/") if path.startswith(root) else posixpath.basename(path)
    key = sanitize_key(rel.rpartition(".")[0])
    with FileSystems.open(path) as fh:
        data = fh.read()
    caption = None
    txt = path.rpartition(".")[0] + ".txt"
    if FileSystems.exists(txt):
        with FileSystems.open(txt) as fh:
            caption = fh.read().decode("utf-8", "replace").strip()
    return RawItem(key, path, data, caption, None)


def read_parquet(path: str, key_column: str = "key", image_column: str = "image",
                 caption_column: str = "caption") -> Iterator[RawItem]:
    """One row group at a time (memory bounded by a row group), only the columns named."""
    import pyarrow.parquet as pq

    with FileSystems.open(path) as fh:
        pf = pq.ParquetFile(fh)
        names = pf.schema_arrow.names
        if image_column not in names:  # e.g. img2dataset's per-shard metadata Parquet beside its tars
            logging.warning("%s: no image column %r (columns %s): not an image input, skipped", path,
                            image_column, names)
            SKIPPED_FILES.inc()
            return
        columns = [c for c in (key_column, image_column, caption_column) if c in names]
        stem = sanitize_key(posixpath.basename(path))
        i = 0
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g, columns=columns)
            n = table.num_rows
            keys = table.column(key_column).to_pylist() if key_column in names else [None] * n
            caps = table.column(caption_column).to_pylist() if caption_column in names else [None] * n
            for key, data, cap in zip(keys, table.column(image_column).to_pylist(), caps):
                key = sanitize_key(str(key)) if key is not None else f"{stem}_{i:09d}"
                yield RawItem(key, f"{path}#{i}", data or None, cap, None if data else MISSING_IMAGE)
                i += 1
            del table


def read_items(path: str, root: str, columns: tuple[str, str, str] = ("key", "image", "caption")) -> Iterator[RawItem]:
    """Every input of one file, in the file's order. `columns`: Parquet key, image and caption columns."""
    ext = _ext(path)
    if ext == "tar":
        yield from read_tar(path)
    elif ext in IMAGE_EXTS:
        yield read_image(path, root)
    elif ext in PARQUET_EXTS:
        yield from read_parquet(path, *columns)
    # other files (.txt captions, .json, stats) are not inputs of their own


def is_input(path: str) -> bool:
    ext = _ext(path)
    return ext == "tar" or ext in IMAGE_EXTS or ext in PARQUET_EXTS


class InputFile(NamedTuple):
    """One input file as listed: where it is, the --input root its image keys are relative to, and
    what identifies this version of it (size and modification time; a rerun reuses pass-1 records
    only for a file whose identity is unchanged)."""

    path: str
    root: str
    size: int = -1
    mtime: float = -1.0

    def identity(self) -> str:
        return hashlib.sha256(f"{self.path}\0{self.size}\0{self.mtime!r}".encode()).hexdigest()[:24]


class ListInputs(beam.PTransform):
    """--input specs -> one element: the sorted list of `InputFile`s of every input file (a file's
    index in it is part of its items' ids). Small: one entry per file, not per image."""

    def __init__(self, specs: list[str]):
        super().__init__()
        self.patterns = [input_patterns(s) for s in specs]

    def expand(self, pbegin):
        roots = sorted({r for _, r in self.patterns}, key=len, reverse=True)

        def listed(m) -> InputFile:  # with the deepest --input root holding the file
            root = next((r for r in roots if m.path.startswith(r.rstrip("/") + "/")), posixpath.dirname(m.path))
            return InputFile(m.path, root, int(m.size_in_bytes), float(m.last_updated_in_seconds))

        return (
            pbegin
            | "Patterns" >> beam.Create([p for p, _ in self.patterns])
            | "Match" >> fileio.MatchAll()
            | "Listed" >> beam.Map(listed)
            | "Inputs" >> beam.Filter(lambda f: is_input(f.path))
            | "Sorted" >> beam.combiners.ToList()
            | "Distinct" >> beam.Map(lambda files: sorted(set(files)))
        )
