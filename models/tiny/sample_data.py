"""`flowcurate sample-data`: raw shards as img2dataset writes them, with a truth file.

    DIR/raw/00000.tar          {key}.jpg|png, {key}.txt (caption), {key}.json (img2dataset metadata)
    DIR/raw/00000.parquet      one row per sample (img2dataset's per-shard metadata table)
    DIR/raw/00000_stats.json   per-shard counts, as img2dataset writes them
    DIR/truth.json             what was planted: duplicate groups (with copy kinds) and, per broken
                               key, the rejection reason the pipeline must give (formats/manifest.py)

Images are procedural scenes (`flowcurate.models.tiny.procedural`) of varied size and aspect with truthful captions.
Planted near-duplicates are copies of an original (`exact` byte-identical file, `reencode`, `resize`,
`crop`, `jitter`), shuffled across shards so that groups span shards. Broken samples: a truncated JPEG
(`truncated`), a zero-byte file (`empty_file`), non-image bytes (`undecodable`) and a caption whose
image is missing (`missing_image`). Every key is accounted for in `truth.json`.

`write_repeated_data` writes data repeated as web data repeats (the curation experiment of
benchmarks/memorization_dedup.py): a few originals, each present many times as near-copies that
exact-hash dedup cannot remove (re-encoded, resized, colour-jittered, each saved again as a JPEG of
random quality), among unique images; every caption names one scene.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from flowcurate.models.tiny.procedural import (
    COPY_KINDS,
    caption,
    copy_variant,
    jpeg_bytes,
    random_scene,
    render,
)

BROKEN_KINDS = {  # kind -> the rejection reason the vocabulary (formats/manifest.py) gives it
    "truncated_jpeg": "truncated",
    "zero_bytes": "empty_file",
    "not_an_image": "undecodable",
    "caption_without_image": "missing_image",
}
SAMPLES_PER_SHARD = 128
TRUTH_VERSION = 1


@dataclass
class _Sample:
    caption: str
    ext: str | None  # None: no image member
    data: bytes = b""
    width: int | None = None
    height: int | None = None
    meta: dict = field(default_factory=dict)


def encode_image(img: Image.Image, ext: str, quality: int = 92) -> bytes:
    """`img` as JPEG (`ext` "jpg", at `quality`) or PNG bytes."""
    if ext == "jpg":
        return jpeg_bytes(img, quality)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _plan(n: int, rng: np.random.Generator):
    """How many originals, copies and broken samples make up `n` samples."""
    n_broken_each = max(1, n // 128)
    n_broken = n_broken_each * len(BROKEN_KINDS)
    if n < n_broken + 4:
        raise ValueError(f"--n {n} is too small: need at least {n_broken + 4} samples")
    budget = n - n_broken
    # about 1 in 8 samples is a planted copy; groups of 2-4 (original + 1-3 copies)
    sizes: list[int] = []
    while sum(s - 1 for s in sizes) < budget // 8:
        sizes.append(int(rng.integers(2, 5)))
    n_groups_items = sum(sizes)
    n_unique = budget - n_groups_items
    return n_broken_each, sizes, n_unique


def generate(n: int = 512, seed: int = 0) -> tuple[list[_Sample], dict]:
    """The samples (unshuffled) and the truth record, as a pure function of (n, seed)."""
    rng = np.random.default_rng(seed)
    n_broken_each, group_sizes, n_unique = _plan(n, rng)
    samples: list[_Sample] = []
    groups: list[list[int]] = []

    def original() -> tuple[Image.Image, str, str]:
        w, h = (int(v) for v in rng.integers(96, 193, size=2))
        scene = random_scene(rng)
        ext = "png" if rng.uniform() < 0.15 else "jpg"
        return render(scene, w, h), caption(scene), ext

    for _ in range(n_unique):
        img, cap, ext = original()
        samples.append(_Sample(cap, ext, encode_image(img, ext), *img.size))
    copy_kinds = COPY_KINDS  # exact first, so every run plants at least one byte-identical copy
    k = 0
    for size in group_sizes:
        img, cap, ext = original()
        members = [len(samples)]
        samples.append(_Sample(cap, ext, encode_image(img, ext), *img.size))
        for _ in range(size - 1):
            kind = copy_kinds[k % len(copy_kinds)]
            k += 1
            if kind == "exact":
                copy, data, cext = img, samples[members[0]].data, ext
            else:
                copy = copy_variant(img, rng, kind)
                cext = "jpg"
                data = encode_image(copy, cext, quality=int(rng.integers(60, 95)))
            members.append(len(samples))
            samples.append(_Sample(cap, cext, data, *copy.size, meta={"copy_kind": kind}))
        groups.append(members)
    broken: list[tuple[int, str]] = []
    for kind in BROKEN_KINDS:
        for _ in range(n_broken_each):
            img, cap, _ext = original()
            if kind == "truncated_jpeg":
                full = jpeg_bytes(img, 90)
                s = _Sample(cap, "jpg", full[: len(full) * 6 // 10])
            elif kind == "zero_bytes":
                s = _Sample(cap, "jpg", b"")
            elif kind == "not_an_image":
                s = _Sample(cap, "jpg", b"this is not an image, just text pretending to be a JPEG\n" * 4)
            else:
                s = _Sample(cap, None)
            broken.append((len(samples), kind))
            samples.append(s)

    # Shuffle so groups span shards; keys are img2dataset's: 5-digit shard id + 4-digit index.
    order = rng.permutation(len(samples))
    keys = [""] * len(samples)
    shuffled = []
    for pos, idx in enumerate(order):
        keys[idx] = f"{pos // SAMPLES_PER_SHARD:05d}{pos % SAMPLES_PER_SHARD:04d}"
        shuffled.append(idx)
    truth = {
        "version": TRUTH_VERSION,
        "n": len(samples),
        "seed": seed,
        "keys": sorted(keys),
        "duplicate_groups": [
            {"original": keys[g[0]], "copies": {keys[i]: samples[i].meta["copy_kind"] for i in g[1:]}}
            for g in groups
        ],
        "broken": {keys[i]: {"kind": kind, "reason": BROKEN_KINDS[kind]} for i, kind in broken},
        "captions": {keys[i]: samples[i].caption for i in range(len(samples))},
        "sizes": {keys[i]: [samples[i].width, samples[i].height] for i in range(len(samples))
                  if samples[i].width is not None},
    }
    return [(keys[i], samples[i]) for i in shuffled], truth


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: the same seed gives byte-identical shards
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


REPEAT_KINDS = ("reencode", "resize", "jitter")  # near-copies as the web repeats an image (no crop: the same picture)


def generate_repeated(n_unique: int, n_repeated: int, copies: int, seed: int = 0,
                      sides: tuple[int, int] = (64, 97)) -> tuple[list[_Sample], dict]:
    """`n_unique` originals once, and `n_repeated` originals `copies` times each: the original and
    copies - 1 near-copies (REPEAT_KINDS in turn, each saved again as a JPEG of quality 60-95, so
    hardly any two share pixels). Every original has its own caption (a scene drawn twice is drawn
    again), so a caption prompts one image. Sides are drawn from range(*sides). Shuffled with keys as
    in `generate`; truth.json's `duplicate_groups` are the repeated originals with their copies."""
    if n_unique < 0 or n_repeated < 0 or copies < 1 or n_unique + n_repeated == 0:
        raise ValueError(f"need n_unique, n_repeated >= 0 (not both 0) and copies >= 1, got "
                         f"{n_unique}, {n_repeated}, {copies}")
    rng = np.random.default_rng(seed)
    samples: list[_Sample] = []
    groups: list[list[int]] = []
    seen: set[str] = set()

    def original() -> tuple[Image.Image, str]:
        for _ in range(1000):
            scene = random_scene(rng)
            if caption(scene) not in seen:
                break
        else:  # pragma: no cover  (the scene space is far larger than any sample set here)
            raise ValueError("ran out of distinct captions")
        seen.add(caption(scene))
        w, h = (int(v) for v in rng.integers(*sides, size=2))
        return render(scene, w, h), caption(scene)

    for i in range(n_unique + n_repeated):
        img, cap = original()
        members = [len(samples)]
        samples.append(_Sample(cap, "jpg", encode_image(img, "jpg"), *img.size))
        if i < n_unique:
            continue
        for c in range(copies - 1):
            kind = REPEAT_KINDS[c % len(REPEAT_KINDS)]
            copy = copy_variant(img, rng, kind)
            members.append(len(samples))
            samples.append(_Sample(cap, "jpg", encode_image(copy, "jpg", quality=int(rng.integers(60, 96))), *copy.size,
                                   meta={"copy_kind": kind}))
        groups.append(members)
    order = rng.permutation(len(samples))
    keys = [""] * len(samples)
    for pos, idx in enumerate(order):
        keys[idx] = f"{pos // SAMPLES_PER_SHARD:05d}{pos % SAMPLES_PER_SHARD:04d}"
    truth = {
        "version": TRUTH_VERSION, "n": len(samples), "seed": seed, "keys": sorted(keys),
        "repeats": {"unique": n_unique, "repeated": n_repeated, "copies": copies},
        "duplicate_groups": [
            {"original": keys[g[0]], "copies": {keys[i]: samples[i].meta["copy_kind"] for i in g[1:]}}
            for g in groups],
        "broken": {},
        "captions": {keys[i]: samples[i].caption for i in range(len(samples))},
        "sizes": {keys[i]: [samples[i].width, samples[i].height] for i in range(len(samples))},
    }
    return [(keys[i], samples[i]) for i in order], truth


def write_sample_data(output: Path, n: int = 512, seed: int = 0) -> dict:
    """Write `output/raw/*.tar` (+ parquet, stats) and `output/truth.json`; returns the truth record."""
    items, truth = generate(n, seed)
    return _write(Path(output), items, truth, seed)


def write_repeated_data(output: Path, n_unique: int, n_repeated: int, copies: int, seed: int = 0) -> dict:
    """`generate_repeated` written as `write_sample_data` writes; returns the truth record."""
    items, truth = generate_repeated(n_unique, n_repeated, copies, seed)
    return _write(Path(output), items, truth, seed)


def _write(output: Path, items: list, truth: dict, seed: int) -> dict:
    raw = Path(output) / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for shard_start in range(0, len(items), SAMPLES_PER_SHARD):
        shard = f"{shard_start // SAMPLES_PER_SHARD:05d}"
        rows = []
        with tarfile.open(raw / f"{shard}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, s in items[shard_start: shard_start + SAMPLES_PER_SHARD]:
                ok = s.ext is not None  # img2dataset writes corrupt bytes as "success" too
                meta = {
                    "url": f"procedural://seed{seed}/{key}",
                    "key": key,
                    "status": "success" if ok else "failed_to_download",
                    "error_message": None if ok else "sample-data: planted sample without image",
                    "caption": s.caption,
                    "width": s.width,
                    "height": s.height,
                    "original_width": s.width,
                    "original_height": s.height,
                    "exif": None,
                    "sha256": hashlib.sha256(s.data).hexdigest() if s.ext is not None else None,
                }
                if s.ext is not None:
                    _add(tar, f"{key}.{s.ext}", s.data)
                _add(tar, f"{key}.txt", s.caption.encode())
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                rows.append(meta)
        pq.write_table(pa.Table.from_pylist(rows), raw / f"{shard}.parquet")
        stats = {"count": len(rows), "successes": sum(r["status"] == "success" for r in rows),
                 "failed_to_download": sum(r["status"] != "success" for r in rows)}
        (raw / f"{shard}_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (Path(output) / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
    return truth
