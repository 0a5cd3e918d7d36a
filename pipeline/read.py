"""Reading raw inputs as Beam transforms: every input becomes exactly one `RawItem`.

Inputs (docs/architecture.md "Raw input"): img2dataset / WebDataset tars (`{key}.jpg|png|webp`, optional `.txt`
alt text), image folders or globs (caption from a sibling `.txt`), Parquet with image bytes (columns
remappable). Any path Beam's FileSystems read (local, gs://, s3://, hdfs://). Files are matched with
`fileio.MatchAll`, spread with `Reshuffle`, and read in one streaming pass each.

Accounting: a tar sample without an image -> `missing_image`; a damaged tar -> what is readable plus
one `{shard}#truncated` row (`unreadable_archive_tail`); a key seen again -> `{key}~2`, `~3`, ...
(`duplicate_key`; the first by source keeps the key, so the result does not depend on arrival order).
Archive member names are sanitised (`flowcurate.formats.tars.sanitize_key`) and never used as file paths.
"""

from __future__ import annotations

import io
import logging
import posixpath
from collections.abc import Iterator
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from flowcurate.formats.manifest import DUPLICATE_KEY, MISSING_IMAGE, UNREADABLE_ARCHIVE_TAIL
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
    import pyarrow.parquet as pq

    with FileSystems.open(path) as fh:
        table = pq.read_table(io.BytesIO(fh.read()))
    names = table.column_names
    if image_column not in names:  # e.g. img2dataset's per-shard metadata Parquet beside its tars
        logging.warning("%s: no image column %r (columns %s): not an image input, skipped", path, image_column, names)
        SKIPPED_FILES.inc()
        return
    keys = table.column(key_column).to_pylist() if key_column in names else [None] * table.num_rows
    captions = table.column(caption_column).to_pylist() if caption_column in names else [None] * table.num_rows
    for i, (key, data, cap) in enumerate(zip(keys, table.column(image_column).to_pylist(), captions)):
        key = sanitize_key(str(key)) if key is not None else f"{sanitize_key(posixpath.basename(path))}_{i:09d}"
        yield RawItem(key, f"{path}#{i}", data or None, cap, None if data else MISSING_IMAGE)


class _ReadFile(beam.DoFn):
    def __init__(self, key_column: str, image_column: str, caption_column: str):
        self.columns = (key_column, image_column, caption_column)

    def process(self, element: tuple[str, str]):
        path, root = element
        ext = _ext(path)
        if ext == "tar":
            yield from read_tar(path)
        elif ext in IMAGE_EXTS:
            yield read_image(path, root)
        elif ext in PARQUET_EXTS:
            yield from read_parquet(path, *self.columns)
        # other files (.txt captions, .json, stats) are not inputs of their own


def _number_repeats(key_items: tuple[str, list[RawItem]]) -> Iterator[RawItem]:
    key, items = key_items
    items = sorted(items, key=lambda it: (it.source, it.reason or ""))
    yield items[0]
    for i, it in enumerate(items[1:], start=2):
        yield RawItem(f"{key}~{i}", it.source, None, it.caption, DUPLICATE_KEY)


class ReadRaw(beam.PTransform):
    """--input specs -> PCollection[RawItem], one per input item, keys unique."""

    def __init__(self, specs: list[str], key_column: str = "key", image_column: str = "image",
                 caption_column: str = "caption"):
        super().__init__()
        self.patterns = [input_patterns(s) for s in specs]
        self.columns = (key_column, image_column, caption_column)

    def expand(self, pbegin):
        roots = sorted({r for _, r in self.patterns}, key=len, reverse=True)

        def with_root(path: str) -> tuple[str, str]:  # the deepest --input root holding the file
            return path, next((r for r in roots if path.startswith(r.rstrip("/") + "/")), posixpath.dirname(path))

        return (
            pbegin
            | "Patterns" >> beam.Create([p for p, _ in self.patterns])
            | "Match" >> fileio.MatchAll()
            | "Paths" >> beam.Map(lambda m: with_root(m.path))
            | "Distinct" >> beam.Distinct()
            | "Spread" >> beam.Reshuffle()
            | "ReadFiles" >> beam.ParDo(_ReadFile(*self.columns))
            | "ByKey" >> beam.Map(lambda it: (it.key, it))
            | "GroupKeys" >> beam.GroupByKey()
            | "NumberRepeats" >> beam.FlatMap(_number_repeats)
        )


