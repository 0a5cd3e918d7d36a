"""The curated-shard contract (formats/shards.py): conditioning record, deterministic tars, the golden
fixture, and the conditioning assembly against diffusers' encode_prompt."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds

from flowcurate.formats import shards as S


def test_text_encoders_match_diffusers_encode_prompt(tiny_models):
    from diffusers import StableDiffusion3Pipeline

    from flowcurate.models.text_encoders import TextEncoders

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_models / "sd3")
    prompts = ["a red circle above a blue square", "", "a green triangle " * 40]
    for length in (77, 20):
        te = TextEncoders.load(str(tiny_models / "sd3"), t5_length=length)
        ours = te.encode(prompts)
        context, pooled = S.assemble({p: torch.from_numpy(ours[p]) for p in S.PARTS})
        ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                   max_sequence_length=length)
        assert context.shape == (3, 77 + length, 96)
        torch.testing.assert_close(context, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=0)
        assert ours["truncated"].tolist() == [False, False, True]


def test_assemble_orders_pads_and_drops():
    b, wl, wg, wt, lt = 3, 4, 6, 16, 5
    g = torch.Generator().manual_seed(0)
    parts = {"clip_l": torch.randn(b, 77, wl, generator=g), "clip_g": torch.randn(b, 77, wg, generator=g),
             "t5": torch.randn(b, lt, wt, generator=g), "clip_l_pooled": torch.randn(b, wl, generator=g),
             "clip_g_pooled": torch.randn(b, wg, generator=g)}
    ctx, pooled = S.assemble(parts)
    assert ctx.shape == (b, 77 + lt, wt) and pooled.shape == (b, wl + wg)
    assert torch.equal(ctx[:, :77, :wl], parts["clip_l"]) and torch.equal(ctx[:, :77, wl:wl + wg], parts["clip_g"])
    assert not ctx[:, :77, wl + wg:].any() and torch.equal(ctx[:, 77:], parts["t5"])
    keep = {"clip_l": [0, 1, 1], "clip_g": [1, 0, 1], "t5": [1, 1, 0]}
    ctx, pooled = S.assemble(parts, keep)
    assert not ctx[0, :77, :wl].any() and not pooled[0, :wl].any() and ctx[0, :77, wl:wl + wg].abs().sum() > 0
    assert not ctx[1, :77, wl:wl + wg].any() and not pooled[1, wl:].any() and pooled[1, :wl].abs().sum() > 0
    assert not ctx[2, 77:].any() and torch.equal(ctx[2, :77, :wl], parts["clip_l"][2])


def test_record_round_trip_is_deterministic_and_tamper_evident(tmp_path):
    doc = {"format_version": S.FORMAT_VERSION, "note": "x"}
    arrays = {"empty.t5": np.arange(6, dtype=np.float16).reshape(1, 2, 3)}
    rec = S.write_record(tmp_path / "a", doc, arrays)
    S.write_record(tmp_path / "b", doc, arrays)
    for name in (S.RECORD_JSON, S.RECORD_NPZ):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert rec.hash == "sha256:" + hashlib.sha256((tmp_path / "a" / S.RECORD_JSON).read_bytes()).hexdigest()
    back = S.read_record(tmp_path / "a")
    assert back.hash == rec.hash and np.array_equal(back.arrays["empty.t5"], arrays["empty.t5"])
    np.savez(tmp_path / "a" / S.RECORD_NPZ, **{"empty.t5": np.zeros((1, 2, 3), np.float16)})
    with pytest.raises(S.ShardFormatError, match="content hash"):
        S.read_record(tmp_path / "a")
    with pytest.raises(S.ShardFormatError, match="no conditioning record"):
        S.read_record(tmp_path / "missing")


def _sample(key: str, rec_hash: str = "sha256:x"):
    enc = {v: {"clip_l": np.ones((77, 2)), "clip_l_pooled": np.ones(2), "clip_g": np.ones((77, 3)),
               "clip_g_pooled": np.ones(3), "t5": np.ones((4, 8))} for v in S.VARIANTS}
    meta = {"source": f"raw.tar#{key}.jpg", "width": 9, "height": 9, "crop": [0, 0, 9, 9], "resolution": [16, 16],
            "caption": {"orig": "o", "syn": "s"}}
    return S.encode_sample(key, np.zeros((4, 2, 2)), np.zeros((4, 2, 2)), enc, meta, rec_hash)


def test_tars_are_byte_identical_sorted_and_readable(tmp_path):
    samples = [_sample(k) for k in ("b", "a", "c")]
    data = S.tar_bytes(samples)
    assert data == S.tar_bytes(list(reversed(samples)))
    (tmp_path / "t.tar").write_bytes(data)
    got = list(wds.WebDataset(str(tmp_path / "t.tar"), shardshuffle=False))
    assert [g["__key__"] for g in got] == ["a", "b", "c"]
    assert set(got[0]) - {"__key__", "__url__", "__local_path__"} == {*S.array_members(), "json"}
    assert S.load_npy(got[0]["orig.t5.npy"]).dtype == np.float16
    assert json.loads(got[0]["json"])["conditioning"] == "sha256:x"
    with pytest.raises(S.ShardFormatError, match="contains"):
        S.tar_bytes([_sample("a.b")])


def test_split_hash_is_stable_and_proportional():
    keys = [f"{i:09d}" for i in range(20000)]
    val = [k for k in keys if S.split_of(k, 0.1) == "val"]
    assert 0.09 < len(val) / len(keys) < 0.11
    assert [S.split_of(k, 0.1) for k in keys[:50]] == [S.split_of(k, 0.1) for k in keys[:50]]
    assert S.shard_name("train", 3) == "train-000003.tar"


def test_golden_fixture_follows_the_contract(golden):
    record = S.read_record(golden)
    index = S.read_index(golden / "shards")
    assert index["conditioning"] == record.hash
    ctx = record.json["context"]
    assert ctx == {"clip_length": 77, "t5_length": 77, "length": 154, "width": 96, "pooled_width": 80}
    assert record.json["autoencoder"]["latent_channels"] == 16 and record.json["store_dtype"] == "float16"
    assert record.arrays["empty.t5"].shape == (1, 77, 96)
    assert record.arrays["validation.clip_g_pooled"].shape == (len(record.json["prompts"]["validation"]), 48)
    seen = {}
    for entry in index["shards"]:
        got = list(wds.WebDataset(str(golden / "shards" / entry["name"]), shardshuffle=False))
        assert len(got) == entry["samples"] > 0
        for raw in got:
            doc = S.check_sample(raw, record)
            arrays = {m: S.load_npy(raw[m]) for m in S.array_members()}
            S.check_arrays(arrays, doc, record)
            assert S.split_of(doc["key"], 0.25) == entry["split"] and "." not in doc["key"]
            assert set(doc) >= {"source", "width", "height", "crop", "resolution", "caption", "conditioning"}
            seen[doc["key"]] = tuple(doc["resolution"])
    assert len(seen) == 8 and sorted(set(seen.values())) == [(48, 64), (64, 64)]
    assert S.expected_shapes(record.json, (48, 64))["latent_mean.npy"] == (16, 6, 8)


def test_check_sample_names_what_differs(golden, tmp_path):
    record = S.read_record(golden)
    raw = next(iter(wds.WebDataset(str(golden / "shards" / "train-000000.tar"), shardshuffle=False)))
    other = {**raw, "json": json.dumps({**json.loads(raw["json"]), "conditioning": "sha256:other"}).encode()}
    with pytest.raises(S.ShardFormatError, match="sha256:other"):
        S.check_sample(other, record)
    doc = S.check_sample(raw, record)
    arrays = {m: S.load_npy(raw[m]) for m in S.array_members()}
    arrays["syn.t5.npy"] = arrays["syn.t5.npy"][:, :64]
    with pytest.raises(S.ShardFormatError, match=r"syn\.t5\.npy"):
        S.check_arrays(arrays, doc, record)
    missing = {k: v for k, v in raw.items() if k != "orig.clip_g.npy"}
    with pytest.raises(S.ShardFormatError, match="missing"):
        S.check_sample(missing, record)


def test_npz_bytes_load_with_numpy():
    data = S.npz_bytes({"a.b": np.ones((2, 2), np.float16)})
    with np.load(io.BytesIO(data)) as z:
        assert z["a.b"].dtype == np.float16 and z["a.b"].sum() == 4


