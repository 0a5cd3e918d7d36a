"""Instruction-based image editing (InstructPix2Pix, Brooks et al. 2023; SD3 §5.3.3): the editing mode of
the trainer (`flowcurate train --edit`) and the editor (`flowcurate edit`).

Training. Editing shards (`formats/edit_shards.py`) hold the edited image's posterior (the target x0),
the source image's posterior and the instruction's encodings. A step is the text-to-image step of
`trainer/train.py` with the source latent beside the noisy one on channels:

    x_t = (1 - t) x0 + t eps,   v = model(concat([x_t, source]), t, instruction)   ->   |v - (eps - x0)|²

(`flow.flow_loss` with the concatenation inside the model function). The model is a text-to-image
MM-DiT widened to 2C input channels with zero weights on the new ones (`models/edit.py`), so it starts
as exactly the model it came from: a fresh one of the config's size, `--init-from` a flowcurate
text-to-image run (its EMA too) or a diffusers SD3 transformer (`trainer/init.py` loads both), or an
editing run to go on from. InstructPix2Pix's conditioning dropout, so that both guidance terms below
have a model to compute them: per sample and independently, the source latent is zeroed with
`image_drop_prob` and the whole instruction (all three encoders) with `instruction_drop_prob`
(default 0.1 each: InstructPix2Pix drops each condition in 10 % of samples, correlated so that 5 %
lose both; independent drops lose both in 1 %). The source latent is the posterior mean (its mode,
as InstructPix2Pix encodes it); the target is sampled from its posterior as in text-to-image training.
SD3's per-encoder drops are not applied: the null instruction is all zeros.

Single process (DDP/FSDP for the editing mode is left to later work); checkpoints, the seekable data
position (`trainer/data.py`: the same stream and resume, bit-identical on CPU), EMA, warm-up, grad
clipping, validation loss at 8 fixed t and `loss.png` are the text-to-image trainer's; there are no
sample grids (editing needs source images; use `flowcurate edit`).

Sampling. Euler steps from noise at t = 1 to t = 0 with InstructPix2Pix's two-scale classifier-free
guidance (its eq. 3) written on velocities, from three predictions in one batched forward:

    v = v(0, 0) + s_I (v(I, 0) - v(0, 0)) + s_T (v(I, T) - v(I, 0))

(I the source latent, T the instruction, 0 their null: zeros, as in training). s_I = s_T = 1 gives
v(I, T). Linear in the predictions, so the velocity form equals the eps form of the paper.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowcurate.formats import edit_shards as E
from flowcurate.formats import shards as S
from flowcurate.formats.config import ConfigError, resolve_device, to_dict
from flowcurate.models.autoencoder import to_model_space
from flowcurate.models.edit import is_edit_config, widen_input
from flowcurate.models.mmdit import MMDiT, MMDiTConfig, mmdit_config
from flowcurate.models.mmdit_diffusers import from_pretrained_diffusers
from flowcurate.trainer import checkpoint as C
from flowcurate.trainer import train as t2i
from flowcurate.trainer.data import (
    CuratedShards,
    DataError,
    loader,
    model_space_latent,
    read_samples,
    resolve_shards,
    sample_rng,
)
from flowcurate.trainer.flow import flow_loss, sigmas, validation_ts
from flowcurate.trainer.init import auto_shift, from_flowcurate, is_flowcurate_checkpoint
from flowcurate.trainer.report import progress_bar
from flowcurate.trainer.sample import grid, load_autoencoder, load_text_encoders, model_paths, to_parts

ROLES = ("clip_l", "clip_g", "t5")


@dataclass(frozen=True)
class EditAugment:
    """The editing-time random choices (seeded per sample, like `data.Augment`)."""

    image_drop_prob: float = 0.1  # source latent zeroed (InstructPix2Pix: 10 % of samples lose the image)
    instruction_drop_prob: float = 0.1  # all three encodings zeroed (InstructPix2Pix: 10 % lose the text)
    sample_latent: bool = True  # target z ~ posterior (else its mean); the source is always the mean


# ------------------------------------------------------------------------------------------------------
# Data: editing shards -> batches, on the text-to-image stream (same order, positions, resume)

def decode_edit_sample(raw: dict, doc: dict, record: S.Conditioning, aug: EditAugment | None, seed: int, epoch: int):
    """Raw members -> (target latent (C,h,w), source latent (C,h,w), instruction parts, keep_text 0/1),
    latents in model space. `aug=None` is the evaluation view: nothing dropped, posterior means."""
    rng = sample_rng(seed, epoch, doc["key"])
    arrays = {m: S.load_npy(raw[m]) for m in E.edit_array_members()}
    E.check_edit_arrays(arrays, doc, record, raw.get("__url__", ""))
    keep_image = 0.0 if aug is not None and rng.random() < aug.image_drop_prob else 1.0
    keep_text = 0.0 if aug is not None and rng.random() < aug.instruction_drop_prob else 1.0
    latent = model_space_latent(arrays["latent_mean.npy"], arrays["latent_logvar.npy"], record,
                                rng if aug is not None and aug.sample_latent else None)
    source = model_space_latent(arrays["source_latent_mean.npy"], arrays["source_latent_logvar.npy"], record) * keep_image
    parts = {p: torch.from_numpy(arrays[f"{E.VARIANT}.{p}.npy"]) for p in S.PARTS}
    return latent, source, parts, keep_text


def collate_edit(items: list, keys: list[str]) -> dict:
    parts = {p: torch.stack([it[2][p] for it in items]) for p in S.PARTS}
    keep_text = torch.tensor([it[3] for it in items])
    context, pooled = S.assemble(parts, {r: keep_text for r in ROLES})
    return {"latents": torch.stack([it[0] for it in items]), "sources": torch.stack([it[1] for it in items]),
            "context": context.float(), "pooled": pooled.float(), "keys": keys, "keep_text": keep_text}


class EditShards(CuratedShards):
    """The text-to-image stream (`trainer/data.py`: shuffling, aspect buckets, data positions) over
    editing shards: each sample checked as an editing sample and decoded with its source latent."""

    def check_sample(self, raw: dict) -> dict:
        return E.check_edit_sample(raw, self.record)

    def _decode(self, bucket) -> dict:
        items = [decode_edit_sample(it.raw, it.doc, self.record, self.augment, self.seed, it.epoch) for it in bucket]
        return collate_edit(items, [it.doc["key"] for it in bucket])


def resolve_edit_shards(spec: str, split: str = "train") -> tuple[list[str], Path | None]:
    """`data.resolve_shards` for editing shards (the index must say `task: edit`)."""
    return resolve_shards(spec, split, read_index=E.read_edit_index)


def first_resolution(urls: list[str]) -> tuple[int, int]:
    """[H, W] of the first training sample (what `[train] shift = "auto"` and a moved init need)."""
    for url in urls:
        for raw, _, _ in read_samples(url):
            h, w = json.loads(raw["json"])["resolution"]
            return int(h), int(w)
    raise DataError(f"{urls[:2]}: no training samples")


# ------------------------------------------------------------------------------------------------------
# The model: a widened text-to-image MM-DiT

def edit_forward(model, x: torch.Tensor, source: torch.Tensor, t, context, pooled) -> torch.Tensor:
    """v for noisy latents x (B, C, h, w) given the source latents (B, C, h, w): the model sees them
    concatenated on channels, the noisy latent first (models/edit.py)."""
    return model(torch.cat([x, source.to(x.dtype)], dim=1), t, context, pooled)


def edit_loss(model, x0, source, context, pooled, t, eps) -> torch.Tensor:
    """The v-loss of `flow.flow_loss` with the source latent concatenated to the noisy one."""
    return flow_loss(lambda x, tt, c, p: edit_forward(model, x, source, tt, c, p), x0, context, pooled, t, eps)


def _load_step(step: Path, which: str, device: str) -> MMDiT:
    config = MMDiTConfig(**C.read_state(step)["model_config"])
    model = MMDiT(config, device="meta")
    model.load_state_dict(C.load_weights(step, which), assign=True)
    return model.to(device)


def initial_models(launch, record: S.Conditioning, resolution: tuple[int, int], device: str) -> tuple[MMDiT, MMDiT]:
    """(model, EMA) to start an editing run from: `launch.init_from` (an editing run as it is; a
    text-to-image run's model and EMA, or a diffusers transformer, widened) or a fresh model of the
    config's size, widened. The widened models compute what they came from (models/edit.py)."""
    tc, source = launch.config.train, launch.init_from
    if source and is_flowcurate_checkpoint(source):
        step = C.resolve(source)
        if is_edit_config(MMDiTConfig(**C.read_state(step)["model_config"])):  # go on from an editing run
            model, ema = _load_step(step, "model", device), _load_step(step, "ema", device)
            _check_widths(model.config, record, source)
            return model, ema
        model, ema_weights = from_flowcurate(source, record, resolution, device)  # checks the widths
        ema = MMDiT(model.config, device="meta")
        ema.load_state_dict(ema_weights, assign=True)
        return widen_input(model), widen_input(ema)
    if source:
        subfolder = launch.init_subfolder
        if subfolder is None:
            subfolder = None if (Path(source) / "config.json").is_file() else "transformer"
        model = from_pretrained_diffusers(source, subfolder=subfolder or None).to(device)
        if not is_edit_config(model.config):
            model = widen_input(model)
        _check_widths(model.config, record, source)
        return model, _copy(model)
    config = mmdit_config(tc.model, context_dim=record.context_width, pooled_dim=record.pooled_width,
                          in_channels=record.latent_channels)
    torch.manual_seed(tc.seed)
    model = MMDiT(config).to(device)
    return widen_input(model), widen_input(model)


def _check_widths(config: MMDiTConfig, record: S.Conditioning, where: str) -> None:
    want = {"context_dim": record.context_width, "pooled_dim": record.pooled_width,
            "output_channels": record.latent_channels}
    have = {k: getattr(config, k) for k in want}
    if have != want:
        raise DataError(f"--init-from {where} has widths {have}, these editing shards' record needs {want}")


def _copy(model: MMDiT) -> MMDiT:
    other = MMDiT(model.config, device="meta")
    other.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()}, assign=True)
    return other


# ------------------------------------------------------------------------------------------------------
# Training

@torch.no_grad()
def evaluate_edit(model, urls: list[str], record: S.Conditioning, batch_size: int, device: str) -> tuple[float, list[float]]:
    """Mean editing v-loss at the 8 fixed levels over every validation sample (batch i's noise seeded i)."""
    total, count = torch.zeros(8), 0
    for i, batch in enumerate(loader(EditShards(urls, record, batch_size, train=False))):
        x0, src = batch["latents"].to(device), batch["sources"].to(device)
        c, p = batch["context"].to(device), batch["pooled"].to(device)
        g = torch.Generator().manual_seed(i)
        per_t = torch.stack([edit_loss(model, x0, src, c, p, t.expand(len(x0)),
                                       torch.randn(x0.shape, generator=g).to(device))
                             for t in validation_ts(8, device=device)])
        total += per_t.float().cpu() * len(x0)
        count += len(x0)
    if count == 0:
        raise DataError(f"no validation samples in {urls[:2]}")
    per_t = (total / count).tolist()
    return float(sum(per_t) / len(per_t)), per_t


def train_edit(launch, aug: EditAugment = EditAugment()) -> Path:
    """`flowcurate train --edit`: fine-tune an editing MM-DiT on editing shards (one process). The same
    launch (`train.TrainLaunch`) and run folder layout as text-to-image training; state.json adds
    `task: edit` and `edit` (the drop probabilities)."""
    tc = launch.config.train
    if tc.grad_accum != 1:
        raise ConfigError("the editing mode trains without gradient accumulation (grad_accum 1)")
    device = resolve_device(launch.device)
    urls, found = resolve_edit_shards(launch.shards, "train")
    val_spec = launch.val_shards or (launch.shards if Path(launch.shards).is_dir() else None)
    val_urls = resolve_edit_shards(val_spec, "val")[0] if val_spec else []
    if launch.conditioning is None and found is None:
        raise DataError(f"no conditioning record beside {urls[:1]}: pass --conditioning OUT/conditioning.json")
    record = S.read_record(launch.conditioning or found, task=E.TASK)
    t2i.check_models_fit(launch.config, record)
    resolution = first_resolution(urls)
    shift_record = {"requested": tc.shift, "shift": tc.shift}
    if tc.shift == "auto":
        value = auto_shift(resolution, tc.shift_base_resolution)
        launch = dataclasses.replace(launch, config=dataclasses.replace(
            launch.config, train=dataclasses.replace(tc, shift=value)))
        tc = launch.config.train
        shift_record = {"requested": "auto", "shift": value, "resolution": list(resolution),
                        "base_resolution": tc.shift_base_resolution}
    folder = Path(launch.output)
    folder.mkdir(parents=True, exist_ok=True)
    t2i.copy_record(record, folder)

    resume = C.latest(folder)
    if resume is not None:  # the run's own editing model; init_from only starts a run
        model = _load_step(resume, "model", device)
        ema = _load_step(resume, "ema", device)
    else:
        model, ema = initial_models(launch, record, resolution, device)
        model, ema = model.to(device), ema.to(device)
    ema.requires_grad_(False)
    mc = model.config
    if launch.gradient_checkpointing:
        model.gradient_checkpointing = True
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, eps=tc.adam_eps, weight_decay=tc.weight_decay,
                            fused=device.startswith("cuda") or None)
    step, saved = 0, None
    if resume is not None:
        saved = C.load(resume, model, ema, opt, device)
        step = saved["step"]
        print(f"resuming from {resume} (step {step})", file=sys.stderr)

    settings = dict(seed=tc.seed, augment=aug, split=tc.split, num_workers=launch.workers,
                    shuffle_buffer=tc.shuffle_buffer)
    split = EditShards(urls, record, tc.batch_size, **settings).split
    data = t2i.resume_data(saved, t2i.data_order(launch, 1, split), launch.accept_data_change, resume)
    if data.note:
        print(data.note, file=sys.stderr)
        t2i.log_line(folder / "log.jsonl", {"step": step, "data_order_change": data.note})
    ds = EditShards(urls, record, tc.batch_size, **settings, start_epoch=data.start_epoch,
                    position=data.positions[0] if data.positions else None)
    stream = loader(ds, launch.workers, pin_memory=device.startswith("cuda"))
    autocast = t2i.training_autocast(device, tc.mixed_precision, launch.bf16_on_cpu)
    sample_size = list(resolution)

    def state() -> dict:
        return {"task": E.TASK, "edit": dataclasses.asdict(aug), "config": to_dict(launch.config),
                "launch": t2i.launch_record(launch), "data_order": t2i.data_order(launch, 1, ds.split),
                "model_config": dataclasses.asdict(mc), "world_size": 1, "conditioning": record.hash,
                "data_position": {"batches": stream.batches, "ranks": [stream.position()]},
                "sample_size": sample_size, "shards": launch.shards, "shift": shift_record}

    def validate() -> None:
        if val_urls:
            with autocast:
                val, per_t = evaluate_edit(ema, val_urls, record, max(1, tc.batch_size), device)
            t2i.log_line(folder / "log.jsonl", {"step": step, "val_loss": val, "val_loss_by_t": per_t})
        t2i.plot_losses(folder / "log.jsonl", folder / "loss.png")

    bar = progress_bar(step, tc.max_steps)
    model.train()
    t0, seen, interval = time.time(), 0, t2i.LossInterval()
    batches = iter(stream)
    while step < tc.max_steps:
        batch = next(batches)
        x0 = batch["latents"].to(device, non_blocking=True)
        t, eps = t2i.step_noise(tc, step, tuple(x0.shape), 1, 0, ds.split, device)
        for g in opt.param_groups:
            g["lr"] = t2i.learning_rate(tc, step)
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = edit_loss(model, x0, batch["sources"].to(device, non_blocking=True),
                             batch["context"].to(device, non_blocking=True),
                             batch["pooled"].to(device, non_blocking=True), t, eps)
        loss.backward()
        interval.add(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        t2i.update_ema(ema, model, min(tc.ema_decay, (1 + step) / (10 + step)))
        step += 1
        seen += len(x0)
        bar.update()
        if step % tc.log_every == 0 or step == tc.max_steps:
            value = interval.mean_checked(step, 1)
            interval.reset()
            entry = {"step": step, "loss": value, "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"],
                     "samples_per_s": seen / max(time.time() - t0, 1e-9)}
            t2i.log_line(folder / "log.jsonl", entry)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0:
            interval.mean_checked(step, 1)
            C.save(folder, step, model, ema, opt, state(), keep=tc.keep_checkpoints)
        if tc.sample_every > 0 and step % tc.sample_every == 0:
            validate()
    interval.mean_checked(step, 1)
    if C.latest(folder) is None or C.read_state(C.latest(folder))["step"] != step:
        C.save(folder, step, model, ema, opt, state(), keep=tc.keep_checkpoints)
    if tc.sample_every == 0 or step % tc.sample_every:
        validate()
    bar.close()
    print(f"trained {step} editing steps; run folder {folder}")
    return folder


def run_train_cli(args) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("flowcurate train --edit runs in one process (no torchrun yet)")
    aug = EditAugment(image_drop_prob=args.image_drop_prob, instruction_drop_prob=args.instruction_drop_prob)
    train_edit(t2i.launch_from_args(args), aug)
    return 0


# ------------------------------------------------------------------------------------------------------
# Sampling: Euler with InstructPix2Pix's two-scale guidance on velocities

def ip2p_guidance(v_full: torch.Tensor, v_image: torch.Tensor, v_none: torch.Tensor, image_scale: float,
                  text_scale: float) -> torch.Tensor:
    """InstructPix2Pix eq. 3 on velocities: v(0,0) + s_I (v(I,0) - v(0,0)) + s_T (v(I,T) - v(I,0)).
    v_full = v(I, T), v_image = v(I, 0) (instruction dropped), v_none = v(0, 0) (both dropped)."""
    return v_none + image_scale * (v_image - v_none) + text_scale * (v_full - v_image)


@torch.no_grad()
def edit_sample(model, noise: torch.Tensor, source: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                steps: int = 28, shift: float = 1.0, image_scale: float = 1.5, text_scale: float = 7.5,
                ts: torch.Tensor | None = None) -> torch.Tensor:
    """Edited latents (B, C, h, w) from noise (B, C, h, w), source latents (B, C, h, w) and the
    instruction's context (B, L, D) and pooled (B, P), by Euler steps x <- x + (t_next - t) v from t = 1
    to 0 (`flow.sigmas(steps, shift)` or `ts`). Unless both scales are 1 (then v = v(I, T), one forward),
    each step is one batched forward on [(I, T); (I, 0); (0, 0)], the nulls being zeros as in training,
    combined by `ip2p_guidance`."""
    ts = sigmas(steps, shift, device=noise.device) if ts is None else ts.to(noise.device, torch.float32)
    guided = (image_scale, text_scale) != (1, 1)
    if guided:
        source = torch.cat([source, source, torch.zeros_like(source)])
        context = torch.cat([context, torch.zeros_like(context), torch.zeros_like(context)])
        pooled = torch.cat([pooled, torch.zeros_like(pooled), torch.zeros_like(pooled)])
    x = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        x_in = torch.cat([x, x, x]) if guided else x
        v = edit_forward(model, x_in, source, t.expand(len(x_in)), context, pooled)
        if guided:
            v = ip2p_guidance(*v.chunk(3), image_scale, text_scale)
        x = x + (t_next - t).to(x.dtype) * v.to(x.dtype)
    return x


def load_edit_run(checkpoint, weights: str, device: str):
    """(step folder, the run's editing record, editing model with `weights`, state)."""
    step = C.resolve(checkpoint)
    record = S.read_record(step.parent.parent / S.RECORD_JSON, task=E.TASK)
    state = C.read_state(step)
    if state.get("task") != E.TASK:
        raise DataError(f"{step} is not an editing run (train one with `flowcurate train --edit`)")
    model = _load_step(step, weights, device).eval()
    return step, record, model, state


def prepare_image(image, size: tuple[int, int]) -> np.ndarray:
    """A PIL image -> uint8 (H, W, 3) at `size` [H, W]: scaled to cover it, then centre-cropped."""
    from PIL import Image

    h, w = size
    image = image.convert("RGB")
    scale = max(h / image.height, w / image.width)
    rw, rh = max(w, round(image.width * scale)), max(h, round(image.height * scale))
    image = image.resize((rw, rh), Image.Resampling.LANCZOS)
    left, top = (rw - w) // 2, (rh - h) // 2
    return np.asarray(image.crop((left, top, left + w, top + h)))


@torch.no_grad()
def edit_images(model, ae, te, images: np.ndarray, instructions: list[str], seeds: list[int], steps: int,
                shift: float, image_scale: float, text_scale: float) -> np.ndarray:
    """One edited image per (image, instruction, seed) row: uint8 images (N, H, W, 3) in, uint8 out.
    `te` is a `TextEncoders`; the source latent is the AE's posterior mean, as in training."""
    device = next(model.parameters()).device
    mean, _ = ae.encode(list(images))
    source = to_model_space(torch.from_numpy(mean), ae.scaling_factor, ae.shift_factor).to(device)
    context, pooled = S.assemble(to_parts(te.encode(instructions), device))
    noise = torch.stack([torch.randn(source.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    x = edit_sample(model, noise.to(device), source, context, pooled, steps, shift, image_scale, text_scale)
    return ae.decode(x)


def run_edit_cli(args) -> int:
    from PIL import Image

    device = resolve_device(args.device)
    step, record, model, state = load_edit_run(args.checkpoint, args.weights, device)
    steps = args.steps or state["config"]["train"]["sample_steps"]
    shift = state["config"]["train"]["shift"] if args.shift is None else args.shift
    paths = model_paths(record)
    ae = load_autoencoder(record, paths["autoencoder"], device, verify=not args.no_verify)
    te = load_text_encoders(record, paths, device, verify=not args.no_verify)
    size = tuple(args.size) if args.size else tuple(state["sample_size"])
    source = prepare_image(Image.open(args.image), size)
    scales = [(si, st) for si in args.image_guidance for st in args.text_guidance]
    rows = []
    for si, st in scales:  # one row per scale pair: the input, then one output per seed
        out = edit_images(model, ae, te, np.stack([source] * args.seeds), [args.instruction] * args.seeds,
                          list(range(args.seeds)), steps, shift, si, st)
        rows.append(out)
    target = Path(args.output)
    target.parent.mkdir(parents=True, exist_ok=True)
    if len(scales) == 1 and args.seeds == 1:
        Image.fromarray(rows[0][0]).save(target)
    else:
        grid(np.concatenate([np.concatenate([source[None], r]) for r in rows]), cols=args.seeds + 1).save(target)
    target.with_suffix(".json").write_text(json.dumps(
        {"checkpoint": str(step), "step": state["step"], "weights": args.weights, "instruction": args.instruction,
         "image": str(args.image), "steps": steps, "shift": shift, "seeds": list(range(args.seeds)),
         "rows": [{"image_guidance": si, "text_guidance": st} for si, st in scales],
         "layout": "one image" if len(scales) == 1 and args.seeds == 1 else
                   "a row per guidance pair: the input, then one output per seed"}, indent=2))
    print(f"wrote {target} ({len(scales) * args.seeds} edits from {step})")
    return 0
