"""Incremental curation: new raw data curated against an earlier output (`--previous`) leaves as many
planted duplicate groups with exactly one kept member as curating everything at once, without
reading the earlier data again, and with shard names that do not collide."""

from __future__ import annotations

import pytest

from flowcurate.models.tiny.sample_data import write_sample_data
from flowcurate.pipeline.run import run
from tests.pipeline_inputs import read_manifest, read_shards


def args(inputs, out, *extra):
    return [*(a for i in inputs for a in ("--input", str(i))), "--output", str(out), "--config", "tiny", *extra]


def groups_with_one_kept(truth, kept: set[str]) -> int:
    return sum(len(kept & {g["original"], *g["copies"]}) == 1 for g in truth["duplicate_groups"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("incremental")
    truth = write_sample_data(root / "data", n=256, seed=4)  # two tars of 128
    first, second = sorted((root / "data" / "raw").glob("*.tar"))
    quiet = {"log": lambda *a, **k: None}
    whole = run(args([first, second], root / "whole"), **quiet)
    a = run(args([first], root / "a"), **quiet)
    b = run(args([second], root / "b", "--previous", str(root / "a")), **quiet)
    return root, truth, whole, a, b


def test_two_halves_keep_one_per_group_as_often_as_one_run(runs):
    root, truth, _, _, _ = runs
    rows = {**read_manifest(root / "a"), **read_manifest(root / "b")}
    once = groups_with_one_kept(truth, {k for k, r in read_manifest(root / "whole").items() if r["status"] == "kept"})
    halves = groups_with_one_kept(truth, {k for k, r in rows.items() if r["status"] == "kept"})
    assert abs(once - halves) <= 2, (once, halves)
    # the second run saw the first half's items through the earlier output, and names them
    earlier = {k for k, r in read_manifest(root / "a").items() if r["status"] == "kept"}
    across = [r for r in read_manifest(root / "b").values() if r["duplicate_of"] in earlier]
    assert across and all(r["previous"] == str(root / "a") and r["status"] == "duplicate" for r in across)
    assert all(rows[r["duplicate_of"]]["status"] == "kept" for r in rows.values() if r["status"] == "duplicate")


def test_the_second_run_reads_only_its_own_inputs(runs):
    _, truth, _, a, b = runs
    assert b["stages"]["pass 1"]["inputs"] == b["inputs"] == truth["n"] - a["inputs"]
    assert a["status"]["kept"] > 0 and b["status"]["kept"] > 0


def test_shard_names_do_not_collide(runs):
    root, _, _, _, _ = runs
    first, second = read_shards(root / "a"), read_shards(root / "b")
    assert first and second and not set(first) & set(second)
    keys_a = {k for s in first.values() for k in s}
    keys_b = {k for s in second.values() for k in s}
    assert not keys_a & keys_b
