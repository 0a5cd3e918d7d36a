"""The SD3 §5.3.2 resolution curriculum: positions interpolated into the range the base resolution
trained on (models/mmdit.py `at_resolution`), shift "auto" (formats/config.py, trainer/init.py) and
`--init-from` a flowcurate run, end to end on the tiny preset."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import SD3Transformer2DModel

from flowcurate.models import mmdit
from flowcurate.models.mmdit import MMDiT, at_resolution, cropped_positions
from flowcurate.models.mmdit_diffusers import diffusers_config

TINY = mmdit.SIZES["tiny"]  # 16-patch table, sample_size 16, patch 2


def test_positions_at_512_span_the_range_256_trained_on():
    # 256^2 -> 512^2 with an f=8 autoencoder: latent side 32 -> 64, 16 -> 32 patches. The table of the
    # CPU sizes (d2...): 32 patches, room for 512^2 at the spacing of the whole table, frequencies for 256^2
    base = dataclasses.replace(TINY, pos_embed_max_size=32, sample_size=32)
    moved = at_resolution(base, trained_latent=32, latent=64)
    assert (moved.pos_embed_max_size, moved.pos_embed_base_size, moved.sample_size) == (64, 32, base.sample_size)
    at_256, at_512 = cropped_positions(base, 16), cropped_positions(moved, 32)
    step_256, step_512 = at_256[1] - at_256[0], at_512[1] - at_512[0]
    assert step_512 == step_256 / 2                      # spacing halved
    assert at_512.min() == at_256.min()                  # same first position
    # same covered range: twice the points at half the spacing end on the same cell boundary, half a
    # new step past the old last position (not twice as far, as a fixed spacing would put them)
    assert at_512.max() + step_512 == at_256.max() + step_256
    assert torch.equal(at_512[::2], at_256)              # every old position is still there
    # without the curriculum the 512 crop keeps the 256 spacing and reaches positions never trained on
    fixed = cropped_positions(base, 32)
    assert fixed.min() < at_256.min() and fixed.max() > at_256.max()
    assert fixed.max() - fixed.min() == 2 * (at_256.max() - at_256.min()) + step_256


def test_moved_table_equals_diffusers_and_keeps_the_trained_embeddings():
    moved = at_resolution(TINY, trained_latent=32, latent=64)
    ours, theirs = MMDiT(moved), SD3Transformer2DModel(**diffusers_config(moved))
    assert torch.equal(ours.pos_embed, theirs.pos_embed.pos_embed)  # a diffusers config reproduces it exactly
    d = TINY.hidden_size
    trained = MMDiT(TINY).cropped_pos_embed(32, 32).view(16, 16, d)
    now = ours.cropped_pos_embed(64, 64).view(32, 32, d)
    assert torch.equal(now[::2, ::2], trained)  # the 512 grid holds the 256 embeddings at its even points


def test_moves_chain_and_keep_the_first_base():
    twice = at_resolution(at_resolution(TINY, 32, 64), 64, 128)
    assert (twice.pos_embed_max_size, twice.pos_embed_base_size) == (64, 32)
    assert at_resolution(TINY, 32, 32) is TINY
    with pytest.raises(ValueError, match="whole number of patches"):
        at_resolution(dataclasses.replace(TINY, pos_embed_max_size=15), 32, 48)


# ------------------------------------------------------------------------------------------------------
# shift "auto"

def test_auto_shift_is_sqrt_of_the_pixel_ratio():
    from flowcurate.trainer.init import auto_shift

    assert auto_shift((256, 256), 256) == 1.0   # at the base resolution: no shift
    assert auto_shift((512, 512), 256) == 2.0   # 2x side: sqrt(4)
    assert auto_shift((1024, 1024), 256) == 4.0
    assert auto_shift((192, 256), 256) == pytest.approx((192 * 256) ** 0.5 / 256)


def test_shift_takes_a_number_or_auto():
    from flowcurate.formats.config import ConfigError, from_dict, load_config, override

    assert from_dict({"train": {"shift": "auto", "shift_base_resolution": 512}}).train.shift == "auto"
    assert from_dict({"train": {"shift": 3}}).train.shift == 3.0
    assert override(load_config("tiny"), "train", shift="auto").train.shift == "auto"
    with pytest.raises(ConfigError, match='expected float or "auto"'):
        from_dict({"train": {"shift": "big"}})
    with pytest.raises(ConfigError, match="expected int"):
        from_dict({"train": {"shift_base_resolution": "auto"}})


# ------------------------------------------------------------------------------------------------------
# Done-when (issue 16): a two-command curriculum on the tiny model, 32^2 -> 64^2 images (latent 4 -> 8,
# 2 -> 4 patches with the f=8 tiny autoencoder): 256 -> 512 takes minutes on two CPU cores, this the
# same maths in seconds

@pytest.fixture(scope="module")
def two_resolutions(tiny_models, tmp_path_factory):
    """Shards of the same tiny models at 32^2 and at 64^2 (8 training samples each, no val split)."""
    from conftest import _make_golden

    root = tmp_path_factory.mktemp("curriculum")
    for size in (32, 64):
        _make_golden().main(root / f"out{size}", n=8, odd=(), val_fraction=0.0, size=size)
    return root / "out32", root / "out64"


def test_curriculum_32_to_64_in_two_commands(two_resolutions, tmp_path):
    from flowcurate.trainer import checkpoint as C
    from flowcurate.trainer.cli import main

    out32, out64 = two_resolutions
    cfg = tmp_path / "tiny-curriculum.toml"
    cfg.write_text('[train]\nmodel = "tiny"\nbatch_size = 4\nlr = 1e-3\nwarmup_steps = 2\nmax_steps = 3\n'
                   'shift = "auto"\nshift_base_resolution = 32\ncheckpoint_every = 0\nsample_every = 0\n'
                   'log_every = 1\nmixed_precision = false\n')
    stage1, stage2 = tmp_path / "run32", tmp_path / "run64"
    assert main(["train", "--shards", str(out32), "--config", str(cfg), "--output", str(stage1)]) == 0
    assert main(["train", "--shards", str(out64), "--config", str(cfg), "--output", str(stage2),
                 "--init-from", str(stage1)]) == 0

    s1, s2 = (C.read_state(C.latest(run)) for run in (stage1, stage2))
    # shift "auto" resolved at launch and recorded as a number: 1.0 at the base, sqrt(4) at 2x side
    assert s1["config"]["train"]["shift"] == 1.0 and s2["config"]["train"]["shift"] == 2.0
    assert s2["shift"] == {"requested": "auto", "shift": 2.0, "resolution": [64, 64], "base_resolution": 32}
    assert (s1["sample_size"], s2["sample_size"]) == ([32, 32], [64, 64])
    # positions: the 64^2 stage's table is twice as fine and spans the range the 32^2 stage trained on
    c1, c2 = (mmdit.MMDiTConfig(**s["model_config"]) for s in (s1, s2))
    assert (c2.pos_embed_max_size, c2.pos_embed_base_size) == (2 * c1.pos_embed_max_size, 4)
    at_32, at_64 = cropped_positions(c1, 2), cropped_positions(c2, 4)
    assert at_64.min() == at_32.min() and at_64.max() + (at_64[1] - at_64[0]) == at_32.max() + (at_32[1] - at_32[0])
    w2 = C.load_weights(C.latest(stage2), "ema")
    assert torch.equal(w2["pos_embed"], MMDiT(c2).pos_embed)  # the checkpoint carries the moved table
    # the second stage starts from the first one's weights (all but the rebuilt table), fresh optimizer
    # and data position
    from flowcurate.formats import shards as S
    from flowcurate.trainer.init import from_flowcurate

    model, ema = from_flowcurate(stage1, S.read_record(stage2 / S.RECORD_JSON), (64, 64), "cpu")
    for got, which in ((model.state_dict(), "model"), (ema, "ema")):
        want = C.load_weights(C.latest(stage1), which)
        assert all(torch.equal(got[k], want[k]) for k in want if k != "pos_embed"), which
    assert s2["step"] == s2["data_position"] == 3


def test_init_from_a_step_folder_takes_its_weights_and_ema(two_resolutions, tmp_path):
    from flowcurate.trainer import checkpoint as C
    from flowcurate.trainer.cli import main

    out32, _ = two_resolutions
    common = ["--config", "tiny", "--batch-size", "4", "--sample-every", "0", "--checkpoint-every", "0"]
    assert main(["train", "--shards", str(out32), "--output", str(tmp_path / "a"), "--max-steps", "2", *common]) == 0
    step = C.latest(tmp_path / "a")
    assert main(["train", "--shards", str(out32), "--output", str(tmp_path / "b"), "--max-steps", "0",
                 "--init-from", str(step), *common]) == 0
    for which in ("model", "ema"):
        got, want = C.load_weights(C.latest(tmp_path / "b"), which), C.load_weights(step, which)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), which
    assert not torch.equal(C.load_weights(step, "model")["final_layer.linear.weight"],
                           C.load_weights(step, "ema")["final_layer.linear.weight"])  # two different tensors
    assert C.read_state(C.latest(tmp_path / "b"))["step"] == 0


@pytest.mark.parametrize("subfolder", [None, "transformer"])
def test_init_from_a_pipeline_folder_takes_its_transformer(golden, tmp_path, subfolder):
    # a hub pipeline id needs the same subfolder: "id/transformer" is no valid repo id (the old --help)
    from flowcurate.formats import shards as S
    from flowcurate.formats.config import load_config
    from flowcurate.models.mmdit_diffusers import from_diffusers
    from flowcurate.trainer.init import init_models
    from flowcurate.trainer.train import TrainLaunch

    torch.manual_seed(3)
    ref = SD3Transformer2DModel(**diffusers_config(TINY))
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    launch = TrainLaunch(config=load_config("tiny"), shards=str(golden), output=str(tmp_path / "run"),
                         init_from=str(tmp_path / "pipe"), init_subfolder=subfolder)
    model, ema = init_models(launch, S.read_record(golden / S.RECORD_JSON), "cpu")
    want = from_diffusers(ref).state_dict()
    assert ema is None and all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
