"""flowcurate.models.sscd: loading by path / cached URL / release name, preprocessing, embedding."""

import hashlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from flowcurate.models import sscd
from flowcurate.models.tiny.procedural import copy_variant, random_image


def test_preprocess_is_square_resize_and_imagenet_norm():
    img = Image.fromarray(np.full((30, 50, 3), (255, 0, 128), np.uint8))
    x = sscd.SSCDPreprocess(size=64)(img)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    expect = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(sscd.IMAGENET_MEAN)) / torch.tensor(sscd.IMAGENET_STD)
    assert torch.allclose(x[:, 10, 10], expect, atol=1e-5)
    assert sscd.SSCDPreprocess().record()["size"] == 320
    with pytest.raises(ValueError, match="RGB"):
        sscd.SSCDPreprocess()(img.convert("L"))


def test_resolve_names_urls_and_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWCURATE_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not cached"):
        sscd.resolve_sscd("sscd_disc_mixup")
    with pytest.raises(FileNotFoundError, match="release name"):
        sscd.resolve_sscd(str(tmp_path / "missing.pt"))
    # a URL already in the cache resolves without the network
    url = "https://example.invalid/models/my_sscd.torchscript.pt"
    cached = tmp_path / "sscd" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-my_sscd.torchscript.pt"
    cached.parent.mkdir()
    cached.write_bytes(b"x")
    assert sscd.resolve_sscd(url) == cached == sscd.cached_path(url)
    # ... but a cached release file is served only if it has the release's pinned digest: a corrupt
    # or substituted one is deleted, and offline there is nothing else to serve
    release = sscd.cached_path(sscd.RELEASE_URL.format(name="sscd_disc_mixup"))
    release.write_bytes(b"not the released file")
    with pytest.raises(FileNotFoundError, match="not cached"):
        sscd.resolve_sscd("sscd_disc_mixup")
    assert not release.exists()


def test_tiny_model_loads_by_path_and_cached_url(tiny_models, tmp_path, monkeypatch):
    path = tiny_models / "sscd.torchscript.pt"
    model = sscd.load_sscd(path)
    rng = np.random.default_rng(123)
    pre = sscd.SSCDPreprocess()
    img, _ = random_image(rng, 120, 90)
    other, _ = random_image(rng, 120, 90)
    batch = torch.stack([pre(img), pre(copy_variant(img, rng, "reencode")), pre(other)])
    e = sscd.embed(model, batch)
    assert e.shape == (3, 512) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0] @ e[1] > 0.75 > e[0] @ e[2]
    e16 = sscd.embed(model, batch, dtype=torch.bfloat16)  # reduced precision via autocast
    assert np.abs(e16 - e).max() < 0.05

    monkeypatch.setenv("FLOWCURATE_CACHE", str(tmp_path))
    url = "https://example.invalid/tiny.torchscript.pt"
    cached = tmp_path / "sscd" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-tiny.torchscript.pt"
    cached.parent.mkdir()
    shutil.copy(path, cached)
    assert np.allclose(sscd.embed(sscd.load_sscd(url), batch), e)
