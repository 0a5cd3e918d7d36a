"""The MM-DiT for instruction-based image editing (InstructPix2Pix, Brooks et al. 2023, §3.2; SD3 §5.3.3).

An editing model takes the noisy latent and the source image's latent concatenated on channels and
predicts the velocity of the noisy latent only: 2C in, C out (SD3: 32 in, 16 out). It starts from a
text-to-image MM-DiT with the patch embedding widened: the weights of the new input channels are zero,
so the widened model computes exactly what the text-to-image model computed, whatever the source is
(`widen_input`; tested bit for bit), and fine-tuning learns to use the source from there. Everything
else (blocks, final layer, positions) is the text-to-image model's, unchanged.

Channel order, fixed here and followed by the trainer and the sampler (trainer/edit.py):
`x_in = concat([x_t, source], dim=1)`, the noisy latent first, as InstructPix2Pix does.
"""

from __future__ import annotations

import dataclasses

import torch

from flowcurate.models.mmdit import MMDiT, MMDiTConfig


def edit_config(config: MMDiTConfig) -> MMDiTConfig:
    """The editing config of a text-to-image config: in_channels doubled, out_channels the latent's."""
    if config.out_channels is not None and config.out_channels != config.in_channels:
        raise ValueError(f"already an editing config ({config.in_channels} in, {config.out_channels} out)")
    return dataclasses.replace(config, in_channels=2 * config.in_channels, out_channels=config.in_channels)


def is_edit_config(config: MMDiTConfig) -> bool:
    """True for a model that takes the source latent beside the noisy one (2C in, C out)."""
    return config.in_channels == 2 * config.output_channels


def widen_input(model: MMDiT) -> MMDiT:
    """A new editing MM-DiT (on `model`'s device and dtype) holding a copy of `model`'s weights, with the
    patch embedding's weights for the source channels at zero: its first forward on
    `concat([x_t, source])` equals `model(x_t)` exactly (adding zero products changes no float sum)."""
    config = edit_config(model.config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    w = state["x_embedder.proj.weight"]  # (D, C, p, p)
    state["x_embedder.proj.weight"] = torch.cat([w, torch.zeros_like(w)], dim=1)  # (D, 2C, p, p)
    wide = MMDiT(config, device="meta")  # every tensor is assigned below
    wide.load_state_dict(state, assign=True)
    return wide
