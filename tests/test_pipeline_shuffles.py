"""What crosses the pipeline's shuffles: keys, ids, sizes, hashes and descriptors, never pixels. The
bytes through every GroupByKey and side input (the runner's sampled sizes) do not depend on the
training resolution, and stay within the budget per input that the descriptors' fan-out sets."""

from __future__ import annotations

import random

import pytest

from flowcurate.formats.config import load_config
from flowcurate.models.tiny.sample_data import write_sample_data
from flowcurate.pipeline.run import run

EMBEDDING_BYTES = 512 * 4  # the tiny SSCD's float32 descriptor


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shuffles")
    truth = write_sample_data(root / "data", n=48, seed=5)
    out = {}
    for res in (64, 256):
        # Beam samples element sizes with the global `random`: the same draws in both runs sample the
        # same elements, so the estimates compare content, not luck (unseeded, a join of mixed-size
        # elements estimated 15 % apart between two runs of identical content)
        random.seed(0)
        out[res] = run(["--input", str(root / "data" / "raw" / "*.tar"), "--output", str(root / f"out{res}"),
                        "--config", "tiny", "--resolution", str(res)], log=lambda *a, **k: None)
    return truth, out


def test_shuffle_bytes_do_not_depend_on_the_resolution(runs):
    _, out = runs
    lo, hi = out[64]["shuffle_bytes"], out[256]["shuffle_bytes"]
    assert lo.keys() == hi.keys() and len(lo) >= 10
    total_lo, total_hi = sum(lo.values()), sum(hi.values())
    # pixels would scale with the resolution squared: 16x between these runs
    assert total_lo > 0 and abs(total_hi - total_lo) <= 0.05 * total_lo, (total_lo, total_hi)
    # a 256x256 RGB image alone is 196 KB: no shuffle carries anything near one per input
    assert max(hi.values()) / out[256]["inputs"] < 256 * 256 * 3 / 4


def test_shuffle_bytes_per_input_stay_within_the_descriptor_budget(runs):
    truth, out = runs
    assign = load_config("tiny").dedup.assign
    per_input = sum(out[64]["shuffle_bytes"].values()) / truth["n"]
    assert per_input <= (assign + 2) * EMBEDDING_BYTES + 1024, per_input
