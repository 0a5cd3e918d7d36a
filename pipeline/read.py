"""Reading raw inputs: the sorted list of input files, and one file's items in reading order.

Inputs: img2dataset / WebDataset tars (`{key}.jpg|png|webp`, optional `.txt` alt text and `.json`
metadata whose `url` is kept), image folders or globs (caption from a sibling `.txt`), Parquet with
image bytes: img2dataset's Parquet output (a binary `jpg` column) and Hugging Face datasets' Parquet
(an image struct `{bytes, path}`), the columns found by `parquet_columns` or named by the user, read
in record batches of bounded size (`parquet_batch_rows`). Any path Beam's FileSystems read (local,
gs://, s3://, hdfs://).

Edit triplets (`[pipeline] task = "edit"`, `EditNames`): Parquet rows with a source image, an edited
image and an instruction column (the public InstructPix2Pix data: `original_image`, `edited_image`,
`edit_prompt`), or tar samples with members `{key}.original_image.{jpg|png|...}`,
`{key}.edited_image.{...}` and `{key}.edit_prompt.txt`. The edited image is the item's `image` (what
validation, filters and SSCD dedup see), the source rides along as `source_image` and the instruction
is the item's caption. A triplet without either image -> `missing_image`; without an instruction ->
`missing_instruction`; a loose image file is not a triplet -> `missing_image`.

`read_items(path, root)` yields every input of one file as a `RawItem`, in the file's order, so the
n-th item of a file is the same item on every read (pass 2 re-reads files by that ordinal). A tar
sample or a Parquet row without image bytes -> `missing_image`; a damaged tar -> what is readable
plus one `{stem}#truncated` item (`unreadable_archive_tail`). Archive member names are sanitised
(`flowcurate.formats.tars.sanitize_key`) and never used as file paths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections.abc import Iterator
from typing import NamedTuple

import apache_beam as beam
import pyarrow as pa
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from flowcurate.formats.config import PipelineConfig
from flowcurate.formats.manifest import MISSING_IMAGE, MISSING_INSTRUCTION, UNREADABLE_ARCHIVE_TAIL
from flowcurate.formats.tars import IMAGE_EXTS, TarTail, iter_tar, sanitize_key

PARQUET_EXTS = ("parquet",)
# Parquet column names tried, in order, when the user names none: img2dataset writes the image as
# `jpg` (or `png`, `webp`) and the alt text as `caption`; Hugging Face datasets write an `image` (or
# `img`) struct {bytes, path} and the caption as `text` (or `caption`, `prompt`).
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img")
CAPTION_COLUMNS = ("caption", "text", "txt", "prompt")
URL_COLUMN = "url"  # img2dataset's source URL, carried to the kept rows and the sample json
# Rows per record batch are chosen so that one batch holds about this many bytes of (uncompressed)
# column data, within these bounds: memory is bounded by a batch, not by a row group or the file.
PARQUET_BATCH_BYTES = 64 << 20
PARQUET_BATCH_ROWS = (1, 1024)
# img2dataset's json members are small; a larger one is not metadata we parse (untrusted input)
MAX_JSON_BYTES = 1 << 20
SKIPPED_FILES = beam.metrics.Metrics.counter("flowcurate", "skipped_files")


class RawItem(NamedTuple):
    key: str
    source: str  # "uri#member" (tar) or "uri" (file) or "uri#row" (Parquet)
    image: bytes | None  # None for rejected rows
    caption: str | None  # the original caption (alt text), if any
    reason: str | None  # rejection reason, None when the item goes on to validation
    url: str | None = None  # where the source says the image came from (img2dataset's `url`), if any
    source_image: bytes | None = None  # edit triplets: the source image (`image` is the edited one)


class EditNames(NamedTuple):
    """Where an edit triplet's parts are: Parquet column names, or tar member names before the extension
    (defaults: the `[pipeline] edit_*` defaults, the public InstructPix2Pix data's names)."""

    source: str = PipelineConfig.edit_source
    target: str = PipelineConfig.edit_target
    instruction: str = PipelineConfig.edit_instruction


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


def json_url(data: bytes | None) -> str | None:
    """The `url` of an img2dataset sample's json member, or None (absent, too large, not json, not a
    string): metadata is a courtesy, never a reason to reject the image."""
    if not data or len(data) > MAX_JSON_BYTES:
        return None
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    url = doc.get(URL_COLUMN) if isinstance(doc, dict) else None
    return url if isinstance(url, str) and url else None


def _named_image(data: dict[str, bytes], name: str) -> str | None:
    """The member name `{name}.{image ext}` under which a tar sample holds that image, if any."""
    return next((f"{name}.{ext}" for ext in IMAGE_EXTS if f"{name}.{ext}" in data), None)


def _triplet(path: str, sample, data: dict[str, bytes], names: EditNames) -> RawItem:
    """A tar sample as a triplet; its source names the edited image's member (else the sample's first)."""
    txt = data.get(f"{names.instruction}.txt")
    instruction = txt.decode("utf-8", "replace").strip() if txt is not None else None
    src, target = _named_image(data, names.source), _named_image(data, names.target)
    source = f"{path}#{sample.raw_key}.{target}" if target else sample.source
    return triplet_item(sample.key, source, data.get(src), data.get(target), instruction, json_url(data.get("json")))


def triplet_item(key: str, source: str, src: bytes | None, edited: bytes | None, instruction: str | None,
                 url: str | None = None) -> RawItem:
    """One edit triplet as a RawItem (the edited image as `image`), with its reason when a part is missing."""
    reason = MISSING_IMAGE if not src or not edited else MISSING_INSTRUCTION if not instruction else None
    return RawItem(key, source, edited or None, instruction or None, reason, url, src or None)


def read_tar(path: str, edit: EditNames | None = None) -> Iterator[RawItem]:
    stem = sanitize_key(posixpath.basename(path).rpartition(".")[0] or posixpath.basename(path))
    with FileSystems.open(path) as fh:
        for s in iter_tar(fh, path):
            if isinstance(s, TarTail):
                yield RawItem(f"{stem}#truncated", f"{path}@{s.offset}", None, None, UNREADABLE_ARCHIVE_TAIL)
                continue
            sample, data = s
            if edit is not None:
                yield _triplet(path, sample, data, edit)
                continue
            ext = sample.image_ext()
            caption = data["txt"].decode("utf-8", "replace").strip() if "txt" in data else None
            url = json_url(data.get("json"))
            if ext is None:
                yield RawItem(sample.key, sample.source, None, caption, MISSING_IMAGE, url)
            else:
                yield RawItem(sample.key, sample.source, data[ext], caption, None, url)


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


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or (
        hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(t))


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))


def _image_kind(t: pa.DataType) -> str | None:
    """"bytes" for a binary column, "struct" for a struct with a binary `bytes` field (Hugging Face
    datasets' Image feature: {bytes, path}), else None (not image bytes)."""
    if _is_binary(t):
        return "bytes"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type):
        return "struct"
    return None


class ParquetColumns(NamedTuple):
    """Which columns of one Parquet file hold what (None: the file has none)."""

    image: str
    image_kind: str  # "bytes" or "struct" (see `_image_kind`)
    key: str | None
    caption: str | None
    url: str | None
    source: str | None = None  # edit triplets: the source image column (same kind as `image`)
    source_kind: str | None = None


def parquet_columns(schema: pa.Schema, key_column: str | None = "key", image_column: str | None = None,
                    caption_column: str | None = None, source_column: str | None = None) -> ParquetColumns | None:
    """The columns to read from a Parquet file with this schema, or None when it holds no image bytes
    (e.g. img2dataset's per-shard metadata table beside its tars, which describes the tars' images).

    A column named by the user is used if present; otherwise the image column is the first binary (or
    {bytes, path} struct) column named in `IMAGE_COLUMNS`, else the first struct column with a binary
    `bytes` field, and the caption column is the first string column named in `CAPTION_COLUMNS`. So
    img2dataset's and Hugging Face datasets' files need no flags, and a file is read the same way in
    pass 1 and pass 2 (the n-th item of a file must be the same item on every read)."""
    names = schema.names
    types = {f.name: f.type for f in schema}
    if image_column is not None:
        image = image_column if image_column in types and _image_kind(types[image_column]) else None
    else:
        image = next((c for c in IMAGE_COLUMNS if c in types and _image_kind(types[c])), None) or next(
            (c for c in names if _image_kind(types[c]) == "struct"), None)
    if image is None:
        return None
    if caption_column is not None:
        caption = caption_column if caption_column in types else None
    else:
        caption = next((c for c in CAPTION_COLUMNS if c in types and _is_string(types[c])), None)
    key = key_column if key_column and key_column in types and key_column != image else None
    url = URL_COLUMN if URL_COLUMN in types and _is_string(types[URL_COLUMN]) else None
    source = source_column if source_column in types and _image_kind(types[source_column]) else None
    if source_column is not None and source is None:
        return None  # a triplet file needs both image columns
    return ParquetColumns(image, _image_kind(types[image]), key, caption, url, source,
                          _image_kind(types[source]) if source else None)


def parquet_batch_rows(metadata, target_bytes: int = PARQUET_BATCH_BYTES) -> int:
    """Rows per record batch: about `target_bytes` of uncompressed data, from the largest rows of any
    row group (so a file of large images gets small batches and a file of thumbnails larger ones)."""
    per_row = max((metadata.row_group(g).total_byte_size / max(metadata.row_group(g).num_rows, 1)
                   for g in range(metadata.num_row_groups)), default=0.0)
    lo, hi = PARQUET_BATCH_ROWS
    return int(min(hi, max(lo, target_bytes // per_row if per_row > 0 else hi)))


def _image_values(column: pa.Array, kind: str) -> list:
    """Image bytes (or None) per row. A struct's `bytes` child taken with the struct's own nulls
    (`flatten`), so a null struct is a missing image, never a child's leftover value."""
    if kind == "struct":
        column = column.flatten()[column.type.get_field_index("bytes")]
    return column.to_pylist()


def _texts(batch: pa.RecordBatch, name: str | None) -> list:
    if name is None:
        return [None] * batch.num_rows
    return [None if v is None else str(v) for v in batch.column(name).to_pylist()]


def iter_parquet_batches(pf, cols: ParquetColumns, batch_bytes: int = PARQUET_BATCH_BYTES) -> Iterator[pa.RecordBatch]:
    """The needed columns of `pf` as record batches of `parquet_batch_rows` rows, in file order."""
    wanted = list(dict.fromkeys(c for c in (cols.key, cols.image, cols.caption, cols.url, cols.source) if c))
    # one thread: the runner already reads many files at once, and Arrow's per-thread buffers would add
    # tens of MB per reader (measured: 64 MB vs 36 MB peak for a 2 MB batch budget)
    yield from pf.iter_batches(batch_size=parquet_batch_rows(pf.metadata, batch_bytes), columns=wanted,
                               use_threads=False)


def read_parquet(path: str, key_column: str | None = "key", image_column: str | None = None,
                 caption_column: str | None = None, batch_bytes: int = PARQUET_BATCH_BYTES,
                 edit: EditNames | None = None) -> Iterator[RawItem]:
    """Every row of an image Parquet file as a RawItem, streamed by record batches: memory is bounded
    by one batch (plus pyarrow's read buffer), not by a row group or the file. Only the needed columns
    are read (`parquet_columns`). A row whose image is null or empty -> `missing_image` (img2dataset
    keeps its failed downloads as such rows), so every row is accounted for. A file without an image
    column is not an image input: skipped with a warning and the `skipped_files` counter."""
    import pyarrow.parquet as pq

    with FileSystems.open(path) as fh:
        # pre_buffer=False and a read buffer: column chunks are read page by page as batches need
        # them, not a whole row group's chunks at once
        pf = pq.ParquetFile(fh, pre_buffer=False, buffer_size=1 << 20)
        if edit is not None:  # a triplet file: the named columns, nothing guessed
            image_column, caption_column = edit.target, edit.instruction
        cols = parquet_columns(pf.schema_arrow, key_column, image_column, caption_column,
                               edit.source if edit is not None else None)
        if cols is None:
            wanted = (f"{image_column!r}, binary or a {{bytes, path}} struct" if image_column else
                      f"binary {'/'.join(IMAGE_COLUMNS)} or a {{bytes, path}} struct")
            if edit is not None:
                wanted = f"edit triplets: {edit.source!r} and {edit.target!r}, each binary or a {{bytes, path}} struct"
            logging.warning("%s: no image column (%s; the file has %s): not an image input, skipped", path,
                            wanted, ", ".join(f"{f.name}: {f.type}" for f in pf.schema_arrow))
            SKIPPED_FILES.inc()
            return
        stem = sanitize_key(posixpath.basename(path))
        i = 0
        for batch in iter_parquet_batches(pf, cols, batch_bytes):
            keys = batch.column(cols.key).to_pylist() if cols.key else [None] * batch.num_rows
            images = _image_values(batch.column(cols.image), cols.image_kind)
            sources = (_image_values(batch.column(cols.source), cols.source_kind) if cols.source
                       else [None] * batch.num_rows)
            for key, data, cap, url, src in zip(keys, images, _texts(batch, cols.caption), _texts(batch, cols.url),
                                                sources):
                key = sanitize_key(str(key)) if key is not None else f"{stem}_{i:09d}"
                if edit is not None:
                    yield triplet_item(key, f"{path}#{i}", src, data, cap, url or None)
                else:
                    yield RawItem(key, f"{path}#{i}", data or None, cap, None if data else MISSING_IMAGE, url or None)
                i += 1
            del batch, images, sources


def read_items(path: str, root: str, columns: tuple[str | None, str | None, str | None] = ("key", None, None),
               edit: EditNames | None = None) -> Iterator[RawItem]:
    """Every input of one file, in the file's order. `columns`: Parquet key, image and caption columns
    (None: found by `parquet_columns`); `edit`: read edit triplets (the image and caption columns are
    then `edit`'s target and instruction)."""
    ext = _ext(path)
    if ext == "tar":
        yield from read_tar(path, edit)
    elif ext in IMAGE_EXTS:
        item = read_image(path, root)
        yield item if edit is None else item._replace(image=None, reason=MISSING_IMAGE)  # not a triplet
    elif ext in PARQUET_EXTS:
        yield from read_parquet(path, *columns, edit=edit)
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
