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
