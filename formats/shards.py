"""The curated-shard format: the one contract between the pipeline (writer) and the trainer (reader).

docs/architecture.md ("Data contracts") explains it; this module is its code, used by both sides, so a
round-trip test pins it:

- `OUT/conditioning.json` + `OUT/conditioning.npz`: which autoencoder and text encoders made the
  arrays (source, revision, content hash, dtype), the AE's scale and shift, widths and lengths, and the
  encodings of the empty prompt (CFG) and of a few validation prompts. Its content hash
  (`sha256:` of the JSON file's bytes, which name the npz's hash) is written into every sample.
- `OUT/shards/{train,val}-NNNNNN.tar`: one sample per kept image, members sorted by name, float16
  `.npy` arrays (`latent_mean`, `latent_logvar`, and per caption variant `{v}.clip_l`, `{v}.clip_g`,
  `{v}.clip_l_pooled`, `{v}.clip_g_pooled`, `{v}.t5`) and a `json` with key, source, sizes, crop,
  resolution, both captions and the conditioning hash. Tars are written deterministically (sorted
  keys, fixed headers, temporary name then rename), so reruns are byte-identical. With `[pipeline]
  outputs` holding "images", samples also carry img2dataset's members (`image_members`): the
  training view as `jpg`/`png`, `txt`, optionally `syn.txt` and `original.{ext}`; an images-only
  sample has neither arrays nor conditioning hash, and `check_sample` refuses it by name.
- `OUT/shards/index.json`: shard names, splits and sample counts; also a `wids` dataset description
  (`wids_version`, `shardlist` of the training shards). `OUT/shards/{split}.wids.json`: one `wids`
  description per split (`wids_docs`).

`assemble` builds the MM-DiT's context and pooled vector from the stored parts as the reference does.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from flowcurate.formats.files import write_atomic
from flowcurate.formats.hashing import stable_hash

FORMAT_VERSION = 1
VARIANTS = ("orig", "syn")
PARTS = ("clip_l", "clip_l_pooled", "clip_g", "clip_g_pooled", "t5")
LATENT_MEMBERS = ("latent_mean.npy", "latent_logvar.npy")
RECORD_JSON = "conditioning.json"
RECORD_NPZ = "conditioning.npz"
INDEX_JSON = "index.json"
WIDS_VERSION = 1  # the dataset-description version webdataset's `wids` reads (index.json's `wids_version`)
WIDS_SUFFIX = ".wids.json"  # OUT/shards/{split}.wids.json: one wids description per split
SPLITS = ("train", "val")
# what the data is for: text-to-image (this module; a document without `task` is one) or instruction
# editing ("edit", formats/edit_shards.py). Each trainer refuses the other's shards, index and record.
TASK = "text_to_image"


class ShardFormatError(ValueError):
    """A shard, sample or conditioning record does not match the contract (never ignored)."""


def check_task(doc: Mapping, where: str, task: str = TASK) -> None:
    """Refuse a sample json, index or record made for another task than `task` (ShardFormatError)."""
    found = doc.get("task", TASK)
    if found != task:
        hint = {"edit": "instruction-editing data: train it with `flowcurate train --edit`",
                TASK: "text-to-image data: the editing trainer needs editing shards (formats/edit_shards.py)"}
        raise ShardFormatError(f"{where}: holds {hint.get(found, f'task {found!r} data')} (expected task {task!r})")


def array_members() -> list[str]:
    """Every `.npy` member of a sample, in tar order (sorted)."""
    return sorted([*LATENT_MEMBERS, *(f"{v}.{p}.npy" for v in VARIANTS for p in PARTS)])


# ------------------------------------------------------------------------------------------------------
# Stable hashing: split and shard of a key (hashlib, never Python's salted `hash`)

def split_of(key: str, val_fraction: float) -> str:
    """`val` for a fixed fraction of keys by hash, else `train`."""
    return "val" if stable_hash("split", key) < val_fraction * 2.0**64 else "train"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# ------------------------------------------------------------------------------------------------------
# Deterministic bytes: npy, npz, tar

def npy_bytes(array: np.ndarray, dtype: str = "float16") -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An `np.load`-able npz with fixed timestamps (np.savez stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, npy_bytes(arrays[name], str(arrays[name].dtype)))
    return buf.getvalue()


class SampleWriter:
    """Samples appended one at a time to a WebDataset tar stream: members `{key}.{name}` sorted by name,
    fixed headers (mtime 0, uid/gid 0, mode 0644), so equal inputs give equal bytes. Use as a context
    manager, or call `close()`; the file object stays open (its owner closes it)."""

    def __init__(self, fileobj: BinaryIO):
        self._tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def add(self, sample: Mapping[str, bytes]) -> None:
        key = sample["__key__"]
        if "." in key or "/" in key:
            raise ShardFormatError(f"sample key {key!r} contains '.' or '/'")
        for name in sorted(k for k in sample if not k.startswith("__")):
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(sample[name]), 0, 0o644
            self._tar.addfile(info, io.BytesIO(sample[name]))
        self.count += 1

    def close(self) -> None:
        self._tar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def tar_bytes(samples: Iterable[Mapping[str, bytes]]) -> bytes:
    """A WebDataset tar of the samples sorted by `__key__` (`SampleWriter`), as bytes."""
    buf = io.BytesIO()
    with SampleWriter(buf) as w:
        for sample in sorted(samples, key=lambda s: s["__key__"]):
            w.add(sample)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------
# Samples

def encode_sample(key: str, latent_mean: np.ndarray, latent_logvar: np.ndarray,
                  encodings: Mapping[str, Mapping[str, np.ndarray]], meta: Mapping, conditioning: str,
                  dtype: str = "float16") -> dict[str, bytes]:
    """One sample's tar members. `encodings[variant][part]` without the batch axis; `meta` holds
    source, width, height, crop, resolution, `caption` {orig, syn} and, when the input gave one, `url`
    (docs/architecture.md, "Shards")."""
    out = {"__key__": key, "latent_mean.npy": npy_bytes(latent_mean, dtype),
           "latent_logvar.npy": npy_bytes(latent_logvar, dtype)}
    for v in VARIANTS:
        for p in PARTS:
            out[f"{v}.{p}.npy"] = npy_bytes(encodings[v][p], dtype)
    out["json"] = sample_json(key, meta, conditioning)
    return out


def sample_json(key: str, meta: Mapping, conditioning: str | None) -> bytes:
    """The sample's `json` member; `conditioning` is None for samples without arrays (images only)."""
    doc = {"format_version": FORMAT_VERSION, "key": key, **meta}
    if conditioning is not None:
        doc["conditioning"] = conditioning
    return json.dumps(doc, sort_keys=True).encode()


def image_members(view: bytes, view_ext: str, captions: Mapping[str, str | None],
                  original: tuple[str, bytes] | None = None) -> dict[str, bytes]:
    """The "images" output's members, img2dataset's layout: the training view (`jpg` or `png`), the
    original caption as `txt` (img2dataset's caption member), the synthetic one as `syn.txt` when there
    is one, and the input's own bytes as `original.{ext}` when asked for. The `json` is `sample_json`."""
    out = {view_ext: view, "txt": (captions.get("orig") or "").encode()}
    if captions.get("syn") is not None:
        out["syn.txt"] = captions["syn"].encode()
    if original is not None:
        ext, data = original
        out[f"original.{ext}"] = data
    return out


def expected_shapes(record: Mapping, resolution: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """Member -> shape for a sample of `resolution` [H, W] under a conditioning record."""
    ae, ctx = record["autoencoder"], record["context"]
    te = record["text_encoders"]
    h, w = (int(r) // ae["downsample"] for r in resolution)
    shapes = {m: (ae["latent_channels"], h, w) for m in LATENT_MEMBERS}
    per = {"clip_l": (ctx["clip_length"], te["clip_l"]["width"]), "clip_l_pooled": (te["clip_l"]["pooled_width"],),
           "clip_g": (ctx["clip_length"], te["clip_g"]["width"]), "clip_g_pooled": (te["clip_g"]["pooled_width"],),
           "t5": (ctx["t5_length"], te["t5"]["width"])}
    for v in VARIANTS:
        for p in PARTS:
            shapes[f"{v}.{p}.npy"] = per[p]
    return shapes


def check_sample(sample: Mapping, record: Conditioning) -> dict:
    """Validate one raw sample (member name -> bytes, as webdataset yields it) against the record and
    return its parsed json. Raises ShardFormatError naming the shard, key and what differs."""
    where = f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}"
    if "json" not in sample:
        raise ShardFormatError(f"{where}: no json member")
    doc = json.loads(sample["json"])
    check_task(doc, where)
    if doc.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(f"{where}: format_version {doc.get('format_version')} != {FORMAT_VERSION}")
    if "conditioning" not in doc and not any(m in sample for m in array_members()):
        raise ShardFormatError(f"{where}: an images-only sample (the pipeline ran with [pipeline] outputs = "
                               "[\"images\"]): it has no latents or text encodings to train on; curate with "
                               "outputs = [\"sd3\"] (or both) for flowcurate train")
    if doc.get("conditioning") != record.hash:
        raise ShardFormatError(
            f"{where}: made with conditioning {doc.get('conditioning')}, but the run's conditioning record "
            f"{record.path} is {record.hash}: the shard was encoded with other text encoders / AE / widths")
    missing = [m for m in array_members() if m not in sample]
    if missing:
        raise ShardFormatError(f"{where}: missing members {missing}")
    return doc


def check_arrays(arrays: Mapping[str, np.ndarray], doc: Mapping, record: Conditioning, where: str = "") -> None:
    shapes = expected_shapes(record.json, doc["resolution"])
    for name, shape in shapes.items():
        if name not in arrays:  # readers may decode only the members they use
            continue
        a = arrays[name]
        if tuple(a.shape) != shape or a.dtype != np.dtype(record.json["store_dtype"]):
            raise ShardFormatError(f"{where}#{doc['key']}: {name} is {a.dtype}{list(a.shape)}, the conditioning "
                                   f"record says {record.json['store_dtype']}{list(shape)}")


# ------------------------------------------------------------------------------------------------------
# Conditioning record

@dataclass(frozen=True)
class Conditioning:
    json: dict
    arrays: dict[str, np.ndarray]
    hash: str
    path: str = ""

    @property
    def latent_channels(self) -> int:
        return self.json["autoencoder"]["latent_channels"]

    @property
    def context_width(self) -> int:
        return self.json["context"]["width"]

    @property
    def pooled_width(self) -> int:
        return self.json["context"]["pooled_width"]

    def prompt_parts(self, which: str) -> dict[str, np.ndarray]:
        """`empty` (1, ...) or `validation` (P, ...) encodings as float32 arrays per part."""
        return {p: self.arrays[f"{which}.{p}"].astype(np.float32) for p in PARTS}


def record_bytes(doc: Mapping) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def content_hash(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def record_files(doc: dict, arrays: Mapping[str, np.ndarray]) -> tuple[dict, dict[str, bytes], str]:
    """-> (the doc naming the npz's hash, {file name: bytes} in write order, the record's content hash).
    For writers that are not local paths (the pipeline writes through Beam's FileSystems)."""
    npz = npz_bytes(arrays)
    doc = {**doc, "arrays": {"file": RECORD_NPZ, "hash": content_hash(npz)}}
    data = record_bytes(doc)
    return doc, {RECORD_NPZ: npz, RECORD_JSON: data}, content_hash(data)


def write_record(out_dir: Path, doc: dict, arrays: Mapping[str, np.ndarray]) -> Conditioning:
    """Write conditioning.npz then conditioning.json (which names the npz's hash); return the record."""
    doc, files, digest = record_files(doc, arrays)
    for name, data in files.items():
        write_atomic(Path(out_dir) / name, data)
    return Conditioning(doc, {k: np.asarray(v) for k, v in arrays.items()}, digest, str(Path(out_dir) / RECORD_JSON))


def read_record(path: str | Path, task: str = TASK) -> Conditioning:
    """Read `conditioning.json` (or a folder holding it) and its npz; verify the npz's hash and that the
    record was made for `task`."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_JSON
    if not path.is_file():
        raise ShardFormatError(f"no conditioning record at {path}")
    data = path.read_bytes()
    doc = json.loads(data)
    check_task(doc, str(path), task)
    if doc.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(f"{path}: format_version {doc.get('format_version')} != {FORMAT_VERSION}")
    npz_path = path.with_name(doc["arrays"]["file"])
    npz = npz_path.read_bytes()
    if content_hash(npz) != doc["arrays"]["hash"]:
        raise ShardFormatError(f"{npz_path}: content hash differs from the one {path} records")
    with np.load(io.BytesIO(npz), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return Conditioning(doc, arrays, content_hash(data), str(path))


# ------------------------------------------------------------------------------------------------------
# Index

def index_doc(counts: Mapping[str, int], conditioning: str | None, outputs: Iterable[str] = ("sd3",)) -> dict:
    """`counts`: shard file name -> samples. Empty shards are never listed (nor written).

    `outputs`: what the samples hold (`[pipeline] outputs`); listed only when it is not the default
    `["sd3"]`, so sd3 indexes keep their bytes. Without "sd3", `conditioning` is None (no record).

    `shards` (name, split, samples) is what the trainer reads. `wids_version` + `shardlist` make the
    same file a dataset description for webdataset's indexed reader (`wids.ShardListDataset(
    "OUT/shards/index.json")`): the training shards only, so a wids user never trains on the
    validation split, with urls relative to the index (wids resolves them against its location, so
    OUT can be moved or copied to a bucket)."""
    listed = [(n, int(c)) for n, c in sorted(counts.items()) if c > 0]
    extra = {} if list(outputs) == ["sd3"] else {"outputs": list(outputs)}
    return {"format_version": FORMAT_VERSION, "conditioning": conditioning, **extra,
            "shards": [{"name": n, "split": n.split("-", 1)[0], "samples": c} for n, c in listed],
            "wids_version": WIDS_VERSION,
            "shardlist": [{"url": n, "nsamples": c} for n, c in listed if n.split("-", 1)[0] == "train"]}


def wids_docs(counts: Mapping[str, int]) -> dict[str, dict]:
    """File name -> webdataset `wids` dataset description of one split (`{split}.wids.json` beside the
    shards: `wids.ShardListDataset("OUT/shards/val.wids.json")`), for each split with samples. One flat
    list per split; urls relative to the description, as in `index_doc`."""
    out = {}
    for split in SPLITS:
        listed = [{"url": n, "nsamples": int(c)} for n, c in sorted(counts.items())
                  if c > 0 and n.split("-", 1)[0] == split]
        if listed:
            out[f"{split}{WIDS_SUFFIX}"] = {"wids_version": WIDS_VERSION, "shardlist": listed}
    return out


def write_index(shards_dir: Path, counts: Mapping[str, int], conditioning: str) -> dict:
    doc = index_doc(counts, conditioning)
    write_atomic(Path(shards_dir) / INDEX_JSON, record_bytes(doc))
    return doc


def read_index(shards_dir: Path, task: str = TASK) -> dict:
    path = Path(shards_dir) / INDEX_JSON
    if not path.is_file():
        raise ShardFormatError(f"no {INDEX_JSON} in {shards_dir}")
    doc = json.loads(path.read_text())
    check_task(doc, str(path), task)
    if doc.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(f"{path}: format_version {doc.get('format_version')} != {FORMAT_VERSION}")
    return doc


# ------------------------------------------------------------------------------------------------------
# Assembly (torch): what the MM-DiT sees

def assemble(parts: Mapping, keep: Mapping | None = None):
    """Stack per-encoder parts (torch tensors, batch first) as the reference does:
    context = concat_seq(pad_to_T5_width(concat_ch(clip_l, clip_g)), t5)  (B, 77 + L, Wt)
    pooled  = concat(clip_l_pooled, clip_g_pooled)                        (B, Wl' + Wg')
    `keep[role]` (B,) bool/float zeroes a dropped encoder's sequence and pooled parts (SD3 App. B.3)."""
    import torch
    import torch.nn.functional as F

    cl, cg, t5 = parts["clip_l"], parts["clip_g"], parts["t5"]
    pl, pg = parts["clip_l_pooled"], parts["clip_g_pooled"]
    if keep is not None:
        def m(role, x):
            k = torch.as_tensor(keep[role], dtype=x.dtype, device=x.device)
            return x * k.view(-1, *([1] * (x.dim() - 1)))
        cl, pl, cg, pg, t5 = m("clip_l", cl), m("clip_l", pl), m("clip_g", cg), m("clip_g", pg), m("t5", t5)
    clip = torch.cat([cl, cg], dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat([pl, pg], dim=-1)
