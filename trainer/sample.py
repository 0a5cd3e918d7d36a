"""`flowcurate sample`: images from a trained run, and the helpers training uses for its sample grids.

The conditioning record names the autoencoder and text encoders the shards were made with; the command
resolves their sources once at its entry (`model_paths`: a `tiny://` source becomes the tiny-model
cache's folder), the loaders take those paths and check the content hashes, so a grid is never decoded
with another AE than the one the latents came from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flowcurate.formats import shards as S
from flowcurate.formats.config import resolve_device
from flowcurate.models.autoencoder import Autoencoder
from flowcurate.models.conditioning import folder_hash
from flowcurate.models.mmdit import MMDiT, MMDiTConfig
from flowcurate.models.text_encoders import quiet_hf_logging
from flowcurate.trainer import checkpoint as C
from flowcurate.trainer.flow import euler_sample


class ModelMismatch(RuntimeError):
    pass


ENCODERS = ("clip_l", "clip_g", "t5")
MODEL_ROLES = ("autoencoder", *ENCODERS)


def record_entry(record: S.Conditioning, role: str) -> dict:
    """The record's entry of the AE (`role="autoencoder"`) or of a text encoder: source, subfolder, hash."""
    return record.json["autoencoder"] if role == "autoencoder" else record.json["text_encoders"][role]


def model_paths(record: S.Conditioning, roles: tuple[str, ...] = MODEL_ROLES) -> dict[str, str]:
    """role -> where its weights are, as the loaders take them: the record's source, a `tiny://` source
    resolved to the tiny-model cache (each distinct source once; built if needed). Commands call this at
    their entry, with the roles they need."""
    from flowcurate.models.tiny import resolve_tiny

    sources = {role: record_entry(record, role)["source"] for role in roles}
    resolved = {src: resolve_tiny(src, log=lambda *a: None) for src in sorted(set(sources.values()))}
    return {role: resolved[src] for role, src in sources.items()}


def verify_weights(path: str, entry: dict, what: str) -> None:
    """Raise ModelMismatch unless the folder `path/subfolder` holds the weights the record names (its
    content hash): used before loading them here and before `flowcurate export` copies them."""
    found = folder_hash(path, entry["subfolder"], entry.get("revision"))
    if found != entry["content_hash"]:
        raise ModelMismatch(f"{what} at {path}/{entry['subfolder']} has content {found}, but the conditioning "
                            f"record says {entry['content_hash']}: these are not the weights the shards were "
                            "made with (pass --no-verify to use them anyway)")


def load_autoencoder(record: S.Conditioning, path: str, device: str = "cpu", verify: bool = True) -> Autoencoder:
    """The record's AE from `path` (`model_paths(record)["autoencoder"]`), its content hash checked."""
    entry = record_entry(record, "autoencoder")
    if verify:
        verify_weights(path, entry, "autoencoder")
    quiet_hf_logging()
    return Autoencoder.load(path, revision=entry.get("revision"), subfolder=entry["subfolder"], device=device)


def load_text_encoders(record: S.Conditioning, paths: dict[str, str], device: str = "cpu", verify: bool = True):
    """The record's three text encoders from `paths` (`model_paths(record)`), their content hashes checked."""
    from flowcurate.models.text_encoders import TextEncoders

    quiet_hf_logging()
    if verify:
        for role in ENCODERS:
            verify_weights(paths[role], record_entry(record, role), role)
    t5 = record_entry(record, "t5")
    return TextEncoders.load(paths["t5"], revision=t5.get("revision"), t5_length=t5["max_length"], device=device)


def load_model(step: Path, which: str = "ema", device: str = "cpu") -> tuple[MMDiT, dict]:
    state = C.read_state(step)
    model = MMDiT(MMDiTConfig(**state["model_config"]))
    model.load_state_dict(C.load_weights(step, which))
    return model.to(device).eval(), state


def to_parts(arrays: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    return {p: torch.as_tensor(np.asarray(arrays[p], np.float32), device=device) for p in S.PARTS}


@torch.no_grad()
def generate(model: MMDiT, ae: Autoencoder, cond: dict, empty: dict, size: tuple[int, int], seeds: list[int],
             steps: int, shift: float, cfg_scale: float) -> np.ndarray:
    """One image per (prompt row of `cond`, seed) pair, same length lists; returns uint8 (N, H, W, 3)."""
    device = next(model.parameters()).device
    context, pooled = S.assemble(to_parts(cond, device))
    uncond = S.assemble(to_parts(empty, device))
    c, h, w = model.config.in_channels, size[0] // ae.downsample, size[1] // ae.downsample
    noise = torch.stack([torch.randn(c, h, w, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
    x = euler_sample(model, noise, context, pooled, steps=steps, shift=shift, uncond=uncond, cfg_scale=cfg_scale)
    return ae.decode(x)


class StepProgress:
    """The model with a tqdm bar that advances at each forward call (one per Euler step of a batch): the
    progress of `sample` and `memorization` over generations, without touching the sampler."""

    def __init__(self, model: MMDiT, total: int, desc: str):
        from tqdm import tqdm

        self.model, self.bar = model, tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.bar.update()
        return out

    def __getattr__(self, name: str):  # config, parameters(), ... of the model
        return getattr(self.model, name)

    def close(self) -> None:
        self.bar.close()


def grid(images: np.ndarray, cols: int | None = None) -> Image.Image:
    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = Image.new("RGB", (cols * w + (cols - 1) * 2, rows * h + (rows - 1) * 2), (255, 255, 255))
    for i, img in enumerate(images):
        canvas.paste(Image.fromarray(img), ((i % cols) * (w + 2), (i // cols) * (h + 2)))
    return canvas


def load_run(checkpoint, weights: str, device: str):
    """A run folder (its latest step) or a step folder -> (step folder, the run's conditioning
    record, model with `weights`, checkpoint state)."""
    step = C.resolve(checkpoint)
    record = S.read_record(step.parent.parent / S.RECORD_JSON)
    model, state = load_model(step, weights, device)
    return step, record, model, state


def sampling_settings(train: dict, steps: int | None, cfg: float | None, shift: float | None):
    """(Euler steps, guidance scale, timestep shift): each as given, else the run's `train` config's."""
    return (steps or train["sample_steps"], train["cfg_scale"] if cfg is None else cfg,
            train["shift"] if shift is None else shift)


def run_cli(args) -> int:
    device = resolve_device(args.device)
    step, record, model, state = load_run(args.checkpoint, args.weights, device)
    steps, cfg, shift = sampling_settings(state["config"]["train"], args.steps, args.cfg, args.shift)
    # the AE always; the text encoders only for prompts of the user's (the record holds its own encoded)
    paths = model_paths(record, MODEL_ROLES if args.prompt else ("autoencoder",))
    ae = load_autoencoder(record, paths["autoencoder"], device, verify=not args.no_verify)
    if args.prompt:
        te = load_text_encoders(record, paths, device, verify=not args.no_verify)
        cond, empty = te.encode(args.prompt), te.encode([""])
        prompts = args.prompt
    else:
        cond, empty = record.prompt_parts("validation"), record.prompt_parts("empty")
        prompts = record.json["prompts"]["validation"]
    rows = [i for i in range(len(prompts)) for _ in range(args.seeds)]
    seeds = [s for _ in prompts for s in range(args.seeds)]
    cond = {p: np.asarray(cond[p])[rows] for p in S.PARTS}
    size = tuple(args.size) if args.size else tuple(state["sample_size"])
    progress = StepProgress(model, steps, f"sampling {len(seeds)} images")
    images = generate(progress, ae, cond, empty, size, seeds, steps, shift, cfg)
    progress.close()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid(images, cols=args.seeds if args.seeds > 1 else None).save(out)
    out.with_suffix(".json").write_text(json.dumps(
        {"checkpoint": str(step), "step": state["step"], "weights": args.weights,
         "images": [{"prompt": prompts[r], "seed": s} for r, s in zip(rows, seeds)]}, indent=2))
    print(f"wrote {out} ({len(images)} images from {step})")
    return 0
