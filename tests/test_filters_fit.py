"""`flowcurate filters fit`: a linear probe fitted (scikit-learn, cross-validated C) on the tiny CLIP's
embeddings of procedural images labelled by a visible property (a red shape) recovers it on held-out
images, and the head loads as a filter head (`tests/test_pipeline_scores.py` runs it in the pipeline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from flowcurate.cli.main import main
from flowcurate.formats.config import load_config
from flowcurate.models.tiny.clip import ensure_tiny_clip
from flowcurate.pipeline.filters import load_head
from flowcurate.pipeline.fit import embed_files, read_labels
from tests.pipeline_inputs import write_red_labels


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    labels = write_red_labels(root / "train", 320, seed=11)
    code = main(["filters", "fit", "--images", str(labels), "--config", "tiny", "--clip", "tiny://clip",
                 "--output", str(root / "red.safetensors")])
    assert code == 0
    return root


def test_probe_recovers_a_red_shape_on_held_out_images(fitted, capsys):
    report = json.loads((fitted / "red.json").read_text())
    assert report["held_out"] == 64 and report["auc"] > 0.95 and report["clip"] == "tiny://clip"
    assert 0 < report["precision"] <= 1 and 0 < report["recall"] <= 1
    # images the fit never saw, scored as the pipeline's filter scores them
    rows = read_labels(write_red_labels(fitted / "test", 200, seed=12))
    x, used = embed_files([p for p, _ in rows], str(ensure_tiny_clip(0)), load_config("tiny").pipeline)
    import torch

    with torch.no_grad():
        score = load_head(str(fitted / "red.safetensors"))(torch.from_numpy(x))[:, 0].numpy()
    y = np.array([rows[i][1] for i in used])
    assert len(used) == 200 and 0.1 < y.mean() < 0.9
    assert roc_auc_score(y, score) > 0.95


def test_labels_are_checked(tmp_path):
    (tmp_path / "a.csv").write_text("x.png,1\ny.png,1\n")
    with pytest.raises(ValueError, match="both labels"):
        read_labels(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("path,label\nx.png,1\ny.png,yes\n")
    with pytest.raises(ValueError, match="not 0 or 1"):
        read_labels(tmp_path / "b.csv")


def test_tiny_clip_batches_are_colour_twins():
    """The tiny CLIP's batches: pairs that differ in exactly one shape's colour, never a background
    colour, so captions within a batch cannot be told apart by the background."""
    from flowcurate.models.tiny.clip import scene_batch
    from flowcurate.models.tiny.procedural import caption

    scenes = scene_batch(np.random.default_rng(0), 64)
    assert len(scenes) == 64
    for a, b in zip(scenes[::2], scenes[1::2]):
        assert (a.background, a.bg_colors, a.bg_param) == (b.background, b.bg_colors, b.bg_param)
        changed = [(x, y) for x, y in zip(a.shapes, b.shapes) if x != y]
        assert len(changed) == 1 and len(a.shapes) == len(b.shapes)
        x, y = changed[0]
        assert x.color != y.color and (x.kind, x.cx, x.cy, x.r) == (y.kind, y.cx, y.cy, y.r)
        used = set(b.bg_colors) if b.background != "plain" else {b.bg_colors[0]}
        assert y.color not in used
        assert caption(a) != caption(b)
