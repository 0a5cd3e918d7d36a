"""The conditioning record computed from loaded models: which autoencoder and text encoders made the
shards' arrays (source, revision, content hash, dtype, widths) and the encodings of the empty and
validation prompts. The record's file format lives in `flowcurate.formats.shards`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from flowcurate.formats.shards import FORMAT_VERSION, PARTS, Conditioning, ShardFormatError, write_record
from flowcurate.models.text_encoders import CLIP_LENGTH, ROLES


def folder_hash(source: str, subfolder: str, revision: str | None = None) -> str:
    """Content hash of a model folder's files (a local folder or a hub snapshot already in the cache)."""
    root = Path(source)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(source, revision=revision, allow_patterns=[f"{subfolder}/*"]))
    h = hashlib.sha256()
    for f in sorted(p for p in (root / subfolder).rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def make_record(out_dir: Path, source: str, autoencoder, encoders, **kw) -> Conditioning:
    """`record_parts`, written to `out_dir`."""
    return write_record(out_dir, *record_parts(source, autoencoder, encoders, **kw))


def record_parts(source: str, autoencoder, encoders, *, revision: str | None = None,
                 store_dtype: str = "float16", validation_prompts: Iterable[str] = (),
                 ae_dtype: str = "float32", te_dtype: str = "float32",
                 label: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Describe the loaded `flowcurate.models.autoencoder.Autoencoder` and `flowcurate.models.text_encoders.TextEncoders`
    (both from the folder or hub id `source`) and encode the empty and validation prompts -> the
    record's (doc, arrays). `label` is what the record names as the source when it differs from the
    resolved path (`tiny://sd3`: portable across machines; the content hashes pin the exact weights)."""
    widths = encoders.widths()
    prompts = list(validation_prompts)
    tes = {}
    for role, sub, tok in ROLES:
        tes[role] = {"source": label or str(source), "subfolder": sub, "tokenizer": tok, "revision": revision,
                     "content_hash": folder_hash(source, sub, revision), "dtype": te_dtype,
                     "width": widths[role],
                     "max_length": encoders.t5_length if role == "t5" else CLIP_LENGTH}
        if role != "t5":
            tes[role]["pooled_width"] = widths[f"{role}_pooled"]
    if widths["clip_l"] + widths["clip_g"] > widths["t5"]:
        raise ShardFormatError(f"CLIP-L + CLIP-G widths {widths['clip_l']} + {widths['clip_g']} exceed the T5 "
                               f"width {widths['t5']}: the reference zero-pads CLIP to the T5 width")
    doc = {
        "format_version": FORMAT_VERSION,
        "autoencoder": {"source": label or str(source), "subfolder": "vae", "revision": revision,
                        "content_hash": folder_hash(source, "vae", revision), "dtype": ae_dtype,
                        "scaling_factor": autoencoder.scaling_factor, "shift_factor": autoencoder.shift_factor,
                        "latent_channels": autoencoder.latent_channels, "downsample": autoencoder.downsample},
        "text_encoders": tes,
        "store_dtype": store_dtype,
        "context": {"clip_length": CLIP_LENGTH, "t5_length": encoders.t5_length,
                    "length": CLIP_LENGTH + encoders.t5_length, "width": widths["t5"],
                    "pooled_width": widths["clip_l_pooled"] + widths["clip_g_pooled"]},
        "prompts": {"empty": "", "validation": prompts},
    }
    arrays = {}
    for which, batch in (("empty", [""]), ("validation", prompts)):
        if not batch:
            continue
        enc = encoders.encode(batch)
        arrays.update({f"{which}.{p}": enc[p].astype(store_dtype) for p in PARTS})
    return doc, arrays
