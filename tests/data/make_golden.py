"""Regenerate the golden curated-shard fixture in tests/data/golden/ from the tiny models.

    python tests/data/make_golden.py            # writes tests/data/golden/

The fixture pins the shard format (docs/architecture.md "Data contracts") for the trainer's reader and the
pipeline's round-trip test: conditioning.json/.npz, shards/train-000000.tar, shards/val-000000.tar and
shards/index.json, written through `flowcurate.formats.shards` exactly as the pipeline writes them. Eight samples:
six 64x64 and two 48x64 (H x W), so aspect buckets are exercised. Regenerate it only when the format
changes (the record's content hashes then change too), and commit the result.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from flowcurate.formats import shards
from flowcurate.formats.files import write_atomic
from flowcurate.models.autoencoder import Autoencoder
from flowcurate.models.conditioning import make_record
from flowcurate.models.text_encoders import TextEncoders
from flowcurate.models.tiny import ensure_tiny_models, procedural

ROOT = Path(__file__).resolve().parents[2]

VAL_FRACTION = 0.25
VALIDATION_PROMPTS = ["a red circle above a blue square", "a yellow triangle on a green background"]


def main(out: Path = ROOT / "tests" / "data" / "golden", n: int = 8, odd: tuple[int, ...] = (2, 5),
         val_fraction: float = VAL_FRACTION, size: int = 64) -> None:
    """Write n samples (indices in `odd` at 48x64) to `out`; tests call it for fresh fixtures."""
    sd3 = ensure_tiny_models() / "sd3"
    ae, te = Autoencoder.load(str(sd3)), TextEncoders.load(str(sd3), t5_length=77)
    if out.exists():
        shutil.rmtree(out)
    record = make_record(out, str(sd3), ae, te, validation_prompts=VALIDATION_PROMPTS, label="tiny://sd3")
    rng = np.random.default_rng(0)
    samples: dict[str, list] = {"train": [], "val": []}
    keys = [f"{i:09d}" for i in range(1, n + 1)]
    for i, key in enumerate(keys):
        h, w = (size * 3 // 4, size) if i in odd else (size, size)
        img, orig = procedural.random_image(rng, w, h)
        syn = f"A simple drawing: {orig}, in flat colours."
        mean, logvar = ae.encode([np.asarray(img)])
        enc = {v: te.encode([c]) for v, c in (("orig", orig), ("syn", syn))}
        meta = {"source": f"golden/raw-000000.tar#{key}.jpg", "width": w, "height": h, "crop": [0, 0, w, h],
                "resolution": [h, w], "caption": {"orig": orig, "syn": syn}}
        sample = shards.encode_sample(key, mean[0], logvar[0], {v: {p: e[p][0] for p in shards.PARTS}
                                                               for v, e in enc.items()}, meta, record.hash)
        samples[shards.split_of(key, val_fraction)].append(sample)
    counts = {}
    for split, items in samples.items():
        if not items:
            continue
        name = shards.shard_name(split, 0)
        write_atomic(out / "shards" / name, shards.tar_bytes(items))
        counts[name] = len(items)
    shards.write_index(out / "shards", counts, record.hash)
    print(f"wrote {out}: {counts}, conditioning {record.hash}")


if __name__ == "__main__":
    main()
