"""`flowcurate sample`: images from a trained run, and the helpers training uses for its sample grids.

The conditioning record names the autoencoder and text encoders the shards were made with; they are
loaded from there (a `tiny://` source resolves to the tiny-model cache), and their content hashes are
checked, so a grid is never decoded with another AE than the one the latents came from.
"""

from __future__ import annotations

import argparse
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


def model_source(record: S.Conditioning, role: str) -> tuple[str, dict]:
    """Resolved folder of the AE (`role="autoencoder"`) or a text encoder, and its record entry."""
    entry = record.json["autoencoder"] if role == "autoencoder" else record.json["text_encoders"][role]
    source = entry["source"]
    if source.startswith("tiny://"):
        from flowcurate.models.tiny import resolve_tiny

        source = resolve_tiny(source, log=lambda *a: None)
    return source, entry


def _verify(source: str, entry: dict, what: str) -> None:
    found = folder_hash(source, entry["subfolder"], entry.get("revision"))
    if found != entry["content_hash"]:
        raise ModelMismatch(f"{what} at {source}/{entry['subfolder']} has content {found}, but the conditioning "
                            f"record says {entry['content_hash']}: these are not the weights the shards were "
                            "made with (pass --no-verify to use them anyway)")


def load_autoencoder(record: S.Conditioning, device: str = "cpu", verify: bool = True) -> Autoencoder:
    source, entry = model_source(record, "autoencoder")
    if verify:
        _verify(source, entry, "autoencoder")
    quiet_hf_logging()
    return Autoencoder.load(source, revision=entry.get("revision"), subfolder=entry["subfolder"], device=device)


def load_text_encoders(record: S.Conditioning, device: str = "cpu", verify: bool = True):
    from flowcurate.models.text_encoders import TextEncoders

    quiet_hf_logging()
    source, _ = model_source(record, "t5")
    if verify:
        for role in ("clip_l", "clip_g", "t5"):
            _verify(*model_source(record, role), role)
    t5 = record.json["text_encoders"]["t5"]
    return TextEncoders.load(source, revision=t5.get("revision"), t5_length=t5["max_length"], device=device)


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


def grid(images: np.ndarray, cols: int | None = None) -> Image.Image:
    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = Image.new("RGB", (cols * w + (cols - 1) * 2, rows * h + (rows - 1) * 2), (255, 255, 255))
    for i, img in enumerate(images):
        canvas.paste(Image.fromarray(img), ((i % cols) * (w + 2), (i // cols) * (h + 2)))
    return canvas


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sample", help="generate an image grid from a trained run (EMA weights)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate images with a trained MM-DiT; prompts are encoded with the text encoders "
                    "named in the run's conditioning record and decoded with its autoencoder.",
        epilog="examples:\n  flowcurate sample --checkpoint run/ --prompt 'a red circle' --output grid.png\n"
               "  flowcurate sample --checkpoint run/checkpoints/step-000400 --prompt 'a' --prompt 'b' \\\n"
               "      --seeds 4 --cfg 3 --steps 28 --output grid.png")
    p.add_argument("--checkpoint", required=True, help="run folder (its latest step) or a step folder")
    p.add_argument("--prompt", action="append", help="prompt (repeatable); default: the record's validation prompts")
    p.add_argument("--output", required=True, help="PNG grid to write (a JSON beside it lists prompts and seeds)")
    p.add_argument("--seeds", type=int, default=1, help="images per prompt (seeds 0..N-1)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="image size (default: the run's)")
    p.add_argument("--steps", type=int, help="Euler steps (default: the run's sample_steps)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the run's)")
    p.add_argument("--shift", type=float, help="timestep shift (default: the run's)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default auto: cuda when available)")
    p.add_argument("--no-verify", action="store_true", help="skip the content-hash check of AE and encoders")
    p.set_defaults(func=run_cli)
    return p


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
    ae = load_autoencoder(record, device, verify=not args.no_verify)
    if args.prompt:
        te = load_text_encoders(record, device, verify=not args.no_verify)
        cond, empty = te.encode(args.prompt), te.encode([""])
        prompts = args.prompt
    else:
        cond, empty = record.prompt_parts("validation"), record.prompt_parts("empty")
        prompts = record.json["prompts"]["validation"]
    rows = [i for i in range(len(prompts)) for _ in range(args.seeds)]
    seeds = [s for _ in prompts for s in range(args.seeds)]
    cond = {p: np.asarray(cond[p])[rows] for p in S.PARTS}
    size = tuple(args.size) if args.size else tuple(state["sample_size"])
    images = generate(model, ae, cond, empty, size, seeds, steps, shift, cfg)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid(images, cols=args.seeds if args.seeds > 1 else None).save(out)
    out.with_suffix(".json").write_text(json.dumps(
        {"checkpoint": str(step), "step": state["step"], "weights": args.weights,
         "images": [{"prompt": prompts[r], "seed": s} for r, s in zip(rows, seeds)]}, indent=2))
    print(f"wrote {out} ({len(images)} images from {step})")
    return 0
