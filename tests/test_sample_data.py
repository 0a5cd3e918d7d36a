import io
import json
import tarfile
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from flowcurate.models.tiny.procedural import COPY_KINDS, caption, random_scene
from flowcurate.models.tiny.sample_data import BROKEN_KINDS, write_sample_data


def _read_tars(raw):
    members = {}
    for tar_path in sorted(raw.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    return members


def test_truth_matches_what_was_written(tmp_path):
    truth = write_sample_data(tmp_path, n=160, seed=3)
    members = _read_tars(tmp_path / "raw")
    keys = {name.split(".")[0] for name in members}
    assert sorted(keys) == truth["keys"] and len(keys) == truth["n"] == 160
    for key in keys:  # every key has a caption and metadata; the caption is the truth's
        assert members[f"{key}.txt"].decode() == truth["captions"][key]
        assert json.loads(members[f"{key}.json"])["key"] == key

    reasons = Counter(b["reason"] for b in truth["broken"].values())
    assert set(reasons) == set(BROKEN_KINDS.values()) and min(reasons.values()) >= 1
    for key, b in truth["broken"].items():
        images = [n for n in members if n.startswith(key + ".") and n.split(".")[1] in ("jpg", "png")]
        if b["reason"] == "missing_image":
            assert images == []
            continue
        data = members[images[0]]
        if b["reason"] == "empty_file":
            assert data == b""
        else:
            try:
                Image.open(io.BytesIO(data)).load()
                decoded = True
            except OSError as e:
                decoded = False
                assert ("truncated" in str(e)) == (b["reason"] == "truncated")
            assert not decoded

    kinds = Counter(k for g in truth["duplicate_groups"] for k in g["copies"].values())
    assert set(kinds) == set(COPY_KINDS)
    shard_of = {}
    for g in truth["duplicate_groups"]:
        orig = members.get(f"{g['original']}.jpg") or members[f"{g['original']}.png"]
        o = Image.open(io.BytesIO(orig)).convert("RGB")
        assert list(o.size) == truth["sizes"][g["original"]]
        for key, kind in g["copies"].items():
            c = members.get(f"{key}.jpg") or members[f"{key}.png"]
            assert (c == orig) == (kind == "exact")
            assert members[f"{key}.txt"] == members[f"{g['original']}.txt"]
            if kind == "jitter":  # same geometry, different colours
                assert Image.open(io.BytesIO(c)).size == o.size
            shard_of[key] = key[:5]
        shard_of[g["original"]] = g["original"][:5]
    # groups are shuffled across shards (a pipeline must dedup across shard boundaries)
    assert any(len({shard_of[k] for k in [g["original"], *g["copies"]]}) > 1 for g in truth["duplicate_groups"])

    table = pq.read_table(tmp_path / "raw" / "00000.parquet")
    assert table.num_rows == 128 and {"key", "url", "status", "caption", "width"} <= set(table.column_names)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    write_sample_data(tmp_path / "a", n=40, seed=1)
    write_sample_data(tmp_path / "b", n=40, seed=1)
    write_sample_data(tmp_path / "c", n=40, seed=2)
    a = (tmp_path / "a" / "raw" / "00000.tar").read_bytes()
    assert a == (tmp_path / "b" / "raw" / "00000.tar").read_bytes()
    assert a != (tmp_path / "c" / "raw" / "00000.tar").read_bytes()


def test_captions_are_truthful():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = random_scene(rng)
        text = caption(scene)
        for s in scene.shapes:
            assert f"{s.color} {s.kind}" in text
        if len(scene.shapes) == 2:
            a, b = scene.shapes
            if "above" in text:
                assert a.cy < b.cy
            if "below" in text:
                assert a.cy > b.cy


def test_repeated_data_plants_near_copies_that_exact_hashes_miss(tmp_path):
    """write_repeated_data: each repeated original present `copies` times under one caption, every copy
    with its own pixels (re-encoded, resized, jittered), every unique original with a caption of its own."""
    from flowcurate.models.tiny.sample_data import REPEAT_KINDS, write_repeated_data

    truth = write_repeated_data(tmp_path, n_unique=12, n_repeated=3, copies=7, seed=4)
    members = _read_tars(tmp_path / "raw")
    assert truth["n"] == 12 + 3 * 7 == len({n.split(".")[0] for n in members}) and not truth["broken"]
    pixels = {k: np.asarray(Image.open(io.BytesIO(members[f"{k}.jpg"])).convert("RGB")) for k in truth["keys"]}
    assert len({(p.shape, p.tobytes()) for p in pixels.values()}) == truth["n"]  # no exact-pixel duplicate
    assert len(truth["duplicate_groups"]) == 3
    grouped = set()
    for g in truth["duplicate_groups"]:
        group = [g["original"], *g["copies"]]
        assert len(group) == 7 and len({truth["captions"][k] for k in group}) == 1
        assert Counter(g["copies"].values()) == {k: 2 for k in REPEAT_KINDS}
        grouped |= set(group)
    singles = [truth["captions"][k] for k in truth["keys"] if k not in grouped]
    assert len(singles) == len(set(singles)) == 12
    assert not set(singles) & {truth["captions"][g["original"]] for g in truth["duplicate_groups"]}
