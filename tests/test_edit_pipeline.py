"""Curating edit triplets with `flowcurate run --task edit`: InstructPix2Pix-layout Parquet (and tars)
in, editing shards out. Every triplet is accounted for (planted copies, unchanged edits, missing parts,
size mismatches, undecodable images); both images share one crop box; the source latent is the AE
posterior of the cropped source; no captioner loads; the editing trainer takes the shards and the
text-to-image trainer refuses them."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flowcurate.cli.main import main as flowcurate
from flowcurate.formats import edit_shards as E
from flowcurate.formats import shards as S
from flowcurate.formats.config import ConfigError, PipelineConfig
from flowcurate.formats.images import ImageRejected
from flowcurate.models.autoencoder import Autoencoder
from flowcurate.models.tiny.edit_triplets import EDIT_PLANTS, write_edit_data
from flowcurate.pipeline.options import OptionsError
from flowcurate.pipeline.read import EditNames, read_tar
from flowcurate.pipeline.run import run
from flowcurate.pipeline.validate import centre_crop_box, validate_pair
from flowcurate.trainer import checkpoint as C
from tests.pipeline_inputs import read_manifest, read_shards


def _config(path: Path) -> Path:
    path.write_text("""[models]
sd3 = "tiny://sd3"
sscd = "tiny://sscd.torchscript.pt"
captioner = "tiny://captioner"
[pipeline]
task = "edit"
resolution = 64
min_size = 32
val_fraction = 0.2
shard_size = 8
batch_size = 8
t5_max_length = 8
[dedup]
threshold = 0.95
""")
    return path


@pytest.fixture(scope="module")
def curated(tiny_models, tmp_path_factory):
    """24 procedural triplets + the planted cases as two Parquet files, curated; the captioner's loader
    is made to raise (an instruction is the text: nothing may caption)."""
    root = tmp_path_factory.mktemp("editcur")
    truth = write_edit_data(root / "data", n=24, seed=3)
    mp = pytest.MonkeyPatch()
    loaded = []
    mp.setattr("flowcurate.captioning.captioner.Captioner.load", lambda *a, **k: loaded.append(1) or 1 / 0)
    try:
        stats = run(["--input", str(root / "data" / "raw" / "*.parquet"), "--output", str(root / "out"),
                     "--config", str(_config(root / "c.toml"))], log=lambda *a, **k: None)
    finally:
        mp.undo()
    return root, truth, stats, loaded


def _raw_rows(data: Path) -> dict[str, dict]:
    """'part-NNNNN.parquet#row' -> the raw row."""
    out = {}
    for f in sorted((data / "raw").glob("*.parquet")):
        for i, r in enumerate(pq.read_table(f).to_pylist()):
            out[f"{f.name}#{i}"] = r
    return out


def test_every_triplet_is_accounted_for(curated):
    root, truth, stats, loaded = curated
    assert not loaded
    rows = list(read_manifest(root / "out").values())
    by_row = {r["source"].rsplit("/", 1)[1]: r for r in rows}
    assert len(rows) == len(by_row) == truth["n"] == stats["inputs"]
    assert set(by_row) == set(truth["rows"])
    for where, t in truth["rows"].items():
        r = by_row[where]
        if t["copy_of"] is not None:  # a planted copy and its original: one kept, the other its duplicate
            pair = sorted((r, by_row[t["copy_of"]]), key=lambda x: x["status"])
            assert [x["status"] for x in pair] == ["duplicate", "kept"], t["plant"]
            assert pair[0]["duplicate_of"] == pair[1]["key"]
        elif t["expect"].startswith("rejected:"):
            assert (r["status"], r["reason"]) == ("rejected", t["expect"].split(":", 1)[1]), t["plant"]
        elif not any(u["copy_of"] == where for u in truth["rows"].values()):
            assert r["status"] == "kept", where
            assert r["caption_original"] == t["instruction"] and r["caption_synthetic"] is None
    assert {t["expect"] for t in truth["rows"].values() if t["plant"]} == set(EDIT_PLANTS.values())
    kept = sum(r["status"] == "kept" for r in rows)
    assert stats["status"]["kept"] == kept == truth["n"] - 2 - 5  # two copies, five broken triplets


def test_crops_are_shared_and_source_latents_are_the_cropped_sources_posteriors(curated, tiny_models):
    root, truth, _, _ = curated
    out = root / "out"
    index = E.read_edit_index(out / "shards")
    record = S.read_record(out, task=E.TASK)
    assert record.json["task"] == E.TASK and index["conditioning"] == record.hash
    raw_rows = _raw_rows(root / "data")
    ae = Autoencoder.load(str(tiny_models / "sd3"))
    samples = {k: {"__key__": k, **m} for shard in read_shards(out).values() for k, m in shard.items()}
    assert len(samples) == sum(s["samples"] for s in index["shards"]) == sum(
        r["status"] == "kept" for r in read_manifest(out).values())
    sizes = set()
    for key, sample in samples.items():
        doc = E.check_edit_sample(sample, record)
        row = raw_rows[doc["source"].rsplit("/", 1)[1]]
        assert doc["instruction"] == row["edit_prompt"] and doc["key"] == key
        src = Image.open(io.BytesIO(row["original_image"]["bytes"])).convert("RGB")
        edited = Image.open(io.BytesIO(row["edited_image"]["bytes"])).convert("RGB")
        box = centre_crop_box(src.width, src.height, 64, 64)
        assert doc["crop"] == list(box) and [doc["width"], doc["height"]] == list(src.size)
        sizes.add(src.size)
        views = [np.asarray(im.resize((64, 64), Image.Resampling.BICUBIC, box=box, reducing_gap=None))
                 for im in (src, edited)]
        mean, logvar = ae.encode(views)
        arrays = {m: S.load_npy(sample[m]).astype(np.float32) for m in E.edit_array_members()}
        for got, want in (("source_latent_mean.npy", mean[0]), ("source_latent_logvar.npy", logvar[0]),
                          ("latent_mean.npy", mean[1]), ("latent_logvar.npy", logvar[1])):
            np.testing.assert_allclose(arrays[got], want, rtol=2e-3, atol=2e-3, err_msg=f"{key} {got}")
        assert not any(m.startswith("syn.") for m in sample)
    assert len(sizes) > 1  # squares and both orientations went through the crop


def test_editing_trainer_takes_the_curated_triplets_and_the_t2i_trainer_refuses_them(curated, tmp_path, capsys):
    root = curated[0]
    args = ["--config", "tiny", "--max-steps", "1", "--sample-every", "0", "--batch-size", "2"]
    assert flowcurate(["train", "--shards", str(root / "out"), "--output", str(tmp_path / "t2i"), *args]) == 2
    assert "flowcurate train --edit" in capsys.readouterr().err
    assert flowcurate(["train", "--edit", "--shards", str(root / "out"), "--output", str(tmp_path / "e"), *args]) == 0
    step = C.latest(tmp_path / "e")
    assert step.name == "step-000001" and C.read_state(step)["task"] == E.TASK


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(color, size=(40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def test_tar_triplets_are_read_by_member_names(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.original_image.png", _png("red"))
        _add(tar, "a.edited_image.jpg", _png("blue"))
        _add(tar, "a.edit_prompt.txt", b" make it blue \n")
        _add(tar, "b.original_image.png", _png("red"))
        _add(tar, "b.edit_prompt.txt", b"make it blue")
        _add(tar, "c.original_image.png", _png("red"))
        _add(tar, "c.edited_image.png", _png("blue"))
    items = list(read_tar(str(path), EditNames()))
    assert [(i.key, i.reason) for i in items] == [("a", None), ("b", "missing_image"), ("c", "missing_instruction")]
    a = items[0]
    assert a.caption == "make it blue" and a.source_image == _png("red") and a.image == _png("blue")
    assert a.source.endswith("#a.edited_image.jpg")


def test_validate_pair_aligns_and_refuses():
    src, edited = _png("red", (96, 64)), _png("blue", (96, 64))
    v = validate_pair(src, edited, resolution=32, min_size=16)
    assert v.crop == (16, 0, 80, 64) and v.source.shape == v.image.shape == (32, 32, 3)
    assert (v.source[..., 0] > 200).all() and (v.image[..., 2] > 200).all()
    assert v.pixel_hash != validate_pair(_png("green", (96, 64)), edited, resolution=32, min_size=16).pixel_hash
    for s, e, reason in ((src, src, "edit_unchanged"), (_png("red", (64, 64)), edited, "edit_size_mismatch"),
                         (src, b"nope", "undecodable")):
        with pytest.raises(ImageRejected) as err:
            validate_pair(s, e, resolution=32, min_size=16)
        assert err.value.reason == reason


def test_edit_task_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="outputs must be"):
        PipelineConfig(task="edit", outputs=("images",))
    with pytest.raises(ConfigError, match="task must be one of"):
        PipelineConfig(task="inpaint")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[pipeline]\ntask = "edit"\nfilters = [{name = "clip", kind = "clip_score", clip = "tiny://clip"}]\n')
    from flowcurate.pipeline.options import launch_options

    with pytest.raises(OptionsError, match="clip_score"):
        launch_options(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--config", str(cfg)],
                       resolve_models=False)
