"""Where a training run starts, and what it resolves from its shards at launch: the SD3 §5.3.2
resolution curriculum (train at 256^2, then go on at 512^2, 1024^2 from the previous stage's run).

- `resolve_shift`: `[train] shift = "auto"` becomes alpha = sqrt(m / n), m = latent pixels of the
  shards' samples, n = latent pixels at `shift_base_resolution`^2 (one autoencoder: the ratio of image
  pixels). Resolved once at launch so every checkpoint records the number that trained it, and
  `flowcurate sample` / `export` read a number.
- `init_models`: `--init-from` a flowcurate run folder or step folder (its weights and EMA; the
  optimizer and data position start fresh, as in a new stage), a local diffusers
  `SD3Transformer2DModel` folder, or a pipeline (hub id or folder) whose `transformer/` is taken
  (`--init-subfolder` names another; "" for a transformer repo). A flowcurate run
  trained at another resolution has its positions moved with `models.mmdit.at_resolution`, so the new
  resolution spans the position range the previous one trained on.

Called from trainer/train.py (`train`, `build_models`); kept apart so the trainer loop stays short.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import webdataset as wds

from flowcurate.formats import shards as S
from flowcurate.models.mmdit import MMDiT, MMDiTConfig, at_resolution, get_2d_sincos_pos_embed
from flowcurate.models.mmdit_diffusers import from_pretrained_diffusers
from flowcurate.trainer import checkpoint as C
from flowcurate.trainer.data import DataError, resolve_shards

if TYPE_CHECKING:
    from flowcurate.trainer.launch import TrainLaunch


# ------------------------------------------------------------------------------------------------------
# What the shards say

def first_sample_resolution(shards: str) -> tuple[int, int]:
    """[H, W] image pixels of the first training sample: the resolution a run trains at (a stage of
    the curriculum is one resolution; aspect buckets keep about its pixel count)."""
    urls, _ = resolve_shards(shards, "train")
    for url in urls:
        for raw in wds.WebDataset([url], shardshuffle=False, nodesplitter=None, workersplitter=None,
                                  empty_check=False):
            h, w = json.loads(raw["json"])["resolution"]
            return int(h), int(w)
    raise DataError(f"{shards}: no training samples")


def auto_shift(resolution: tuple[int, int], base_resolution: int) -> float:
    """alpha = sqrt(m / n) (SD3 §5.3.2): m = pixels at `resolution` [H, W], n = `base_resolution`^2.
    Latent pixels are image pixels / downsample^2 for both, so the ratio is the same."""
    h, w = resolution
    return math.sqrt(h * w / base_resolution ** 2)


def resolve_shift(launch: TrainLaunch) -> tuple[TrainLaunch, dict]:
    """(the launch with a numeric `[train] shift`, what state.json records about it). A number is kept;
    "auto" becomes `auto_shift` of the shards' first training sample."""
    tc = launch.config.train
    if tc.shift != "auto":
        return launch, {"requested": tc.shift, "shift": tc.shift}
    resolution = first_sample_resolution(launch.shards)
    value = auto_shift(resolution, tc.shift_base_resolution)
    config = dataclasses.replace(launch.config, train=dataclasses.replace(tc, shift=value))
    return dataclasses.replace(launch, config=config), {
        "requested": "auto", "shift": value, "resolution": list(resolution),
        "base_resolution": tc.shift_base_resolution}


# ------------------------------------------------------------------------------------------------------
# Where the weights come from

def is_flowcurate_checkpoint(path: str | Path) -> bool:
    """A step folder (state.json) or a run folder with at least one checkpoint."""
    path = Path(path)
    return (path / C.STATE).is_file() or C.latest(path) is not None


def _latent_side(resolution, downsample: int) -> int:
    """Side of the square latent with the pixels of `resolution` [H, W] (image pixels)."""
    return round(math.sqrt(resolution[0] * resolution[1])) // downsample


def _check_widths(config: MMDiTConfig, record: S.Conditioning, where: str) -> None:
    want = {"context_dim": record.context_width, "pooled_dim": record.pooled_width,
            "in_channels": record.latent_channels}
    have = {k: getattr(config, k) for k in want}
    if have != want:
        raise DataError(f"--init-from {where} has widths {have}, these shards' record needs {want}: "
                        "it was trained with other text encoders or another autoencoder")


def _load(step: Path, which: str, config: MMDiTConfig, fresh_table: bool, device: str) -> MMDiT:
    weights = C.load_weights(step, which)
    if fresh_table:  # a fixed sin-cos buffer, never trained: rebuilt for the moved grid
        weights["pos_embed"] = get_2d_sincos_pos_embed(
            config.hidden_size, config.pos_embed_max_size, config.sample_size // config.patch_size).unsqueeze(0)
    model = MMDiT(config, device="meta")  # every tensor is assigned below
    model.load_state_dict(weights, assign=True)
    return model.to(device)


def from_flowcurate(path: str | Path, record: S.Conditioning, resolution: tuple[int, int],
                    device: str) -> tuple[MMDiT, dict[str, torch.Tensor]]:
    """(model, EMA weights) of a run's latest or a given step checkpoint, moved to `resolution` [H, W]
    (image pixels) when the checkpoint trained at another one."""
    step = C.resolve(path)
    state = C.read_state(step)
    trained = MMDiTConfig(**state["model_config"])
    _check_widths(trained, record, str(path))
    config = trained
    if state.get("sample_size"):  # None: it stopped before its first batch, no resolution to keep
        down = record.json["autoencoder"]["downsample"]
        config = at_resolution(trained, _latent_side(state["sample_size"], down), _latent_side(resolution, down))
    moved = config != trained
    model = _load(step, "model", config, moved, device)
    ema = _load(step, "ema", config, moved, device)
    return model, ema.state_dict()


def init_models(launch: TrainLaunch, record: S.Conditioning, device: str) -> tuple[MMDiT, dict | None]:
    """(model, EMA weights or None: start the EMA at the model) for `launch.init_from`."""
    source = launch.init_from
    if is_flowcurate_checkpoint(source):
        return from_flowcurate(source, record, first_sample_resolution(launch.shards), device)
    subfolder = launch.init_subfolder
    if subfolder is None:  # a transformer folder as it is, else a pipeline's (local or hub) transformer/
        subfolder = None if (Path(source) / "config.json").is_file() else "transformer"
    model = from_pretrained_diffusers(source, subfolder=subfolder or None).to(device)
    _check_widths(model.config, record, source)
    return model, None
