"""A copy of a non-square original's training crop is found: `flowcurate run` curates a 2:1 original
(three different pictures side by side; the training crop is the middle one), and the crop itself,
taken as a generation, is retrieved by the memorization check's scoring (trainer/curated.py's training
set, `sscd_embed`, `Nearest`) as that original, against the crop descriptors pass 2 wrote. Against the
whole original's descriptor (the view older outputs fall back to) the same copy scores below the
flagging threshold.

A generation equal to the training crop is what a model that memorized the image produces; feeding
it straight to the scoring keeps this to one small pipeline run instead of training a model.
"""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from flowcurate.models.tiny import procedural

RESOLUTION = 64
WIDE = "wide"  # the 2:1 original's key


@pytest.fixture(scope="module")
def curated(tiny_models, tmp_path_factory):
    """OUT of `flowcurate run` on one 2:1 original and five square ones (image files)."""
    from flowcurate.pipeline.run import run

    root = tmp_path_factory.mktemp("crop")
    raw = root / "raw"
    raw.mkdir()
    rng = np.random.default_rng(5)
    wide = Image.new("RGB", (2 * RESOLUTION, RESOLUTION))
    for x, (img, _) in zip((0, RESOLUTION // 2, 3 * RESOLUTION // 2),
                           (procedural.random_image(rng, RESOLUTION // 2, RESOLUTION),
                            procedural.random_image(rng, RESOLUTION),
                            procedural.random_image(rng, RESOLUTION // 2, RESOLUTION))):
        wide.paste(img, (x, 0))
    wide.save(raw / f"{WIDE}.png")
    (raw / f"{WIDE}.txt").write_text("three pictures side by side")
    for i in range(5):
        img, cap = procedural.random_image(rng, RESOLUTION)
        img.save(raw / f"square{i}.png")
        (raw / f"square{i}.txt").write_text(cap)
    out = root / "out"
    run(["--input", str(raw), "--output", str(out), "--config", "tiny", "--val_fraction", "0",
         "--resolution", str(RESOLUTION)], log=lambda *a, **k: None)
    return out, wide


def training_crop(out, key: str, original: Image.Image) -> tuple[np.ndarray, list[int]]:
    """The training image of `key` as pass 2 made it: the shard json's crop box, resized to the
    resolution (validate's resize), (H, W, 3) uint8; and the box."""
    for shard in sorted((out / "shards").glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            if f"{key}.json" in names:
                doc = json.loads(tar.extractfile(f"{key}.json").read())
                box = doc["crop"]
                img = original.resize(tuple(doc["resolution"][::-1]), Image.Resampling.BICUBIC, box=tuple(box),
                                      reducing_gap=None)
                return np.asarray(img, np.uint8), box
    raise KeyError(key)


def test_a_copy_of_a_non_square_originals_crop_is_found_with_the_crop_view(curated, tmp_path):
    from flowcurate.models.sscd import load_sscd
    from flowcurate.trainer.curated import read_curated
    from flowcurate.trainer.memorization import THRESHOLD, Nearest, sscd_embed

    out, wide = curated
    cur = read_curated(out)
    assert cur.view == "crop" and WIDE in cur.keys and len(cur.keys) == 6
    generation, box = training_crop(out, WIDE, wide)
    assert box == [RESOLUTION // 2, 0, 3 * RESOLUTION // 2, RESOLUTION]  # the middle picture
    model = load_sscd(cur.sscd_location)
    query = sscd_embed(model, cur.preprocess, generation[None])
    idx, sim = Nearest(cur.embeddings)(query)
    assert cur.keys[idx[0]] == WIDE and sim[0] > 0.95, (cur.keys[idx[0]], sim)

    # the whole-original view (an output without crop descriptors): the same copy scores lower
    old = tmp_path / "old"
    shutil.copytree(out, old)
    shutil.rmtree(old / "crop_embeddings")
    whole = read_curated(old)
    assert whole.view == "original" and whole.keys == cur.keys
    row = cur.keys.index(WIDE)
    sim_whole = float(query[0].astype(np.float64) @ whole.embeddings[row])
    # measured: 1.000 against the crop, 0.329 against the whole original: below SD3's threshold (0.5),
    # so with the whole-original view this copy would not be flagged at all
    assert sim_whole < THRESHOLD < sim[0], (sim_whole, sim[0])
