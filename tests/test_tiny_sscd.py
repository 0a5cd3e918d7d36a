"""The tiny SSCD model: the released models' interface, and good enough to dedup the sample data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowcurate.models.tiny.procedural import COPY_KINDS, copy_variant, random_image
from flowcurate.models.tiny.sscd import EMBED_DIM, build_sscd, preprocess


@pytest.fixture(scope="module")
def sscd(tiny_models):
    return torch.jit.load(str(tiny_models / "sscd.torchscript.pt")).eval()


def test_separates_copies_from_unrelated_images(sscd):
    # Held out: the build trains on default_rng([seed, 0]) and reports on default_rng([seed, 1]).
    rng = np.random.default_rng(20250101)
    n = 100
    originals = [random_image(rng, int(w), int(h))[0] for w, h in rng.integers(64, 201, size=(n, 2))]
    kinds = [k for k in COPY_KINDS if k != "exact"]
    copies = [copy_variant(img, rng, kinds[i % len(kinds)]) for i, img in enumerate(originals)]
    with torch.no_grad():
        emb_o, emb_c = sscd(preprocess(originals)), sscd(preprocess(copies))
    copy_cos = (emb_o * emb_c).sum(1)
    unrelated = (emb_o @ emb_o.T)[torch.triu_indices(n, n, 1).unbind()]
    # thresholds: SSCD's 90 %-precision point (0.75) for copies; well under SD3's 0.5 for the rest
    assert (copy_cos > 0.75).float().mean() >= 0.95, copy_cos.sort().values[:10]
    assert (unrelated < 0.3).float().mean() >= 0.95, unrelated.sort().values[-10:]
    with torch.no_grad():  # an exact copy is the same image
        exact = sscd(preprocess([copy_variant(originals[0], rng, "exact")]))
    assert float(exact[0] @ emb_o[0]) > 0.999


def test_build_report_records_separation(tiny_models):
    report = json.loads((tiny_models / "tiny_report.json").read_text())["sscd"]
    assert report["copy_above_0.75"] >= 0.95
    assert report["unrelated_below_0.3"] >= 0.95


@pytest.mark.parametrize("size", [(320, 320), (150, 97)])
def test_released_model_interface(sscd, size):
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = sscd(x)
        alone = sscd(x[1:2])
    assert emb.shape == (3, EMBED_DIM) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(alone[0], emb[1], atol=1e-5, rtol=0)  # no batch statistics at inference


def test_build_is_deterministic_for_a_seed(tmp_path):
    kw = {"steps": 2, "originals": 16, "eval_originals": 4}
    reports = [build_sscd(tmp_path / f"{name}.pt", seed=seed, **kw)
               for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    a, b, c = (torch.jit.load(str(tmp_path / f"{name}.pt")).state_dict() for name in "abc")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["fc.weight"], c["fc.weight"])
    assert reports[0]["copy_above_0.75"] == reports[1]["copy_above_0.75"]
