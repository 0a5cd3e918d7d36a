"""trainer/memorization.py: SD3's memorization check (App. E.3) on a curated folder built here.

`curated` is a small OUT of `flowcurate run` built here, with what the checks need: procedural
originals saved as PNG (one in a tar, one with a source that cannot be read here), shards and record via
flowcurate.formats.shards, tiny-SSCD embeddings of training images and of near-duplicates, a manifest
and stats.json.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flowcurate.formats import shards as S
from flowcurate.formats.files import write_atomic
from flowcurate.models.conditioning import make_record
from flowcurate.models.tiny import procedural

N_TRAIN = 4
SIZE = 32
DUPLICATES = {"000000002": 3, "000000004": 1}  # training key -> near-duplicate manifest rows naming it
UNREADABLE = "000000003"  # its source is a remote URI: pairs.png decodes its latent instead


def build_curated(out: Path, write_tar, n: int = N_TRAIN, size: int = SIZE, seed: int = 0) -> Path:
    """OUT in the layout `flowcurate run` writes (docs/architecture.md), for `n` training images of
    `size` x `size` (`write_tar`: the conftest fixture)."""
    from flowcurate.dedup.inputs import write_embeddings
    from flowcurate.models.autoencoder import Autoencoder
    from flowcurate.models.sscd import SSCDPreprocess, embed, load_sscd
    from flowcurate.models.text_encoders import TextEncoders
    from flowcurate.models.tiny import ensure_tiny_models

    tiny = ensure_tiny_models()
    ae, te = Autoencoder.load(str(tiny / "sd3")), TextEncoders.load(str(tiny / "sd3"), t5_length=77)
    record = make_record(out, str(tiny / "sd3"), ae, te, validation_prompts=["a red circle"], label="tiny://sd3")
    raw = out.parent / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, images, samples, tar_members = [], {}, [], []
    for i in range(1, n + 1):
        key = f"{i:09d}"
        img, cap = procedural.random_image(rng, size)
        images[key] = img
        if i == 1:  # one original inside a raw tar, as img2dataset writes them
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            tar_members.append((f"{key}.png", buf.getvalue()))
            source = f"{raw / 'raw-000000.tar'}#{key}.png"
        elif key == UNREADABLE:
            source = f"gs://bucket/raw-000000.tar#{key}.png"
        else:
            img.save(raw / f"{key}.png")
            source = str(raw / f"{key}.png")
        syn = f"A simple drawing: {cap}."
        mean, logvar = ae.encode([np.asarray(img)])
        enc = {v: te.encode([c]) for v, c in (("orig", cap), ("syn", syn))}
        meta = {"source": source, "width": size, "height": size, "crop": [0, 0, size, size],
                "resolution": [size, size], "caption": {"orig": cap, "syn": syn}}
        samples.append(S.encode_sample(key, mean[0], logvar[0], {v: {p: e[p][0] for p in S.PARTS}
                                                                for v, e in enc.items()}, meta, record.hash))
        rows.append(dict(key=key, source=source, status="kept", cluster=0, width=size, height=size,
                         caption_original=cap, caption_synthetic=syn, notes=[], shard=S.shard_name("train", 0)))
    write_tar(raw / "raw-000000.tar", tar_members)
    write_atomic(out / "shards" / S.shard_name("train", 0), S.tar_bytes(samples))
    S.write_index(out / "shards", {S.shard_name("train", 0): len(samples)}, record.hash)
    for of, count in DUPLICATES.items():
        for j in range(count):
            key = f"{of}~dup{j}"
            images[key] = procedural.copy_variant(images[of], rng, "jitter")
            rows.append(dict(key=key, source=f"gs://bucket/dups.tar#{key}.jpg", status="duplicate",
                             duplicate_of=of, similarity=0.9, cluster=0, width=size, height=size))
    rows.append(dict(key="broken", source="gs://bucket/broken.jpg", status="rejected", reason="undecodable"))
    sscd_path = str(tiny / "sscd.torchscript.pt")
    pre = SSCDPreprocess()
    keys = sorted(images)
    emb = embed(load_sscd(sscd_path), torch.stack([pre(images[k]) for k in keys]))
    (out / "embeddings").mkdir()
    write_embeddings(out / "embeddings" / "part-000000.parquet", keys, emb, [size] * len(keys), [size] * len(keys))
    (out / "manifest").mkdir()
    cols = ["key", "source", "status", "reason", "duplicate_of", "similarity", "cluster", "width", "height",
            "caption_original", "caption_synthetic", "notes", "shard"]
    types = [pa.string()] * 5 + [pa.float32(), pa.int32(), pa.int32(), pa.int32()] + [pa.string()] * 2 + \
        [pa.list_(pa.string()), pa.string()]
    schema = pa.schema(list(zip(cols, types)))
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows], schema=schema),
                   out / "manifest" / "part-000000.parquet")
    (out / "stats.json").write_text(json.dumps({"sscd": {"location": sscd_path, "preprocess": pre.record()}}))
    return out


@pytest.fixture(scope="module")
def curated(tiny_models, write_tar, tmp_path_factory):
    return build_curated(tmp_path_factory.mktemp("curated") / "out", write_tar)


def untrained_like(run: Path, out: Path) -> Path:
    """A run folder with a freshly initialised model of `run`'s config, seeded as training seeds it,
    saved as step 0 (EMA = model): the untrained baseline, with the same record and sample size. (Its
    zero-initialised final layer predicts v = 0, so it generates the decoded starting noise. Made here
    because `train --max-steps 0` never sees a batch, so its checkpoint records no sample size.)"""
    import shutil

    from flowcurate.models.mmdit import MMDiT, MMDiTConfig
    from flowcurate.trainer import checkpoint as C

    step = C.latest(run)
    state = C.read_state(step)
    out.mkdir(parents=True)
    for name in (S.RECORD_JSON, S.RECORD_NPZ):
        shutil.copyfile(run / name, out / name)
    torch.manual_seed(state["config"]["train"]["seed"])
    model = MMDiT(MMDiTConfig(**state["model_config"]))
    opt = torch.optim.AdamW(model.parameters())
    keep = {k: v for k, v in state.items() if k not in ("step", "optimizer")}
    C.save(out, 0, model, model, opt, {**keep, "data_position": 0})
    return out


OVERFIT_STEPS = 600  # tests/test_train.py's overfit recipe: d2 on four 32x32 samples, cosine lr
COMMON = ["--seeds", "8", "--min-clique", "4", "--steps", "16", "--cfg", "1", "--background-queries", "100"]


@pytest.fixture(scope="module")
def runs(curated, tmp_path_factory):
    """(overfit run, untrained run): the same model config and record; the second never trained."""
    from flowcurate.trainer.cli import main as train

    root = tmp_path_factory.mktemp("runs")
    cfg = root / "c.toml"
    # conditional only (text_drop_prob 0), so generation uses --cfg 1: the empty prompt was never seen
    cfg.write_text("[train]\nmodel = \"d2\"\nbatch_size = 4\nlr = 2e-3\nwarmup_steps = 10\nlr_schedule = \"cosine\"\n"
                   f"max_steps = {OVERFIT_STEPS}\nema_decay = 0.9\nshift = 1.0\ncheckpoint_every = 0\n"
                   "sample_every = 0\nlog_every = 50\nmixed_precision = false\nseed = 0\n"
                   "orig_caption_prob = 1.0\ntext_drop_prob = 0.0\n")
    assert train(["train", "--shards", str(curated), "--config", str(cfg), "--output", str(root / "overfit")]) == 0
    return root / "overfit", untrained_like(root / "overfit", root / "untrained")


@pytest.fixture(scope="module")
def reports(curated, runs, tmp_path_factory):
    """`flowcurate memorization` on both runs, same prompts (the four training captions) and seeds;
    the SSCD descriptors and images of the generations are captured on the way."""
    from flowcurate.cli.main import main as flowcurate
    from flowcurate.trainer import memorization as M

    root = tmp_path_factory.mktemp("reports")
    captured = {}
    real = M.sscd_embed
    # the untrained check in batches of 3 prompts (24 // 8), the last one short
    for name, run, extra in zip(("overfit", "untrained"), runs, ([], ["--batch-size", "24"])):
        seen = captured[name] = []

        def spy(model, pre, images, *a, seen=seen, **k):
            out = real(model, pre, images, *a, **k)
            seen.append((images, out))
            return out

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(M, "sscd_embed", spy)
            assert flowcurate(["memorization", "--checkpoint", str(run), "--curated", str(curated),
                               "--output", str(root / name), *COMMON, *extra]) == 0
    return {name: (root / name, captured[name]) for name in captured}


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_overfit_model_is_flagged_and_the_untrained_one_is_not(reports):
    over, fresh = summary(reports["overfit"][0]), summary(reports["untrained"][0])
    assert over["generations"] == fresh["generations"] == 4 * 8 and over["prompts"] == 4
    # measured: overfit 32/32 above 0.5 (p50 0.708, min 0.532), every nearest key the prompt's own
    # image; untrained 0/32 (max 0.238), below the training background (p50 0.328)
    r = over["retrieval"]
    assert r["fraction_flagged"] > 0.5 and r["nearest_is_prompt_key"] > 0.5 * over["generations"], r
    assert r["similarity"]["p50"] > r["background"]["max"], r
    assert fresh["retrieval"]["flagged"] == 0, fresh["retrieval"]
    # measured: cliques of 5, 5, 8, 5 at eps 0.15 for the overfit model; no edge at all untrained
    assert over["clique"]["memorized_prompts"] >= 3, over["per_prompt"]
    assert fresh["clique"]["memorized_prompts"] == 0 and fresh["clique"]["largest_clique"] < 4, fresh["clique"]


def test_report_nearest_keys_equal_a_brute_force_search(curated, reports):
    # the training set read straight from the files: kept rows in train- shards (near-duplicates are
    # embedded too, but were never trained on)
    manifest = pq.read_table(curated / "manifest").to_pylist()
    train = {r["key"] for r in manifest if r["status"] == "kept" and r["shard"].startswith("train-")}
    table = pq.read_table(curated / "embeddings").to_pylist()
    keys = [r["key"] for r in table if r["key"] in train]
    emb = np.array([r["embedding"] for r in table if r["key"] in train], np.float32)
    assert len(keys) == N_TRAIN < len(table)
    for name in ("overfit", "untrained"):
        folder, captured = reports[name]
        queries = np.concatenate([d for _, d in captured])
        report = pq.read_table(folder / "report.parquet").to_pylist()
        sims = queries @ emb.T
        assert [r["nearest_key"] for r in report] == [keys[i] for i in sims.argmax(axis=1)], name
        np.testing.assert_allclose([r["similarity"] for r in report], sims.max(axis=1), atol=6e-4)
    # and the filter matters: with the near-duplicates counted as training images (measured: 8 of 32
    # overfit generations) a copy, not the trained image, would be the nearest
    every = np.array([r["embedding"] for r in table], np.float32)
    queries = np.concatenate([d for _, d in reports["overfit"][1]])
    assert any(table[i]["key"] not in train for i in (queries @ every.T).argmax(axis=1))


def test_recorded_prompts_and_seeds_reproduce_the_generations(reports, runs):
    from flowcurate.trainer import checkpoint as C
    from flowcurate.trainer.sample import (
        generate,
        load_autoencoder,
        load_model,
        load_text_encoders,
        model_paths,
    )

    folder, captured = reports["overfit"]
    report = pq.read_table(folder / "report.parquet").to_pylist()
    step = C.latest(runs[0])
    record = S.read_record(runs[0])
    model, _ = load_model(step)
    paths = model_paths(record)
    te = load_text_encoders(record, paths)
    enc = te.encode([r["prompt"] for r in report])  # all 32 rows in one batch, as the check made them
    ae = load_autoencoder(record, paths["autoencoder"])
    images = generate(model, ae, {p: enc[p] for p in S.PARTS}, te.encode([""]), (SIZE, SIZE),
                      [r["seed"] for r in report], 16, 1.0, 1.0)
    made = np.concatenate([im for im, _ in captured]).astype(int)
    assert np.abs(images.astype(int) - made).max() <= 1


def test_cli_writes_report_summary_and_pairs(curated, reports):
    from PIL import Image

    from flowcurate.trainer import memorization_report as M

    folder = reports["overfit"][0]
    table = pq.read_table(folder / "report.parquet")
    assert table.schema.equals(M.REPORT_SCHEMA)
    rows = table.to_pylist()
    assert len(rows) == 4 * 8 and [r["seed"] for r in rows[:8]] == list(range(8))
    # default prompts: the most-duplicated training images first (3 then 1 duplicates), then the rest
    order = [(r["prompt_key"], r["prompt_origin"], r["prompt_duplicates"]) for r in rows[::8]]
    assert order[:2] == [("000000002", "duplicated", 3), ("000000004", "duplicated", 1)], order
    assert sorted(k for k, o, _ in order[2:]) == ["000000001", "000000003"] and {o for _, o, _ in order[2:]} == {"random"}
    s = summary(folder)
    assert s["retrieval"]["flagged"] == sum(r["flagged"] for r in rows)
    assert s["clique"]["memorized_prompts"] == len({r["prompt_index"] for r in rows if r["prompt_memorized"]})
    # 8 generations a prompt: every clique question decided, sizes consistent with the answers (T = 4)
    assert s["clique"]["undecided_generations"] == sum(r["clique_undecided"] for r in rows) == 0
    assert all(r["memorized"] == (r["clique_size"] >= 4) for r in rows)
    assert s["clique"]["exact_sizes"] == sum(r["clique_exact"] for r in rows)
    assert s["clique"]["largest_clique"] == max(r["clique_size"] for r in rows)
    # pairs.png: originals re-read from a file or a raw tar; the one with a remote source decoded from its latent
    assert s["pairs_png"] == {"shown": min(30, s["retrieval"]["flagged"]), "from_source": 3, "from_latent": 1,
                              "from_missing": 0}, s["pairs_png"]
    with Image.open(folder / "pairs.png") as img:
        assert img.height > 10 * 128
    with Image.open(reports["untrained"][0] / "pairs.png") as img:  # nothing flagged: the note only
        assert img.height < 128


def test_help_and_a_folder_without_an_sscd_record(curated, tmp_path, capsys):
    import shutil

    from flowcurate.cli.main import main as flowcurate
    from flowcurate.trainer.cli import main as trainer_main

    with pytest.raises(SystemExit) as e:
        trainer_main(["memorization", "--help"])
    assert e.value.code == 0 and "flowcurate memorization --checkpoint run/" in capsys.readouterr().out
    shutil.copytree(curated, tmp_path / "out")
    (tmp_path / "out" / "stats.json").write_text("{}")
    assert flowcurate(["memorization", "--checkpoint", str(tmp_path), "--curated", str(tmp_path / "out"),
                       "--output", str(tmp_path / "r")]) == 2
    assert "stats.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------
# The pieces against their definitions

def test_tiled_distance_is_the_largest_per_tile_rms_difference():
    from flowcurate.trainer.cliques import tiled_distances

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 30, 34, 3), dtype=np.uint8)  # tiles of uneven size
    x = images / 255.0
    ys, xs = [round(i * 30 / 4) for i in range(5)], [round(i * 34 / 4) for i in range(5)]
    for a in range(3):
        for b in range(3):
            tiles = [np.sqrt(np.mean((x[a, ys[i]:ys[i + 1], xs[j]:xs[j + 1]] - x[b, ys[i]:ys[i + 1], xs[j]:xs[j + 1]]) ** 2))
                     for i in range(4) for j in range(4)]
            assert tiled_distances(images)[a, b] == pytest.approx(max(tiles), abs=1e-9)
    # one tile entirely different: far apart in tiled l2 (1.0), close in plain l2 (0.25)
    grey = np.full((2, 32, 32, 3), 128, np.uint8)
    grey[1, :8, :8] = 255
    assert tiled_distances(grey)[0, 1] == pytest.approx(127 / 255)
    assert np.sqrt(np.mean((grey[0] / 255.0 - grey[1] / 255.0) ** 2)) == pytest.approx(127 / 255 / 4)


def test_clique_test_matches_a_brute_force_search():
    from itertools import combinations

    from flowcurate.trainer.cliques import clique_edges, clique_test

    rng = np.random.default_rng(1)
    for trial in range(20):
        n = 9
        edge = np.triu(rng.random((n, n)) < (0.3 + 0.03 * trial), 1)
        edge = edge | edge.T
        dist = np.where(edge, 0.1, 0.2)  # an edge is d < eps = 0.15
        np.fill_diagonal(dist, 0.0)
        assert (clique_edges(dist, 0.15) == edge).all()
        best = np.ones(n, int)
        for size in range(2, n + 1):
            for c in combinations(range(n), size):
                if all(edge[i, j] for i, j in combinations(c, 2)):
                    best[list(c)] = size
        for t in (3, 4):
            a = clique_test(clique_edges(dist, 0.15), t)
            assert a.memorized.tolist() == (best >= t).tolist(), (trial, t)
            assert not a.undecided.any() and (a.size <= best).all() and (a.size[a.exact] == best[a.exact]).all()
            assert ((a.size >= t) == a.memorized).all(), (trial, t)


def test_nearest_rescores_breaks_ties_low_and_excludes_self():
    from flowcurate.trainer.memorization import Nearest

    rng = np.random.default_rng(2)
    train = rng.standard_normal((60, 16)).astype(np.float32)
    train[7] = train[3]  # an exact tie: the lower index wins
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    queries = np.concatenate([train[[3, 10]], train[:20] + 0.3 * rng.standard_normal((20, 16)).astype(np.float32)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    idx, cos = Nearest(train)(queries)
    sims = queries @ train.T
    assert idx.tolist() == sims.argmax(axis=1).tolist() and idx[0] == 3
    np.testing.assert_allclose(cos, sims.max(axis=1), atol=1e-6)
    rows = np.arange(60)
    idx, cos = Nearest(train)(train, exclude=rows)
    sims = train @ train.T
    np.fill_diagonal(sims, -np.inf)
    assert idx.tolist() == sims.argmax(axis=1).tolist() and idx[3] == 7 and idx[7] == 3


def test_prompt_file_and_the_default_selection(curated, tmp_path):
    from flowcurate.trainer.curated import default_prompts, read_curated, read_prompt_file

    cur = read_curated(curated)
    assert cur.keys == [f"{i:09d}" for i in range(1, N_TRAIN + 1)] and cur.duplicates["000000002"] == 3
    top1 = default_prompts(cur, top=1, n_random=1, seed=0)
    assert [p.origin for p in top1] == ["duplicated", "random"] and top1[0].key == "000000002"
    assert top1[1].key != "000000002"
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square  \n")
    assert [(p.text, p.origin, p.key) for p in read_prompt_file(tmp_path / "p.txt")] == [
        ("a red circle", "file", None), ("a blue square", "file", None)]


def test_training_descriptors_are_of_the_crop_and_older_outputs_fall_back(curated, tmp_path):
    """Generations reproduce the training crop, so retrieval compares them with the crop's SSCD
    (OUT/crop_embeddings/, written by pass 2); an output without crop descriptors uses the whole
    originals' (OUT/embeddings/)."""
    import shutil

    from flowcurate.dedup.inputs import write_embeddings
    from flowcurate.trainer.curated import read_curated

    before = read_curated(curated)  # this fixture has no crop descriptors
    assert before.view == "original"
    new = tmp_path / "new"
    shutil.copytree(curated, new)
    crops = np.random.default_rng(0).standard_normal((len(before.keys), before.embeddings.shape[1])).astype(np.float32)
    crops /= np.linalg.norm(crops, axis=1, keepdims=True)
    (new / "crop_embeddings").mkdir()
    write_embeddings(new / "crop_embeddings" / "part-000000.parquet", before.keys, crops, [8] * len(crops),
                     [8] * len(crops))
    cur = read_curated(new)
    assert cur.view == "crop" and cur.keys == before.keys
    np.testing.assert_allclose(cur.embeddings, crops, atol=1e-6)
