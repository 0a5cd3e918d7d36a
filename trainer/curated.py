"""The curated output folder `OUT` of `flowcurate run`, as the memorization check reads it.

- the training set: the manifest's kept rows in `train-` shards, with the SSCD descriptors of their
  training crops from `OUT/crop_embeddings/` (the view a generation reproduces: pass 2 embeds the crop
  it encodes), or of the whole originals from `OUT/embeddings/` for outputs made before crop
  descriptors existed (a non-square original then loses similarity to a copy of its crop); the SSCD model and preprocessing `OUT/stats.json` records (`"sscd"`), so
  generations are embedded exactly as the training images were;
- prompts: the original captions of the most-duplicated training images (most manifest rows naming them
  as `duplicate_of`; SD3 prompted with its most-duplicated examples) plus a seeded random sample of
  training captions, or a file, one prompt a line;
- training images for pairs.png: the original re-read from the manifest's `source` (a local file or a
  member of a local tar), or the stored latent decoded with the run's autoencoder.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from flowcurate.dedup.inputs import read_embeddings
from flowcurate.dedup.numerics import unit_rows
from flowcurate.formats import shards as S
from flowcurate.formats.images import ImageRejected, decode_image
from flowcurate.models.autoencoder import Autoencoder, to_model_space
from flowcurate.models.sscd import SSCDPreprocess

STATS_JSON = "stats.json"


class MemorizationError(ValueError):
    """Inputs that cannot be checked: no training images, missing embeddings, a bad stats.json."""


# ------------------------------------------------------------------------------------------------------
# The training set

@dataclass
class Curated:
    root: Path
    keys: list[str]  # the training set: kept rows in train- shards, sorted
    embeddings: np.ndarray  # (N, D) float32 unit rows, in `keys` order
    rows: dict[str, dict]  # training key -> its manifest row (source, shard, caption_original, ...)
    duplicates: dict[str, int]  # training key -> manifest rows naming it as duplicate_of
    sscd_location: str
    preprocess: SSCDPreprocess
    view: str = "crop"  # what the descriptors show: "crop" (the training crop) or "original" (older outputs)


def preprocess_from_record(rec: dict) -> SSCDPreprocess:
    """`SSCDPreprocess.record()` -> the same preprocessing (only square bilinear resizes exist)."""
    if rec.get("resize", "square") != "square" or rec.get("interpolation", "bilinear") != "bilinear":
        raise MemorizationError(f"SSCD preprocessing {rec} is not the square bilinear resize this version makes")
    return SSCDPreprocess(size=int(rec["size"]), mean=tuple(rec["mean"]), std=tuple(rec["std"]))


def read_curated(out: Path) -> Curated:
    """Manifest, embeddings and SSCD record of a curated folder `OUT` (its layout: docs/architecture.md)."""
    out = Path(out)
    try:
        sscd = json.loads((out / STATS_JSON).read_text())["sscd"]
        location, pre = sscd["location"], preprocess_from_record(sscd["preprocess"])
    except (OSError, ValueError, KeyError) as e:
        raise MemorizationError(f"{out / STATS_JSON}: no usable \"sscd\" entry with location and preprocess "
                                f"({e!r}); it names the SSCD model the training embeddings were made with") from None
    if not (out / "manifest").is_dir():
        raise MemorizationError(f"{out}: no manifest/ folder; --curated is the output folder of `flowcurate run`")
    table = pq.read_table(out / "manifest", columns=["key", "source", "status", "duplicate_of", "caption_original",
                                                     "shard"])
    train = table.filter(pc.and_(pc.equal(table["status"], "kept"), pc.starts_with(table["shard"], "train-")))
    if train.num_rows == 0:
        raise MemorizationError(f"{out}/manifest: no kept rows in train- shards")
    rows = {r["key"]: r for r in train.to_pylist()}
    counts = table.filter(pc.equal(table["status"], "duplicate"))["duplicate_of"].value_counts().to_pylist()
    duplicates = {k: 0 for k in rows}
    duplicates.update((c["values"], c["counts"]) for c in counts if c["values"] in rows)
    keys = sorted(rows)
    view, folder = "crop", "crop_embeddings"
    found = _descriptors(out / folder, rows)
    if len(found) < len(keys):  # an output made before pass 2 embedded the crops: the whole originals
        view, folder = "original", "embeddings"
        found = _descriptors(out / folder, rows)
    missing = [k for k in keys if k not in found]
    if missing:
        raise MemorizationError(f"{out}/{folder}: {len(missing)} training keys have no embedding, "
                                f"e.g. {missing[:3]}")
    emb = unit_rows(np.stack([found[k] for k in keys]))
    return Curated(out, keys, emb, rows, duplicates, location, pre, view)


def _descriptors(folder: Path, rows: dict) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.parquet")):
        e = read_embeddings(f)
        found.update((k, e.embeddings[i]) for i, k in enumerate(e.keys) if k in rows)
    return found


# ------------------------------------------------------------------------------------------------------
# Prompts

@dataclass(frozen=True)
class Prompt:
    text: str
    origin: str  # duplicated | random | file
    key: str | None = None
    duplicates: int = 0


def default_prompts(curated: Curated, top: int, n_random: int, seed: int = 0) -> list[Prompt]:
    """The captions of the `top` most-duplicated training images (ties: by key), then `n_random` more
    drawn with `seed` from the rest; one prompt per distinct caption."""
    def caption(k):
        return (curated.rows[k]["caption_original"] or "").strip()

    keys = [k for k in curated.keys if caption(k)]
    ranked = sorted((k for k in keys if curated.duplicates[k] > 0), key=lambda k: (-curated.duplicates[k], k))
    chosen = [(k, "duplicated") for k in ranked[:top]]
    rest = sorted(set(keys) - {k for k, _ in chosen})
    picks = np.random.default_rng(seed).permutation(len(rest))[:n_random]
    chosen += [(rest[i], "random") for i in sorted(picks)]
    prompts, seen = [], set()
    for k, origin in chosen:
        if caption(k) not in seen:
            seen.add(caption(k))
            prompts.append(Prompt(caption(k), origin, k, curated.duplicates[k]))
    return prompts


def read_prompt_file(path: Path) -> list[Prompt]:
    """One prompt per non-empty line."""
    prompts = [Prompt(line.strip(), "file") for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise MemorizationError(f"{path}: no prompts")
    return prompts


# ------------------------------------------------------------------------------------------------------
# Training images for pairs.png

def read_source(source: str) -> Image.Image | None:
    """The original from `uri#member` (a local tar) or `uri` (a local file); None when not readable here."""
    path, _, member = source.partition("#")
    try:
        if Path(source).is_file():  # a file (whose name may hold a '#')
            data = Path(source).read_bytes()
        elif member and tarfile.is_tarfile(path):
            with tarfile.open(path) as tar:
                fh = tar.extractfile(tar.getmember(member))  # read into memory, never extracted to disk
                data = fh.read() if fh else b""
        else:
            return None
        return decode_image(data).image
    except (OSError, KeyError, ImageRejected, tarfile.TarError):
        return None


def read_latent(curated: Curated, key: str) -> np.ndarray:
    """The stored posterior mean (C, h, w) of a training key, from the shard the manifest names."""
    with tarfile.open(curated.root / "shards" / curated.rows[key]["shard"]) as tar:
        return S.load_npy(tar.extractfile(f"{key}.latent_mean.npy").read()).astype(np.float32)


def training_image(curated: Curated, key: str, ae: Autoencoder) -> tuple[Image.Image | None, str]:
    """(image, "source" | "latent" | "missing"): the original when it can be read here, else the
    training latent decoded with the run's autoencoder."""
    img = read_source(curated.rows[key]["source"] or "")
    if img is not None:
        return img, "source"
    try:
        z = to_model_space(torch.from_numpy(read_latent(curated, key))[None], ae.scaling_factor, ae.shift_factor)
        return Image.fromarray(ae.decode(z)[0]), "latent"
    except (OSError, KeyError, tarfile.TarError):
        return None, "missing"

