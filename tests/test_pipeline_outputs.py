"""`[pipeline] outputs`: "images" shards in img2dataset's layout that webdataset (`.decode("pil")`) and
wids (`{split}.wids.json`) read; a run with `captioner = ""` and `outputs = ["images"]` loads no VLM,
autoencoder or text encoder; both outputs in one sample still train; the trainer refuses images-only
shards by name; pass 2's finished-file records are named by the outputs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from flowcurate.formats.shards import RECORD_JSON, ShardFormatError, check_sample, read_index
from flowcurate.models.tiny.sample_data import write_sample_data
from flowcurate.pipeline.run import run
from tests.pipeline_inputs import read_manifest, read_shards

N = 40
LOADERS = (("flowcurate.captioning.captioner", "Captioner"), ("flowcurate.models.autoencoder", "Autoencoder"),
           ("flowcurate.models.text_encoders", "TextEncoders"))


def _config(path: Path, models: str, pipeline: str) -> Path:
    path.write_text(f"""[models]
sscd = "tiny://sscd.torchscript.pt"
{models}
[pipeline]
resolution = 64
min_size = 32
val_fraction = 0.25
shard_size = 8
batch_size = 8
caption_max_new_tokens = 8
{pipeline}
[dedup]
threshold = 0.75
""")
    return path


def _inputs(data: Path) -> dict[str, dict[str, bytes]]:
    """The raw tars: key -> member name -> bytes."""
    out: dict = {}
    for tar in sorted((data / "raw").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, _, name = m.name.partition(".")
                out.setdefault(key, {})[name] = tf.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def images_only(tmp_path_factory):
    """captioner = "", outputs = ["images"], and an SD3 location that does not exist: with any of the
    three loaders called (they are made to raise and say so), items would become failed:* rows."""
    root = tmp_path_factory.mktemp("images")
    write_sample_data(root / "data", n=N, seed=5)
    cfg = _config(root / "c.toml", 'sd3 = "/nonexistent/sd3"\ncaptioner = ""', 'outputs = ["images"]')
    loaded: list[str] = []
    mp = pytest.MonkeyPatch()
    for module, name in LOADERS:
        def refuse(*a, _name=name, **k):
            loaded.append(_name)
            raise RuntimeError(f"{_name} must not load in an images-only run without a captioner")
        mp.setattr(f"{module}.{name}.load", refuse)
    try:
        stats = run(["--input", str(root / "data" / "raw" / "*.tar"), "--output", str(root / "out"),
                     "--config", str(cfg)], log=lambda *a, **k: None)
    finally:
        mp.undo()
    return root, stats, loaded


def test_images_only_run_loads_no_captioner_autoencoder_or_text_encoder(images_only):
    root, stats, loaded = images_only
    assert loaded == []
    rows = read_manifest(root / "out")
    assert not [r for r in rows.values() if (r["reason"] or "").startswith("failed:")]
    kept = {k: r for k, r in rows.items() if r["status"] == "kept"}
    assert len(kept) >= N // 2 and stats["status"]["kept"] == len(kept)
    assert not (root / "out" / RECORD_JSON).exists() and stats["captioner"] is None
    inputs = _inputs(root / "data")
    for key, r in kept.items():  # the original captions are kept as read; nothing is synthetic
        assert r["caption_synthetic"] is None
        assert r["caption_original"] == (inputs[key]["txt"].decode() if "txt" in inputs[key] else None)
    index = read_index(root / "out" / "shards")
    assert index["outputs"] == ["images"] and index["conditioning"] is None


def test_images_only_shards_decode_in_webdataset(images_only):
    root, _, _ = images_only
    rows = read_manifest(root / "out")
    seen = {}
    for tar in sorted((root / "out" / "shards").glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False).decode("pil"):
            key = sample["__key__"]
            assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"jpg", "txt", "json"}
            assert isinstance(sample["jpg"], Image.Image) and sample["jpg"].size == (64, 64)
            doc = sample["json"]
            assert doc["key"] == key and "conditioning" not in doc and doc["resolution"] == [64, 64]
            assert sample["txt"] == (rows[key]["caption_original"] or "") == doc["caption"]["orig"]
            assert doc["caption"]["syn"] is None and rows[key]["shard"] == tar.name
            seen[key] = sample
    assert set(seen) == {k for k, r in rows.items() if r["status"] == "kept"}


def test_each_split_has_a_wids_description(images_only, tmp_path):
    wids = pytest.importorskip("wids")
    root, _, _ = images_only
    shards = root / "out" / "shards"
    index = read_index(shards)
    for split in ("train", "val"):
        desc = json.loads((shards / f"{split}.wids.json").read_text())
        listed = [s for s in index["shards"] if s["split"] == split]
        assert desc == {"wids_version": 1, "shardlist": [{"url": s["name"], "nsamples": s["samples"]} for s in listed]}
        ds = wids.ShardListDataset(str(shards / f"{split}.wids.json"), cache_dir=str(tmp_path / split),
                                   transformations=[lambda s: s])
        assert len(ds) == sum(s["samples"] for s in listed) > 0
        keys = set()
        for i in range(len(ds)):
            sample = ds[i]
            image = Image.open(sample[".jpg"])
            assert image.size == (64, 64) and json.load(sample[".json"])["key"] == sample["__key__"]
            keys.add(sample["__key__"])
        assert len(keys) == len(ds)


def test_trainer_refuses_images_only_shards(images_only):
    from flowcurate.trainer.data import DataError, resolve_shards

    root, _, _ = images_only
    with pytest.raises(DataError, match="images only"):
        resolve_shards(str(root / "out"))
    tar = next((root / "out" / "shards").glob("train-*.tar"))
    sample = next(iter(wds.WebDataset(str(tar), shardshuffle=False)))
    with pytest.raises(ShardFormatError, match="images-only sample"):
        check_sample(sample, None)


def test_both_outputs_in_one_sample_with_originals(tmp_path):
    """outputs = ["sd3", "images"], PNG views and the originals' bytes: the trainer reads the arrays,
    the PNG is the exact training view the autoencoder saw, the original is the input's bytes."""
    from flowcurate.trainer.data import CuratedShards, open_record, resolve_shards

    write_sample_data(tmp_path / "data", n=24, seed=6)
    cfg = _config(tmp_path / "c.toml", 'sd3 = "tiny://sd3"\ncaptioner = "tiny://captioner"',
                  'outputs = ["sd3", "images"]\nimage_format = "png"\nkeep_original = true')
    run(["--input", str(tmp_path / "data" / "raw" / "*.tar"), "--output", str(tmp_path / "out"),
         "--config", str(cfg)], log=lambda *a, **k: None)
    rows = read_manifest(tmp_path / "out")
    inputs = _inputs(tmp_path / "data")
    samples = {k: s for shard in read_shards(tmp_path / "out").values() for k, s in shard.items()}
    assert set(samples) == {k for k, r in rows.items() if r["status"] == "kept"} and samples
    for key, s in samples.items():
        ext = next(n for n in inputs[key] if n not in ("txt", "json"))
        assert s[f"original.{ext}"] == inputs[key][ext]
        assert s["syn.txt"].decode() == rows[key]["caption_synthetic"]
        assert np.asarray(Image.open(io.BytesIO(s["png"]))).shape == (64, 64, 3)
        assert "latent_mean.npy" in s and "conditioning" in json.loads(s["json"])
    assert read_index(tmp_path / "out" / "shards")["outputs"] == ["sd3", "images"]
    urls, record_path = resolve_shards(str(tmp_path / "out"), "train")
    batch = next(iter(CuratedShards(urls, open_record(record_path, urls), 2, seed=0, shuffle_buffer=2)))
    assert batch["latents"].shape[0] == 2


def test_pass2_records_are_named_by_the_outputs(tmp_path):
    """A rerun with other outputs must not reuse a finished file's parts: the digest names them."""
    from flowcurate.models.sscd import SSCDPreprocess
    from flowcurate.pipeline.handlers import SSCDModelHandler
    from flowcurate.pipeline.pass2 import Pass2, Pass2Settings
    from flowcurate.pipeline.read import InputFile
    from flowcurate.pipeline.records import Kept

    def done(**kw):
        s = Pass2Settings(out=str(tmp_path), resolution=64, min_size=32, max_aspect=3.0, max_pixels=10**8,
                          buckets=None, chunk=8, shard_size=8, store_dtype="float16", captioner=None,
                          encoder=None, sscd=SSCDModelHandler("x", SSCDPreprocess(64)), **kw)
        kept = [Kept(5, "k", "s", "sha256:0", 64, 64, 0, "train")]
        return Pass2(s)._done_path(0, kept, [InputFile(str(tmp_path / "a.tar"), str(tmp_path))], {}, None)

    names = {done(), done(images=("jpg", 95, False)), done(images=("png", 95, False)),
             done(images=("jpg", 95, True))}
    assert len(names) == 4
