"""`flowcurate run` end to end on sample data plus odd and hostile inputs, tiny models, in process
(FnApiRunner) and with 2 worker processes: accounting, shards, encodings against diffusers, the
trainer's reader, byte-identical reruns and equal manifests across modes."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from flowcurate.formats.shards import RECORD_JSON, load_npy, read_index, read_record
from flowcurate.models.tiny.sample_data import write_sample_data
from flowcurate.pipeline.run import run
from tests.pipeline_inputs import assert_same_shards, read_manifest, read_shards, write_odd_inputs

N = 64


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--input", str(root / "data" / "raw" / "*.tar"), "--input", str(root / "extra"),
            "--output", str(out), "--config", "tiny", "--val_fraction", "0.2", *extra]


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    truth = write_sample_data(root / "data", n=N, seed=3)
    odd = write_odd_inputs(root / "extra")
    stats = run(_args(root, root / "out"), log=lambda *a, **k: None)
    return root, truth, odd, stats


def test_every_input_is_accounted_for(curated):
    root, truth, odd, stats = curated
    rows = read_manifest(root / "out")
    expected = set(truth["keys"]) | set(odd["kept"]) | set(odd["rejected"])
    n_inputs = truth["n"] + len(odd["kept"]) + len(odd["rejected"])
    assert len(rows) == n_inputs == stats["inputs"]
    assert set(rows) == expected
    counts = {s: sum(r["status"] == s for r in rows.values()) for s in ("kept", "duplicate", "rejected")}
    assert counts == stats["status"] and sum(counts.values()) == n_inputs
    for r in rows.values():
        if r["status"] == "duplicate":
            assert rows[r["duplicate_of"]]["status"] == "kept" and 0 < r["similarity"] <= 1
        if r["status"] == "rejected":
            assert r["reason"] and r["shard"] is None
        if r["status"] == "kept":
            assert r["shard"] and r["caption_synthetic"] is not None and r["cluster"] is not None
    # img2dataset's url (the tars' json members) rides with the kept rows; the odd tars have no json
    kept = {k: r for k, r in rows.items() if r["status"] == "kept"}
    assert all(r["url"] == f"procedural://seed3/{k.split('~')[0]}" for k, r in kept.items() if k in truth["keys"])
    assert all(kept[k]["url"] is None for k in odd["kept"] if k in kept)


def test_broken_and_hostile_inputs_get_their_reasons(curated):
    root, truth, odd, _ = curated
    rows = read_manifest(root / "out")
    for key, b in truth["broken"].items():
        assert (rows[key]["status"], rows[key]["reason"]) == ("rejected", b["reason"]), key
    for key, reason in odd["rejected"].items():
        assert (rows[key]["status"], rows[key]["reason"]) == ("rejected", reason), key
    # nothing was written outside OUT: the `../` member became a plain key
    assert not list(root.rglob(odd["escape"])) and not list(root.parent.glob(odd["escape"]))
    assert rows["escaped_evil"]["source"].endswith("#../../escaped_evil.jpg")


def test_odd_images_are_kept_with_sizes_after_exif(curated):
    root, _, odd, _ = curated
    rows = read_manifest(root / "out")
    for key, (w, h) in odd["kept"].items():
        assert rows[key]["status"] == "kept", (key, rows[key])
        assert (rows[key]["width"], rows[key]["height"]) == (w, h), key


def test_planted_duplicates_removed_and_unrelated_images_kept(curated):
    root, truth, _, _ = curated
    rows = read_manifest(root / "out")
    planted = set()
    for g in truth["duplicate_groups"]:
        members = [g["original"], *g["copies"]]
        planted |= set(members)
        kept = [k for k in members if rows[k]["status"] == "kept"]
        exact = [k for k, kind in g["copies"].items() if kind in ("exact", "reencode")]
        assert len(kept) >= 1
        assert all(rows[k]["status"] == "duplicate" or k in kept[:1] for k in exact) or len(kept) == 1
    removed = [k for k, r in rows.items() if r["status"] == "duplicate"]
    unrelated = [k for k in removed if k not in planted]
    assert len(unrelated) <= N // 8, unrelated
    groups_kept_once = sum(sum(rows[k]["status"] == "kept" for k in [g["original"], *g["copies"]]) == 1
                           for g in truth["duplicate_groups"])
    assert groups_kept_once >= 0.8 * len(truth["duplicate_groups"])


def test_every_kept_key_is_in_exactly_one_shard(curated):
    root, _, _, _ = curated
    out = root / "out"
    rows = read_manifest(out)
    tars = read_shards(out)
    where: dict[str, list[str]] = {}
    for shard, samples in tars.items():
        assert samples, f"{shard} is empty"
        for key in samples:
            where.setdefault(key, []).append(shard)
    kept = {k: r["shard"] for k, r in rows.items() if r["status"] == "kept"}
    assert {k: [s] for k, s in kept.items()} == where
    index = read_index(out / "shards")
    assert {s["name"]: s["samples"] for s in index["shards"]} == {s: len(v) for s, v in tars.items()}
    record = read_record(out / RECORD_JSON)
    assert index["conditioning"] == record.hash
    assert record.json["autoencoder"]["source"] == "tiny://sd3"  # the config's location, not a local path
    assert {"train", "val"} == {s.split("-")[0] for s in tars}


def test_shard_encodings_equal_diffusers(curated):
    """Text encodings = StableDiffusion3Pipeline.encode_prompt; latents = AutoencoderKL latent_dist,
    both within float16 rounding, for a sample re-derived from its source."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline

    from flowcurate.models.tiny import ensure_tiny_models
    from flowcurate.pipeline.validate import validate

    root, _, _, _ = curated
    out = root / "out"
    tars = read_shards(out)
    shard = sorted(tars)[0]
    key = sorted(tars[shard])[0]
    s = tars[shard][key]
    doc = json.loads(s["json"])
    sd3 = ensure_tiny_models(0) / "sd3"
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3)
    for variant in ("orig", "syn"):
        pe, _, pooled, _ = pipe.encode_prompt(doc["caption"][variant], doc["caption"][variant],
                                              doc["caption"][variant], do_classifier_free_guidance=False,
                                              max_sequence_length=77)
        l_, g_ = load_npy(s[f"{variant}.clip_l.npy"]), load_npy(s[f"{variant}.clip_g.npy"])
        t5 = load_npy(s[f"{variant}.t5.npy"])
        clip = np.concatenate([l_, g_], -1)
        clip = np.pad(clip, ((0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        ours = np.concatenate([clip, t5], 0).astype(np.float32)
        np.testing.assert_allclose(ours, pe[0].detach().numpy(), atol=2e-3, rtol=2e-3)
        ours_pooled = np.concatenate([load_npy(s[f"{variant}.clip_l_pooled.npy"]),
                                      load_npy(s[f"{variant}.clip_g_pooled.npy"])]).astype(np.float32)
        np.testing.assert_allclose(ours_pooled, pooled[0].detach().numpy(), atol=2e-3, rtol=2e-3)
    member = doc["source"].rpartition("#")[2]
    with tarfile.open(doc["source"].rpartition("#")[0]) as tf:
        data = tf.extractfile(member).read()
    v = validate(data, resolution=64, min_size=32)
    assert list(v.crop) == doc["crop"] and [v.width, v.height] == [doc["width"], doc["height"]]
    vae = AutoencoderKL.from_pretrained(sd3, subfolder="vae")
    x = torch.from_numpy(v.image).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    np.testing.assert_allclose(load_npy(s["latent_mean.npy"]).astype(np.float32), dist.mean[0].numpy(),
                               atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(load_npy(s["latent_logvar.npy"]).astype(np.float32), dist.logvar[0].numpy(),
                               atol=2e-3, rtol=2e-3)


def test_the_trainers_reader_accepts_the_shards(curated):
    from flowcurate.trainer.data import CuratedShards, open_record, resolve_shards

    root, _, _, _ = curated
    urls, record_path = resolve_shards(str(root / "out"), "train")
    record = open_record(record_path, urls)
    batch = next(iter(CuratedShards(urls, record, 4, seed=0, shuffle_buffer=4)))
    assert batch["latents"].shape == (4, 16, 8, 8) and batch["context"].shape == (4, 154, 96)
    assert len(resolve_shards(str(root / "out"), "val")[0]) >= 1


def test_stats_and_embeddings(curated):
    root, _, _, stats = curated
    out = root / "out"
    emb = pq.read_table(out / "embeddings")
    rows = read_manifest(out)
    embedded = {k for k, r in rows.items() if r["status"] in ("kept", "duplicate") and r["similarity"] != 1.0}
    assert set(emb.column("key").to_pylist()) >= {k for k, r in rows.items() if r["status"] == "kept"}
    assert set(emb.column("key").to_pylist()) <= set(rows) and embedded <= set(emb.column("key").to_pylist())
    v = np.asarray(emb.column("embedding").to_pylist(), np.float32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    disk = json.loads((out / "stats.json").read_text())
    assert disk["sscd"]["preprocess"]["size"] == 320 and disk["status"] == stats["status"]
    # the training crop's descriptor of every kept input: unit vectors, crop sizes from the shard json
    crops = {r["key"]: r for r in pq.read_table(out / "crop_embeddings").to_pylist()}
    assert set(crops) == {k for k, r in rows.items() if r["status"] == "kept"}
    c = np.asarray([r["embedding"] for r in crops.values()], np.float32)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)
    for sample in (s for shard in read_shards(out).values() for s in shard.values()):
        doc = json.loads(sample["json"])
        left, top, right, bottom = doc["crop"]
        assert (crops[doc["key"]]["width"], crops[doc["key"]]["height"]) == (right - left, bottom - top)


def test_outputs_are_readable_by_the_team(curated):
    """Every file the run wrote is readable by group and others under the default umask."""
    root, _, _, _ = curated
    files = [p for p in (root / "out").rglob("*") if p.is_file()]
    assert len(files) >= 8  # shards, index, record (2), manifest, embeddings, crop embeddings, stats
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in files), [
        (str(p), oct(p.stat().st_mode & 0o777)) for p in files if p.stat().st_mode & 0o044 != 0o044]


def test_rerun_is_byte_identical_and_refuses_to_mix(curated, tmp_path):
    root, _, _, _ = curated
    from flowcurate.pipeline.options import OptionsError

    with pytest.raises(OptionsError, match="--overwrite"):  # another run's settings: never mixed
        run(_args(root, root / "out", "--val_fraction", "0.5"), log=lambda *a, **k: None)
    run(_args(root, tmp_path / "again"), log=lambda *a, **k: None)
    first = {p.name: p.read_bytes() for p in (root / "out" / "shards").iterdir() if p.is_file()}
    second = {p.name: p.read_bytes() for p in (tmp_path / "again" / "shards").iterdir() if p.is_file()}
    assert first.keys() == second.keys() and first == second
    assert (root / "out" / RECORD_JSON).read_bytes() == (tmp_path / "again" / RECORD_JSON).read_bytes()


def test_two_worker_processes_give_the_same_result(curated, tmp_path):
    root, _, _, _ = curated
    out2 = tmp_path / "mp"
    run(_args(root, out2, "--direct_running_mode", "multi_processing", "--direct_num_workers", "2"),
        log=lambda *a, **k: None)
    a, b = read_manifest(root / "out"), read_manifest(out2)
    assert a == b
    assert_same_shards(root / "out", out2)


def test_help_lists_our_flags_and_examples(capsys):
    from flowcurate.pipeline.cli import main

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--input" in text and "--overwrite" in text and "DataflowRunner" in text
    assert "--direct_running_mode" in text


def test_missing_output_is_a_clear_error(capsys):
    from flowcurate.pipeline.cli import main

    assert main(["--input", "x/*.tar"]) == 2
    assert "--output is required" in capsys.readouterr().err


def test_near_dup_decisions_equal_flowcurate_dedup_on_the_same_embeddings(curated, tmp_path):
    """OUT/embeddings is a valid `flowcurate dedup --input`, and dedup decides the same."""
    from flowcurate.dedup.cli import main as dedup_main

    root, _, _, _ = curated
    out = root / "out"
    (part,) = sorted((out / "embeddings").glob("*.parquet"))
    assert dedup_main(["--input", str(part), "--output", str(tmp_path / "dd"), "--config", "tiny", "--quiet"]) == 0
    dd = {r["key"]: r for r in pq.read_table(tmp_path / "dd" / "dedup.parquet").to_pylist()}
    rows = read_manifest(out)
    assert set(dd) <= set(rows)
    for key, r in dd.items():
        assert (rows[key]["status"], rows[key]["duplicate_of"]) == (r["status"], r["duplicate_of"]), key


def test_odd_images_convert_to_the_right_pixels():
    """What the pipeline decodes for each odd-but-valid input (CMYK, 16-bit, palette+alpha, EXIF,
    PNG named .jpg, WebP) is the picture, not a mis-converted one (JPEG/WebP loss allowed)."""
    from flowcurate.formats.images import decode_image
    from tests.pipeline_inputs import odd_images

    for key, (_, data, (w, h), want) in odd_images().items():
        got = np.asarray(decode_image(data).image, np.float32)
        assert got.shape == (h, w, 3), key
        err = np.abs(got - want.astype(np.float32)).mean()
        assert err < 6, (key, err)
        if key == "odd_exif_rotated":  # the other rotation is far off: the check can tell them apart
            wrong = np.rot90(np.rot90(want))  # 180 degrees: same shape, wrong orientation
            assert np.abs(got - wrong.astype(np.float32)).mean() > 4 * err + 10


def test_reference_rejects_the_same_items_in_run_and_in_dedup(curated, tmp_path):
    """--reference has one meaning in both commands: inputs above the threshold to an evaluation
    set's embeddings are rejected as filtered:reference."""
    from flowcurate.dedup.cli import main as dedup_main
    from flowcurate.dedup.inputs import write_embeddings

    root, _, _, _ = curated
    (part,) = sorted((root / "out" / "embeddings").glob("*.parquet"))
    emb = pq.read_table(part).to_pylist()[:6]  # an "evaluation set": six of the curated images
    ref = tmp_path / "eval.parquet"
    write_embeddings(ref, [f"eval-{i}" for i in range(len(emb))], np.asarray([r["embedding"] for r in emb], np.float32),
                     np.full(len(emb), -1, np.int32), np.full(len(emb), -1, np.int32))
    run(_args(root, tmp_path / "decont", "--reference", str(ref)), log=lambda *a, **k: None)
    rows = read_manifest(tmp_path / "decont")
    in_run = {k for k, r in rows.items() if r["reason"] == "filtered:reference"}
    assert {r["key"] for r in emb} <= in_run
    assert dedup_main(["--input", str(part), "--reference", str(ref), "--output", str(tmp_path / "dd"),
                       "--config", "tiny", "--quiet"]) == 0
    dd = {r["key"]: r for r in pq.read_table(tmp_path / "dd" / "dedup.parquet").to_pylist()}
    in_dedup = {k for k, r in dd.items() if r["reason"] == "filtered:reference"}
    assert in_dedup == in_run & set(dd)
    assert all(rows[k]["status"] == "rejected" for k in in_run)
    assert not {r["duplicate_of"] for r in rows.values()} & in_run  # a filtered item removes nothing
