"""pipeline/filters.py: a tiny random CLIP + user heads score as a direct computation does, and the
filters in pass 1 (FnApiRunner) keep, reject (`filtered:<name>`) and dead-letter (`failed:filter:<name>`)
every input exactly once, before any dedup."""

from __future__ import annotations

import io
import pickle
import tarfile
import tempfile
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import torch
import transformers
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from PIL import Image
from safetensors.torch import save_file

from flowcurate.formats.manifest import is_reason
from flowcurate.models.sscd import SSCDPreprocess
from flowcurate.models.tiny import ensure_tiny_models
from flowcurate.pipeline.filters import Filter, ScoreModelHandler, check_filters, load_head
from flowcurate.pipeline.pass1 import Pass1, Pass1Settings
from flowcurate.pipeline.read import InputFile
from flowcurate.pipeline.validate import validate


def _images(n: int, colour: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.integers(0, 60, (32, 40, 3))
        x[..., colour] += 180
        out.append(x.astype(np.uint8))
    return out


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class Sample:
    """An input image as the pass sees it: key, png bytes, the validated 32x32 training view, sizes."""

    def __init__(self, key: str, image: np.ndarray):
        self.key, self.png = key, _png(image)
        v = validate(self.png, resolution=32, min_size=16)
        self.image, self.width, self.height = v.image, v.width, v.height


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
    transformers.CLIPVisionModelWithProjection(cfg).save_pretrained(d)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


def _embed(clip_dir, images) -> torch.Tensor:
    """The direct computation: processor -> image_embeds -> L2 normalise."""
    processor = transformers.CLIPImageProcessor.from_pretrained(clip_dir)
    model = transformers.CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        e = model(**processor(images=images, return_tensors="pt")).image_embeds
    return e / e.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def data(clip_dir):
    red = [Sample(f"r{i:02d}", im) for i, im in enumerate(_images(6, 0, 1))]
    blue = [Sample(f"b{i:02d}", im) for i, im in enumerate(_images(5, 2, 2))]
    return red, blue


@pytest.fixture(scope="module")
def probe(clip_dir, data, tmp_path_factory) -> Path:
    """A single Linear(16 -> 1): the red-minus-blue mean embedding, biased so 0 splits them."""
    red, blue = data
    er, eb = _embed(clip_dir, [a.image for a in red]), _embed(clip_dir, [a.image for a in blue])
    w = er.mean(0) - eb.mean(0)
    sr, sb = er @ w, eb @ w
    assert sr.min() > sb.max()  # the tiny CLIP separates them
    path = tmp_path_factory.mktemp("head") / "probe.safetensors"
    save_file({"weight": w[None].contiguous(), "bias": -((sr.min() + sb.max()) / 2)[None]}, str(path))
    return path


def _score(handler, items):
    model = handler.load_model()
    (out,) = handler.run_inference([[a.image for a in items]], model)
    return out


def test_probe_scores_equal_the_direct_computation(clip_dir, data, probe):
    red, blue = data
    items = red + blue
    got = _score(ScoreModelHandler(str(clip_dir), str(probe), "cpu"), items)
    head = load_head(str(probe))
    want = head(_embed(clip_dir, [a.image for a in items]))[:, 0].tolist()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert all(s > 0 for s in got[:len(red)]) and all(s < 0 for s in got[len(red):])


def test_laion_mlp_head_loads_and_scores(clip_dir, data, tmp_path):
    # improved-aesthetic-predictor's layer names (Linear at 0/2/4/6/7, Dropouts between), sizes scaled down
    torch.manual_seed(1)
    sizes = [16, 24, 12, 8, 4, 1]
    mlp = {}
    for idx, (i, o) in zip((0, 2, 4, 6, 7), zip(sizes, sizes[1:])):
        mlp[f"layers.{idx}.weight"], mlp[f"layers.{idx}.bias"] = torch.randn(o, i), torch.randn(o)
    path = tmp_path / "mlp.pth"
    torch.save(mlp, path)
    head = load_head(str(path))
    assert [m.in_features for m in head] == sizes[:-1]
    items = data[0][:3]
    got = _score(ScoreModelHandler(str(clip_dir), str(path), "auto"), items)
    x = _embed(clip_dir, [a.image for a in items])
    for idx in (0, 2, 4, 6, 7):  # LAION's MLP has no activations; Dropout is the identity at inference
        x = x @ mlp[f"layers.{idx}.weight"].T + mlp[f"layers.{idx}.bias"]
    np.testing.assert_allclose(got, x[:, 0].tolist(), rtol=1e-4, atol=1e-5)


def test_bad_heads_are_refused(tmp_path):
    save_file({"a.weight": torch.zeros(4, 16), "b.weight": torch.zeros(1, 5)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="chain"):
        load_head(str(tmp_path / "x.safetensors"))
    save_file({"weight": torch.zeros(2, 16)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ValueError, match="one score"):
        load_head(str(tmp_path / "y.safetensors"))
    with pytest.raises(ValueError, match="neither"):
        check_filters([Filter("x", "c", "h")])
    with pytest.raises(ValueError, match="repeat"):
        check_filters([Filter("x", "c", "h", min=0), {"name": "x", "clip": "c", "head": "h", "max": 1}])


def _run(items, filters, batch_size=4):
    """Pass 1 with `filters` over a tar of `items` -> kept items, rejected rows (as items), score metrics."""
    out = Path(tempfile.mkdtemp())
    with tarfile.open(out / "in.tar", "w") as tar:
        for a in items:
            info = tarfile.TarInfo(f"{a.key}.png")
            info.size = len(a.png)
            tar.addfile(info, io.BytesIO(a.png))
    s = Pass1Settings(resolution=32, min_size=16, max_aspect=3.0, max_pixels=10**8, buckets=None,
                      sscd_location=str(ensure_tiny_models(0) / "sscd.torchscript.pt"),
                      sscd_preprocess=SSCDPreprocess(64), chunk=batch_size, device="cpu", filters=tuple(filters))
    p = TestPipeline(runner="FnApiRunner")
    (p | beam.Create([(0, InputFile(str(out / "in.tar"), str(out)))]) | beam.ParDo(Pass1(s)) | beam.combiners.ToList()
     | beam.Map(lambda xs, f=str(out / "items"): Path(f).write_bytes(pickle.dumps(xs))))
    result = p.run()
    result.wait_until_finish()
    items_out = pickle.loads((out / "items").read_bytes())
    got = {"kept": [it for it in items_out if it.reason is None],
           "rejected": [it for it in items_out if it.reason is not None]}
    got["scores"] = {d.key.metric.name: d.committed for d in result.metrics().query(
        MetricsFilter().with_namespace("flowcurate_filters"))["distributions"]}
    return got


def test_filters_in_pass1_keep_red_and_reject_blue(clip_dir, data, probe):
    red, blue = data
    items = (red + blue)[::-1]
    red_scores = load_head(str(probe))(_embed(clip_dir, [a.image for a in red]))[:, 0].tolist()
    cut = float(np.median(red_scores))  # a second filter, run on what the first kept, drops the top reds
    high = {a.key for a, s in zip(red, red_scores) if s > cut}
    got = _run(items, [Filter("aesthetic", str(clip_dir), str(probe), min=0.0, device="cpu"),
                       Filter("nsfw", str(clip_dir), str(probe), max=cut)])
    assert sorted(a.key for a in got["kept"]) == sorted(a.key for a in red if a.key not in high)
    rows = {r.key: r for r in got["rejected"]}
    assert len(rows) == len(got["rejected"]) == len(blue) + len(high)
    assert {k: r.reason for k, r in rows.items()} == {
        **{a.key: "filtered:aesthetic" for a in blue}, **{k: "filtered:nsfw" for k in high}}
    assert got["scores"]["aesthetic"].count == len(items) and got["scores"]["nsfw"].count == len(red)
    assert abs(got["scores"]["nsfw"].max - round(max(red_scores) * 1000)) <= 1  # batches differ from here
    assert all((rows[a.key].width, rows[a.key].height) == (a.width, a.height) for a in blue)
    # every score is on the item's record, in filter order; filtered items have no SSCD descriptor
    assert all([n for n, _ in it.scores] == ["aesthetic", "nsfw"] for it in got["kept"])
    assert all(rows[a.key].embedding is None and [n for n, _ in rows[a.key].scores] == ["aesthetic"] for a in blue)
    assert is_reason("filtered:aesthetic")


def test_missing_head_becomes_failed_rows(clip_dir, data, tmp_path):
    items = data[0] + data[1]
    got = _run(items, [Filter("aesthetic", str(clip_dir), str(tmp_path / "nope.safetensors"), min=0.0)])
    assert not got["kept"]
    assert sorted((r.key, r.reason) for r in got["rejected"]) == sorted(
        (a.key, "failed:filter:aesthetic") for a in items)
    assert is_reason("failed:filter:aesthetic")


def test_no_filters_pass_everything(data):
    got = _run(data[0], [])
    assert sorted(a.key for a in got["kept"]) == sorted(a.key for a in data[0]) and got["rejected"] == []
