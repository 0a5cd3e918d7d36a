"""What `flowcurate dedup` reads: images (folders, globs, WebDataset/img2dataset tars) or precomputed
embeddings (`flowcurate.formats.manifest.EMBEDDINGS_SCHEMA` Parquet, or `.npy` + a keys file), and SSCD embedding of images.

Images are first *listed* (keys, sources, tar offsets; no pixels), then decoded, preprocessed and
embedded by a map-style `torch.utils.data` loader whose workers decode in parallel. Batches are
consecutive runs of the sorted item list, so their composition, and therefore every float, is the
same whatever the worker count. Every listed item ends as an embedding or a rejection with a reason.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from flowcurate.dedup.core import valid_rows
from flowcurate.dedup.files import Remote, expand_uri, is_uri, open_binary
from flowcurate.formats.images import ImageRejected, decode_image
from flowcurate.formats.manifest import (
    DUPLICATE_KEY,
    EMBEDDINGS_SCHEMA,
    MISSING_IMAGE,
    UNDECODABLE,
    UNREADABLE_ARCHIVE_TAIL,
)
from flowcurate.formats.tars import IMAGE_EXTS, Member, TarTail, read_member, sanitize_key, scan_tar
from flowcurate.models.sscd import SSCDPreprocess, embed

EMBEDDING_SUFFIXES = (".parquet", ".npy")


class InputError(ValueError):
    """Input that cannot be used at all (as opposed to one bad item, which becomes a rejected row)."""


class UsageError(ValueError):
    """A flag combination that cannot work (exit 2, one line)."""


@dataclass(frozen=True)
class ImageItem:
    key: str
    source: str  # "path" or "path#member"
    path: str
    offset: int = -1  # >= 0: a tar member's data offset
    size: int = -1


@dataclass
class Listing:
    items: list[ImageItem] = field(default_factory=list)
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (key, source, reason)


@dataclass
class Embedded:
    keys: list[str]
    sources: list[str]
    embeddings: np.ndarray  # (N, D) float32 (or a float16 memory map), L2-normalised
    widths: np.ndarray  # (N,) int32, -1 when unknown
    heights: np.ndarray
    rejected: list[tuple[str, str, str]] = field(default_factory=list)


def expand(specs: Iterable[str]) -> list[Path | Remote]:
    """Files named by paths, folders (recursively) and globs (`**` recursive), sorted, deduplicated;
    URIs (gs://, s3://, hdfs://, file://) through pyarrow's filesystems (`flowcurate.dedup.files`)."""
    found: set = set()
    for spec in specs:
        if is_uri(spec):
            matches = expand_uri(spec)
            if not matches:
                raise InputError(f"--input {spec!r} matches nothing")
            found.update(matches)
            continue
        p = Path(spec).expanduser()
        if p.is_dir():
            found.update(q for q in p.rglob("*") if q.is_file())
        elif p.is_file():
            found.add(p)
        else:
            matches = [Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True)]
            if not matches:
                raise InputError(f"--input {spec!r} matches nothing")
            for m in matches:
                found.update([m] if m.is_file() else (q for q in m.rglob("*") if q.is_file()))
    return sorted(found)


def common_parent(files: list) -> Path | Remote:
    """The deepest folder holding every file (local paths, or URIs of one filesystem)."""
    if all(isinstance(f, Remote) for f in files):
        parts = os.path.commonpath([str(f.parent.path) for f in files])
        return files[0]._with(type(files[0].path)(parts))
    if any(isinstance(f, Remote) for f in files):
        raise UsageError("--input mixes local image files with URIs; give one kind per run")
    return Path(os.path.commonpath([str(f.parent) for f in files]))


def _unique(key: str, seen: dict[str, int]) -> tuple[str, bool]:
    """`key`, or `key~N` for the N-th repeat (a repeated key gets a duplicate_key row)."""
    n = seen.get(key, 0) + 1
    seen[key] = n
    return (key, False) if n == 1 else (f"{key}~{n}", True)


def list_images(files: list[Path], progress: Callable[[int], None] | None = None) -> Listing:
    """Image files and tar members as items; tars' samples without an image, repeated keys and
    unreadable tar tails as rejections. Image files' keys are their paths relative to the common
    folder of all inputs, without the extension. progress(n): called as files are listed."""
    out = Listing()
    seen: dict[str, int] = {}
    images = [f for f in files if f.suffix.lower().lstrip(".") in IMAGE_EXTS]
    tars = [f for f in files if f.suffix.lower() == ".tar"]
    root = common_parent(images) if images else None

    def add(key, source, **loc):
        key, repeated = _unique(key, seen)
        if repeated:
            out.rejected.append((key, source, DUPLICATE_KEY))
        else:
            out.items.append(ImageItem(key, source, **loc))

    for i, f in enumerate(images):
        add(sanitize_key(str(f.relative_to(root).with_suffix(""))), str(f), path=str(f))
        if progress and i % 1024 == 1023:
            progress(1024)
    if progress and len(images) % 1024:
        progress(len(images) % 1024)
    for t in tars:
        with open_binary(t) as fh:
            for s in scan_tar(fh, str(t)):
                if isinstance(s, TarTail):
                    key, _ = _unique(f"{t.stem}#truncated", seen)
                    out.rejected.append((key, f"{t}@{s.offset}", UNREADABLE_ARCHIVE_TAIL))
                    continue
                ext = s.image_ext()
                if ext is None:
                    key, repeated = _unique(s.key, seen)
                    out.rejected.append((key, s.source, DUPLICATE_KEY if repeated else MISSING_IMAGE))
                    continue
                m = s.members[ext]
                add(s.key, s.source, path=str(t), offset=m.offset, size=m.size)
        if progress:
            progress(1)
    out.items.sort(key=lambda it: it.key)
    return out


class _Images(torch.utils.data.Dataset):
    """Item i -> (index, preprocessed tensor or None, width, height, reason)."""

    def __init__(self, items: list[ImageItem], preprocess: SSCDPreprocess, max_pixels: int):
        self.items, self.preprocess, self.max_pixels = items, preprocess, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        it = self.items[i]
        try:
            with open_binary(it.path) as fh:
                if it.offset >= 0:
                    data = read_member(fh, Member("", it.offset, it.size))
                else:
                    data = fh.read()
            d = decode_image(data, self.max_pixels)
            return i, self.preprocess(d.image), d.width, d.height, ""
        except ImageRejected as e:
            return i, None, -1, -1, e.reason
        except (OSError, EOFError):  # the file vanished or was cut short since it was listed
            return i, None, -1, -1, UNDECODABLE


def _collate(rows):
    return rows


def embed_images(listing: Listing, model: torch.nn.Module, preprocess: SSCDPreprocess, *,
                 batch_size: int = 64, workers: int = 0, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, max_pixels: int = 89_478_485,
                 progress: Callable[[int], None] | None = None) -> Embedded:
    """Decode, preprocess and embed every listed item; undecodable ones become rejections."""
    loader = torch.utils.data.DataLoader(
        _Images(listing.items, preprocess, max_pixels), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=_collate, persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None)
    n = len(listing.items)
    widths = np.full(n, -1, np.int32)
    heights = np.full(n, -1, np.int32)
    vectors: dict[int, np.ndarray] = {}
    rejected = list(listing.rejected)
    for rows in loader:
        good = [r for r in rows if r[1] is not None]
        for i, _, w, h, reason in rows:
            if reason:
                it = listing.items[i]
                rejected.append((it.key, it.source, reason))
            widths[i], heights[i] = w, h
        if good:
            e = embed(model, torch.stack([r[1] for r in good]), device=device, dtype=dtype)
            for r, v in zip(good, e):
                vectors[r[0]] = v
        if progress:
            progress(len(rows))
    order = sorted(vectors)
    dim = next(iter(vectors.values())).shape[0] if vectors else 0
    return Embedded(
        keys=[listing.items[i].key for i in order],
        sources=[listing.items[i].source for i in order],
        embeddings=np.stack([vectors[i] for i in order]) if order else np.zeros((0, dim), np.float32),
        widths=widths[order], heights=heights[order], rejected=rejected)


def write_embeddings(path: Path, keys: list[str], embeddings: np.ndarray, widths=None, heights=None) -> None:
    """`EMBEDDINGS_SCHEMA`: key, embedding list<float32>, width, height (int32, nullable)."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = emb.shape
    flat = pa.array(emb.reshape(-1), pa.float32())
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32), pa.int32())

    def nullable(v):
        if v is None:
            return pa.nulls(n, pa.int32())
        v = np.asarray(v, np.int32)
        return pa.array(v, pa.int32(), mask=v < 0)

    table = pa.Table.from_arrays(
        [pa.array(keys, pa.string()), pa.ListArray.from_arrays(offsets, flat), nullable(widths), nullable(heights)],
        schema=EMBEDDINGS_SCHEMA)
    pq.write_table(table, path)


def read_embeddings(path: Path, keys_path: Path | None = None) -> Embedded:
    """Precomputed embeddings: `EMBEDDINGS_SCHEMA` Parquet, or `.npy` (float32 or float16, memory-mapped)
    with one key per line in `keys_path`. Whole-file problems raise `InputError` with the reason."""
    path = path if isinstance(path, Remote) else Path(path)
    if path.suffix == ".npy":
        if keys_path is None:
            raise InputError(f"{path}: .npy embeddings need a keys file (--keys), one key per line")
        if isinstance(path, Remote):  # read whole: only local files can be memory-mapped
            with open_binary(path) as fh:
                emb = np.load(fh, allow_pickle=False)
        else:
            emb = np.load(path, mmap_mode="r")
        keys = Path(keys_path).read_text().splitlines()
        if emb.ndim != 2 or emb.dtype not in (np.float16, np.float32):
            raise InputError(f"{path}: expected a 2-D float16/float32 array, got {emb.dtype} {emb.shape}")
        if len(keys) != emb.shape[0]:
            raise InputError(f"{path}: {emb.shape[0]} rows but {len(keys)} keys in {keys_path}")
        widths = heights = np.full(len(keys), -1, np.int32)
        sources = [f"{path}#{i}" for i in range(len(keys))]
    else:
        try:
            table = pq.read_table(str(path))
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{path}: not a readable Parquet file ({e})") from None
        missing = {"key", "embedding"} - set(table.column_names)
        if missing:
            raise InputError(f"{path}: missing column(s) {sorted(missing)}; expected key, embedding[, width, height]")
        if table.num_rows == 0:
            raise InputError(f"{path}: no embeddings")
        col = table.column("embedding").combine_chunks()
        if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type) \
                and not pa.types.is_fixed_size_list(col.type):
            raise InputError(f"{path}: column embedding must be a list of floats, got {col.type}")
        lengths = np.asarray(col.value_lengths().fill_null(0))
        if len(lengths) and (lengths.min() != lengths.max() or lengths.min() == 0):
            raise InputError(f"{path}: embeddings have mixed dimensions ({sorted(set(lengths.tolist()))[:5]})")
        emb = np.asarray(col.flatten().to_numpy(zero_copy_only=False)).reshape(len(col), -1)
        if emb.dtype not in (np.float16, np.float32):
            emb = emb.astype(np.float32)
        keys = [str(k) for k in table.column("key").to_pylist()]

        def ints(name):
            if name not in table.column_names:
                return np.full(len(keys), -1, np.int32)
            return np.asarray(table.column(name).fill_null(-1).to_numpy(zero_copy_only=False), np.int32)

        widths, heights = ints("width"), ints("height")
        sources = [f"{path}#{k}" for k in keys]
    if len(keys) == 0:
        raise InputError(f"{path}: no embeddings")
    if len(set(keys)) != len(keys):
        raise InputError(f"{path}: keys are not unique")
    return Embedded(keys, sources, emb, widths, heights)


def classify(specs: Sequence[str], what: str, exclude: set[Path]) -> tuple[str, list[Path]]:
    """-> ("images", image and tar files) or ("embeddings", .parquet/.npy files). Next to tars,
    img2dataset's .parquet/.json metadata found by a folder or glob is ignored; embedding files
    named directly together with images are an error. `exclude`: our own outputs, never read back."""
    files = [f for f in expand(specs) if f.resolve() not in exclude]
    images = [f for f in files if f.suffix.lower().lstrip(".") in IMAGE_EXTS or f.suffix.lower() == ".tar"]
    embeddings = [f for f in files if f.suffix.lower() in EMBEDDING_SUFFIXES]
    if images:
        named = {Path(s).expanduser() for s in specs if Path(s).expanduser().is_file()}
        explicit = [f for f in embeddings if f in named]
        if explicit:
            raise InputError(f"{what} mixes images/tars with the embeddings file {explicit[0]}; "
                             "give one kind per run")
        return "images", images
    if embeddings:
        return "embeddings", embeddings
    raise InputError(f"{what} {' '.join(specs)}: no images, .tar shards or embedding files (.parquet, .npy)")


def read_embedding_files(files: list[Path], keys_path: str | None, what: str) -> Embedded:
    """Embedding files -> one `Embedded` (a single .npy stays memory-mapped). File-level problems
    (unreadable, mixed dimensions, repeated keys, empty) raise InputError."""
    npys = [f for f in files if f.suffix.lower() == ".npy"]
    if len(npys) > 1:
        raise InputError(f"{what}: one .npy file per run (with its keys file); got {len(npys)}")
    if keys_path and not npys:
        raise UsageError(f"{what} names no .npy file; a keys file is only for .npy embeddings")
    parts = []
    for f in files:
        try:
            parts.append(read_embeddings(f, keys_path if f.suffix.lower() == ".npy" else None))
        except InputError:
            raise
        except (ValueError, OSError, pa.ArrowException) as e:
            raise InputError(f"{f}: cannot read embeddings ({str(e).splitlines()[0]})") from None
    if len(parts) == 1:
        return parts[0]
    dims = sorted({p.embeddings.shape[1] for p in parts})
    if len(dims) > 1:
        raise InputError(f"{what}: embedding files have different dimensions {dims}")
    keys = [k for p in parts for k in p.keys]
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise InputError(f"{what}: key {dup!r} appears in more than one embeddings file")
    dtype = np.float16 if all(p.embeddings.dtype == np.float16 for p in parts) else np.float32
    return Embedded(keys, [s for p in parts for s in p.sources],
                    np.concatenate([np.asarray(p.embeddings, dtype=dtype) for p in parts]),
                    np.concatenate([p.widths for p in parts]), np.concatenate([p.heights for p in parts]))


def check_rows(embeddings: np.ndarray, keys: list[str], what: str, skip: bool) -> np.ndarray:
    """(N, D) -> (N,) bool valid rows. Zero/NaN/inf rows are an InputError unless `skip`."""
    valid = valid_rows(embeddings)
    bad = [keys[i] for i in range(len(keys)) if not valid[i]]
    if bad and not skip:
        first = ", ".join(repr(k) for k in bad[:3])
        raise InputError(f"{what}: {len(bad)} embedding(s) are zero, NaN or infinite (first: {first}); fix "
                         "the file, or pass --skip-bad-embeddings to reject them as bad_embedding rows")
    return valid
