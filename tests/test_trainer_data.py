"""trainer/data.py: aspect buckets, exact replay from a data position, SD3's caption choice and encoder
drops, rank slicing, and refusal of shards that do not match the conditioning record."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from flowcurate.formats import shards as S
from flowcurate.trainer.data import (
    Augment,
    CuratedShards,
    DataError,
    decode_sample,
    loader,
    open_record,
    read_samples,
    resolve_shards,
)


@pytest.fixture(scope="module")
def golden_stream(golden):
    urls, rec = resolve_shards(str(golden))
    return urls, open_record(rec, urls)


def take(ds, n, workers=0):
    it = iter(loader(ds, workers))
    return [next(it) for _ in range(n)]


def test_resolve_shards_from_folder_brace_and_glob(golden):
    urls, rec = resolve_shards(str(golden))
    assert urls == [str(golden / "shards" / "train-000000.tar")] and rec == golden / "conditioning.json"
    assert resolve_shards(str(golden), "val")[0] == [str(golden / "shards" / "val-000000.tar")]
    assert resolve_shards(str(golden / "shards" / "{train,val}-000000.tar"))[0] == [
        str(golden / "shards" / "train-000000.tar"), str(golden / "shards" / "val-000000.tar")]
    glob_urls, glob_rec = resolve_shards(str(golden / "shards" / "*.tar"))
    assert len(glob_urls) == 2 and glob_rec == golden / "conditioning.json"
    with pytest.raises(DataError, match="no conditioning record"):
        open_record(None, ["x.tar"])


def test_batches_hold_one_latent_shape_and_the_reference_layout(golden_stream):
    urls, record = golden_stream
    shapes = set()
    for batch in take(CuratedShards(urls, record, 2, seed=0, shuffle_buffer=4), 12):
        assert batch["latents"].shape[:2] == (2, 16) and batch["context"].shape == (2, 154, 96)
        assert batch["pooled"].shape == (2, 80) and batch["latents"].dtype == torch.float32
        shapes.add(tuple(batch["latents"].shape[2:]))
    assert shapes == {(8, 8), (6, 8)}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_a_data_position_is_exact_and_its_cost_does_not_grow(golden, golden_stream, workers):
    urls, record = golden_stream
    urls = urls + resolve_shards(str(golden), "val")[0]  # two shards (7 and 1 samples): one per worker
    kw = dict(seed=3, shuffle_buffer=5, num_workers=workers, split="global")
    stream, full, positions = loader(CuratedShards(urls, record, 3, **kw), workers), [], {}
    for batch in stream:
        full.append(batch)
        if len(full) in (5, 300):  # early, and ~100 epochs later
            positions[len(full)] = json.loads(json.dumps(stream.position()))  # as a checkpoint keeps it
        if len(full) == 304:
            break
    largest_shard = max(sum(1 for _ in read_samples(u)) for u in urls)
    shapes = 2  # 8x8 and 6x8 latents: each aspect bucket holds at most batch - 1 samples between batches
    for at, position in positions.items():
        resumed = loader(CuratedShards(urls, record, 3, position=position, **kw), workers)
        tail = take_from(resumed, 4)
        for a, b in zip(full[at:], tail):
            assert a["keys"] == b["keys"] and a["variants"] == b["variants"]
            for name in ("latents", "context", "pooled"):
                assert torch.equal(a[name], b[name])
        # what each worker read before its first batch: the held samples plus the batch it formed, never
        # a replay of the batches before the position (300 batches = 900 samples)
        first = {w: n for w, n in resumed.first_samples_read.items()}
        assert len(first) == max(1, workers)
        assert all(n <= 5 + shapes * 2 + largest_shard for n in first.values()), (at, first)
        assert position["workers"][0]["epoch"] > 100 or at == 5


def take_from(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_a_data_position_is_small_json_of_keys_and_offsets(golden_stream):
    urls, record = golden_stream
    stream = loader(CuratedShards(urls, record, 2, seed=0, shuffle_buffer=4))
    take_from(stream, 3)
    position = stream.position()
    worker = position["workers"][0]
    assert position["batches"] == worker["batches"] == 3 and position["next_worker"] == 0
    assert len(worker["buffer"]) == 3  # the buffer holds 4 - 1 samples after a draw
    assert all(isinstance(e[3], str) and e[1] == 0 and e[2] % 512 == 0 for e in worker["buffer"])
    assert len(json.dumps(position)) < 1000
    # a position indexes into one shard list: another is refused rather than read at wrong offsets
    with pytest.raises(DataError, match="shard list differs"):
        CuratedShards(urls + urls, record, 2, position=position)


def test_caption_choice_and_encoder_drops_follow_the_configured_rates(golden_stream):
    urls, record = golden_stream
    import webdataset as wds

    raws = [(raw, S.check_sample(raw, record)) for raw in wds.WebDataset(urls, shardshuffle=False)]
    aug = Augment(orig_caption_prob=0.5, text_drop_prob=0.464)
    variants, drops = [], []
    for epoch in range(150):
        for raw, doc in raws:
            latent, parts, keep, variant = decode_sample(raw, doc, record, aug, seed=0, epoch=epoch)
            variants.append(variant == "orig")
            drops.append([1 - keep[r] for r in ("clip_l", "clip_g", "t5")])
    n = len(variants)
    assert abs(np.mean(variants) - 0.5) < 4 * np.sqrt(0.25 / n)
    rates = np.mean(drops, axis=0)
    assert np.all(np.abs(rates - 0.464) < 4 * np.sqrt(0.464 * 0.536 / n)), rates
    # independent: all three dropped about 0.464^3 of the time (SD3: ~10 % unconditional)
    assert abs(np.mean(np.all(np.array(drops) == 1, axis=1)) - 0.464**3) < 0.03
    # a keep mask is exactly 0 or 1 (assemble multiplies by it), and the choices are per epoch: the same
    # (seed, epoch, key) repeats them, another epoch draws again
    assert set(np.unique(drops).tolist()) == {0.0, 1.0}
    again = [decode_sample(raw, doc, record, aug, seed=0, epoch=149)[2:] for raw, doc in raws]
    assert [([1 - k[r] for r in ("clip_l", "clip_g", "t5")], v == "orig") for k, v in again] == \
        [(d, v) for d, v in zip(drops[-len(raws):], variants[-len(raws):])]
    per_epoch = [tuple(map(tuple, drops[e * len(raws):(e + 1) * len(raws)])) for e in range(150)]
    assert len(set(per_epoch)) > 100
    # the evaluation view: original caption, nothing dropped, the posterior mean
    latent, parts, keep, variant = decode_sample(*raws[0], record, None, seed=0, epoch=0)
    mean = S.load_npy(raws[0][0]["latent_mean.npy"]).astype(np.float32)
    ae = record.json["autoencoder"]
    assert variant == "orig" and all(v == 1 for v in keep.values())
    np.testing.assert_allclose(latent.numpy(), (mean - ae["shift_factor"]) * ae["scaling_factor"], rtol=1e-6)


def test_dropped_encoders_are_zero_in_context_and_pooled(golden_stream):
    urls, record = golden_stream
    batches = take(CuratedShards(urls, record, 4, seed=1, shuffle_buffer=4), 8)
    checked = 0
    for batch in batches:
        for i in range(4):
            ctx, pooled, keep = batch["context"][i], batch["pooled"][i], {r: batch["keep"][r][i] for r in batch["keep"]}
            assert bool(ctx[:77, :32].any()) == bool(keep["clip_l"]) == bool(pooled[:32].any())
            assert bool(ctx[:77, 32:80].any()) == bool(keep["clip_g"]) == bool(pooled[32:].any())
            assert bool(ctx[77:].any()) == bool(keep["t5"])
            assert not ctx[:77, 80:].any()  # the zero pad to the T5 width
            checked += 1
    assert checked == 32


def test_global_mode_ranks_take_slices_of_the_single_process_batch(golden_stream):
    urls, record = golden_stream
    one = take(CuratedShards(urls, record, 4, seed=2, shuffle_buffer=4), 5)
    ranks = [take(CuratedShards(urls, record, 4, seed=2, shuffle_buffer=4, rank=r, world_size=2), 5)
             for r in range(2)]
    for b, r0, r1 in zip(one, *ranks):
        assert b["keys"] == r0["keys"] + r1["keys"]
        assert torch.equal(b["context"], torch.cat([r0["context"], r1["context"]]))
    with pytest.raises(DataError, match="divisible"):
        CuratedShards(urls, record, 3, world_size=2)
    with pytest.raises(DataError, match="stall"):
        CuratedShards(urls, record, 4, world_size=2, split="shards")


def test_validation_pass_sees_every_sample_once(golden_stream):
    urls, record = golden_stream
    keys = [k for b in loader(CuratedShards(urls, record, 3, train=False)) for k in b["keys"]]
    assert sorted(keys) == [f"{i:09d}" for i in range(1, 9) if i != 7] and len(keys) == len(set(keys))


def test_shards_from_other_encoders_are_refused(golden, tmp_path):
    shutil.copytree(golden, tmp_path / "out")
    record = S.read_record(tmp_path / "out")
    doc = {k: v for k, v in record.json.items() if k != "arrays"}
    doc["text_encoders"]["t5"]["content_hash"] = "sha256:another-t5"
    S.write_record(tmp_path / "out", doc, record.arrays)
    urls, rec = resolve_shards(str(tmp_path / "out"))
    with pytest.raises(S.ShardFormatError, match="conditioning record"):
        take(CuratedShards(urls, open_record(rec, urls), 2), 1)


def test_shards_with_other_widths_are_refused(golden, tmp_path):
    shutil.copytree(golden, tmp_path / "out")
    record = S.read_record(tmp_path / "out")
    doc = {k: v for k, v in record.json.items() if k != "arrays"}
    doc["text_encoders"]["t5"]["width"] = 128
    doc["context"]["width"] = 128
    new = S.write_record(tmp_path / "out", doc, record.arrays)
    # re-stamp the samples with the new hash so only the widths differ
    import webdataset as wds

    path = tmp_path / "out" / "shards" / "train-000000.tar"
    samples = []
    for raw in wds.WebDataset(str(path), shardshuffle=False):
        sample = {k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}
        sample["json"] = json.dumps({**json.loads(raw["json"]), "conditioning": new.hash}).encode()
        samples.append(sample)
    path.write_bytes(S.tar_bytes(samples))
    urls, rec = resolve_shards(str(tmp_path / "out"))
    with pytest.raises(S.ShardFormatError, match=r"t5\.npy is float16\[77, 96\].*\[77, 128\]"):
        take(CuratedShards(urls, open_record(rec, urls), 2), 1)


def test_read_samples_from_a_byte_offset_seeks_or_streams_to_the_same_samples(golden_stream, tmp_path):
    import gzip

    urls, _ = golden_stream
    whole = list(read_samples(urls[0]))
    assert [raw["__key__"] for raw, _, _ in whole] == [f"{i:09d}" for i in (1, 2, 3, 4, 5, 6, 8)]
    assert whole[0][1] == 0 and all(a[2] == b[1] for a, b in zip(whole, whole[1:]))  # contiguous spans
    # a compressed copy cannot be seeked: it is streamed, skipping the members before the offset
    gz = tmp_path / "train-000000.tar.gz"
    gz.write_bytes(gzip.compress(open(urls[0], "rb").read()))
    for source in (urls[0], str(gz)):
        tail = list(read_samples(source, whole[4][1]))
        assert [(r["__key__"], s, e) for r, s, e in tail] == [(r["__key__"], s, e) for r, s, e in whole[4:]]
        assert all(a[0]["json"] == b[0]["json"] for a, b in zip(tail, whole[4:]))
        assert list(read_samples(source, whole[-1][2])) == []  # the position after the last sample
