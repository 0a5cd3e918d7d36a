"""Filter scores in the manifest: a `score_<name>` column per configured filter on every row it scored,
kept rows included; the built-in clip_score (a full CLIP's image-caption cosine, the tiny CLIP here)
scores the original caption in pass 1, where it filters before dedup, and the synthetic caption in
pass 2, where it is only recorded (`score_<name>_syn`)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import transformers

from flowcurate.cli.main import main
from flowcurate.models.tiny.clip import ensure_tiny_clip
from flowcurate.models.tiny.sample_data import write_sample_data
from flowcurate.pipeline.filters import (
    ClipScoreModelHandler,
    Filter,
    check_filters,
    embed_images,
    load_head,
    load_image_clip,
)
from flowcurate.pipeline.run import run
from flowcurate.pipeline.validate import validate
from tests.pipeline_inputs import read_manifest, write_red_labels

RESOLUTION = 64


@pytest.fixture(scope="module")
def clip() -> str:
    return str(ensure_tiny_clip(0))


def _views(data: Path) -> dict[str, tuple[np.ndarray, str | None]]:
    """Every input that validates: key -> (training view, original caption), as pass 1 sees them."""
    raw: dict = {}
    for tar in sorted((data / "raw").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, _, name = m.name.partition(".")
                raw.setdefault(key, {})[name] = tf.extractfile(m).read()
    out = {}
    for key, members in raw.items():
        image = next((v for n, v in members.items() if n in ("jpg", "png", "webp")), None)
        try:
            v = validate(image, resolution=RESOLUTION, min_size=32)
        except Exception:  # noqa: BLE001  (the planted broken inputs)
            continue
        out[key] = (v.image, members["txt"].decode() if "txt" in members else None)
    return out


def _score(clip: str, pairs: list) -> list:
    handler = ClipScoreModelHandler(clip, "cpu")
    return next(iter(handler.run_inference([pairs], handler.load_model())))


def test_clip_score_is_the_cosine_of_clips_embeddings(clip):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8) for _ in range(3)]
    texts = ["a red circle above a blue square", None, "a photo of a cat " * 30]  # the last one is cut at 77
    got = _score(clip, list(zip(images, texts)))
    assert got[1] is None
    model = transformers.CLIPModel.from_pretrained(clip).eval()
    processor = transformers.CLIPProcessor.from_pretrained(clip)
    with torch.no_grad():
        img = model.get_image_features(**processor(images=[images[0], images[2]], return_tensors="pt"))
        txt = model.get_text_features(**processor(text=[texts[0], texts[2]], return_tensors="pt", padding="max_length",
                                                  truncation=True, max_length=77))
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
    want = torch.nn.functional.cosine_similarity(img, txt).tolist()
    np.testing.assert_allclose([got[0], got[2]], want, rtol=1e-4, atol=1e-5)
    # a score does not depend on the other captions of its chunk
    assert abs(_score(clip, [(images[0], texts[0])])[0] - got[0]) < 1e-5


def test_filter_config_is_checked():
    with pytest.raises(ValueError, match="no head"):
        check_filters([Filter("x", "c", min=0.0)])
    with pytest.raises(ValueError, match="kind"):
        check_filters([{"name": "x", "clip": "c", "kind": "nope"}])
    with pytest.raises(ValueError, match="column twice"):
        check_filters([Filter("a", "c", kind="clip_score"), Filter("a_syn", "c", "h", min=0.0)])
    assert check_filters([Filter("c", "c", kind="clip_score")])  # a clip_score may only record


@pytest.fixture(scope="module")
def scored(tmp_path_factory, clip):
    root = tmp_path_factory.mktemp("scores")
    write_sample_data(root / "data", n=48, seed=7)
    views = _views(root / "data")
    keys = sorted(views)
    scores = dict(zip(keys, _score(clip, [views[k] for k in keys])))
    cut = float(np.quantile([s for s in scores.values() if s is not None], 0.3))
    # a probe head fitted by `flowcurate filters fit` (a red shape): here it only records (no bound is hit)
    assert main(["filters", "fit", "--images", str(write_red_labels(root / "labelled", 160, seed=3)),
                 "--config", "tiny", "--clip", "tiny://clip", "--output", str(root / "head.safetensors")]) == 0
    (root / "c.toml").write_text(f"""[models]
sd3 = "tiny://sd3"
sscd = "tiny://sscd.torchscript.pt"
captioner = "tiny://captioner"
[pipeline]
resolution = {RESOLUTION}
min_size = 32
val_fraction = 0.2
shard_size = 16
batch_size = 8
caption_max_new_tokens = 8
filters = [{{name = "clip", kind = "clip_score", clip = "tiny://clip", min = {cut!r}}},
           {{name = "probe", clip = "tiny://clip", head = "{root / 'head.safetensors'}", min = -1e9}}]
[dedup]
threshold = 0.75
""")
    stats = run(["--input", str(root / "data" / "raw" / "*.tar"), "--output", str(root / "out"),
                 "--config", str(root / "c.toml")], log=lambda *a, **k: None)
    return root, views, scores, cut, stats


def test_scores_are_columns_of_every_scored_row(scored, clip):
    root, views, scores, cut, _ = scored
    names = pq.read_schema(next((root / "out" / "manifest").glob("*.parquet"))).names
    assert {"score_clip", "score_probe", "score_clip_syn"} <= set(names)
    rows = read_manifest(root / "out")
    for key, r in rows.items():
        if "~" in key:  # a repeated key: another input than the one `views` holds under it
            continue
        if key not in views:  # never decoded: no filter saw it
            assert r["score_clip"] is None and r["score_probe"] is None
            continue
        want = scores[key]
        assert (r["score_clip"] is None) == (want is None), key
        if want is not None:
            assert abs(r["score_clip"] - want) < 1e-4, key
        if r["reason"] == "filtered:clip":
            assert want < cut and r["score_probe"] is None  # the second filter never saw it
        else:
            assert want is None or want >= cut
            assert r["score_probe"] is not None  # kept and duplicate rows carry every score
    kept = [r for r in rows.values() if r["status"] == "kept"]
    assert kept and all(r["score_probe"] is not None for r in kept)
    # the fitted head's scores are what it gives on the training view
    some = [k for k in sorted(rows) if k in views and rows[k]["score_probe"] is not None][:5]
    processor, model = load_image_clip(clip)
    with torch.no_grad():
        want = load_head(str(root / "head.safetensors"))(embed_images(processor, model, [views[k][0] for k in some]))
    np.testing.assert_allclose([rows[k]["score_probe"] for k in some], want[:, 0].tolist(), rtol=1e-4, atol=1e-4)
    assert any(r["reason"] == "filtered:clip" for r in rows.values())


def test_clip_score_filters_before_dedup(scored):
    root, *_ = scored
    rows = read_manifest(root / "out")
    dups = [r for r in rows.values() if r["status"] == "duplicate"]
    assert dups and all(rows[r["duplicate_of"]]["status"] == "kept" for r in dups)


def test_synthetic_caption_score_is_recorded_not_filtering(scored, clip):
    root, views, _, cut, _ = scored
    rows = read_manifest(root / "out")
    kept = {k: r for k, r in rows.items() if r["status"] == "kept"}
    assert all(r["score_clip_syn"] is not None for r in kept.values())
    assert all(r["score_clip_syn"] is None for r in rows.values() if r["status"] != "kept")
    some = sorted(kept)[:4]
    # pass 2 scores the view it re-decodes: the same pixels pass 1 scored
    want = _score(clip, [(views[k.split("~")[0]][0], kept[k]["caption_synthetic"]) for k in some])
    np.testing.assert_allclose([kept[k]["score_clip_syn"] for k in some], want, rtol=1e-4, atol=1e-4)
