"""`flowcurate train`: rectified-flow MM-DiT training on curated shards (DiT's train.py is the model).

One process, or `torchrun --nproc_per_node N` for DDP (gloo on CPU, nccl on GPU). The batch size in
the config is the global batch. Every step: a batch of model-space latents and assembled text
conditioning (trainer/data.py), t ~ the configured density then shifted, eps ~ N(0, I), the v-loss
(trainer/flow.py), AdamW with linear warm-up and gradient clipping, bf16 autocast on GPUs, then an EMA
update. t and eps are drawn for the whole global batch from one generator on every rank and sliced,
so N ranks see exactly what one process sees.

The run folder: `conditioning.json/.npz` (a copy of the shards' record), `log.jsonl`, `loss.png`,
`samples/step-NNNNNN.png`, `checkpoints/step-NNNNNN/`. Rerunning the same command on a run folder
with checkpoints resumes from the latest; on CPU the result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from flowcurate.formats import shards as S
from flowcurate.formats.config import load_config, override, resolve_device, to_dict
from flowcurate.formats.hashing import stable_hash
from flowcurate.models.mmdit import MMDiT, mmdit_config
from flowcurate.models.mmdit_diffusers import from_pretrained_diffusers
from flowcurate.trainer import checkpoint as C
from flowcurate.trainer.data import Augment, CuratedShards, DataError, loader, open_record, resolve_shards
from flowcurate.trainer.flow import flow_loss, sample_t, validation_loss

CRASH_ENV = "FLOWCURATE_CRASH_AFTER_STEP"  # tests: die abruptly after this step, as a killed job would


def setup_distributed(device: str) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def log_line(path: Path, entry: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def plot_losses(log: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # no log yet (e.g. --max-steps 0 on shards without a val split): an empty plot, not a crash
    text = log.read_text() if log.exists() else ""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train v-loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val v-loss (8 fixed t)", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(stable_hash("noise", f"{seed}:{step}:{stream}") >> 1)


def learning_rate(tc, step: int) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine decay to 0 at max_steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "cosine":
        progress = (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps)
        return tc.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if tc.lr_schedule != "constant":
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {tc.lr_schedule!r}")
    return tc.lr


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    e, m = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(e, [p.detach() for p in m], 1.0 - decay)


def copy_record(record: S.Conditioning, run: Path) -> None:
    """The run keeps a copy of the record; a run folder made from other shards is refused."""
    mine = run / S.RECORD_JSON
    if mine.exists():
        theirs = S.read_record(mine).hash
        if theirs != record.hash:
            raise DataError(f"{run} was trained on shards with conditioning {theirs}, these shards "
                            f"have {record.hash}: use another --output")
    else:
        shutil.copyfile(Path(record.path).with_name(record.json["arrays"]["file"]), run / S.RECORD_NPZ)
        shutil.copyfile(record.path, mine)


@torch.no_grad()
def evaluate(model, urls, record, batch_size: int, device, autocast) -> tuple[float, list[float]]:
    """Mean validation v-loss at t_i = (i + 0.5) / 8 over every validation sample (fixed noise)."""
    total, count = None, 0
    ds = CuratedShards(urls, record, batch_size, train=False)
    for i, batch in enumerate(loader(ds)):
        with autocast:
            per_t = validation_loss(model, batch["latents"].to(device), batch["context"].to(device),
                                    batch["pooled"].to(device), generator=torch.Generator().manual_seed(i))
        n = len(batch["keys"])
        total = per_t.float().cpu() * n if total is None else total + per_t.float().cpu() * n
        count += n
    per_t = (total / count).tolist()
    return float(sum(per_t) / len(per_t)), per_t


def train(args) -> Path:
    device = resolve_device(args.device or "auto")
    rank, world = setup_distributed(device)
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    cfg = load_config(args.config)
    cfg = override(cfg, "train", max_steps=args.max_steps, checkpoint_every=args.checkpoint_every, seed=args.seed,
                   batch_size=args.batch_size, sample_every=args.sample_every, lr=args.lr)
    tc = cfg.train
    run = Path(args.output)
    urls, found = resolve_shards(args.shards, "train")
    val_urls, _ = resolve_shards(args.val_shards or args.shards, "val") if (args.val_shards or
                                                                             Path(args.shards).is_dir()) else ([], None)
    record = open_record(args.conditioning or found, urls)
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        copy_record(record, run)
    if world > 1:
        dist.barrier()

    mc = mmdit_config(tc.model, context_dim=record.context_width, pooled_dim=record.pooled_width,
                      in_channels=record.latent_channels)
    torch.manual_seed(tc.seed)
    model = MMDiT(mc).to(device)
    if args.init_from:
        model = from_pretrained_diffusers(args.init_from).to(device)
        mc = model.config
    if args.gradient_checkpointing:
        model.gradient_checkpointing = True
    ema = MMDiT(mc).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, eps=tc.adam_eps, weight_decay=tc.weight_decay)
    step = 0
    resume = C.latest(run)
    if resume is not None:
        state = C.load(resume, model, ema, opt, device)
        step = state["step"]
        if rank == 0:
            print(f"resuming from {resume} (step {step})", file=sys.stderr)

    use_bf16 = tc.mixed_precision and device.startswith("cuda") and torch.cuda.is_bf16_supported()
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16)
    net = DistributedDataParallel(model) if world > 1 else model
    if args.compile:  # measured on an H200, depth 24, bf16: 1.7x the eager step (BENCHMARKS.md)
        net = torch.compile(net)
    augment = Augment(tc.orig_caption_prob, tc.text_drop_prob)
    ds = CuratedShards(urls, record, tc.batch_size, seed=tc.seed, augment=augment, rank=rank, world_size=world,
                       split=args.split, num_workers=args.workers, shuffle_buffer=args.shuffle_buffer,
                       skip_batches=step)
    log_path, sample_size = run / "log.jsonl", None
    ae = None
    if rank == 0 and tc.sample_every > 0 and "validation.t5" in record.arrays:
        from flowcurate.trainer.sample import ModelMismatch, load_autoencoder

        try:
            ae = load_autoencoder(record, device)
        except (ModelMismatch, OSError) as e:  # grids need the record's exact AE; training does not
            print(f"warning: sample grids disabled: {e}", file=sys.stderr)
    crash_at = int(os.environ.get(CRASH_ENV, "-1"))
    t0, seen = time.time(), 0

    def state_json() -> dict:
        return {"config": to_dict(cfg), "model_config": dataclasses.asdict(mc), "data_position": step,
                "world_size": world, "conditioning": record.hash,
                "sample_size": sample_size, "shards": args.shards}

    def periodic() -> None:
        if val_urls:
            val, per_t = evaluate(ema, val_urls, record, max(1, tc.batch_size), device, autocast)
            log_line(log_path, {"step": step, "val_loss": val, "val_loss_by_t": per_t})
        if ae is not None and sample_size is not None:
            from flowcurate.trainer.sample import generate, grid

            cond, empty = record.prompt_parts("validation"), record.prompt_parts("empty")
            seeds = list(range(len(record.json["prompts"]["validation"])))
            with autocast:
                images = generate(ema, ae, cond, empty, sample_size, seeds, tc.sample_steps, tc.shift, tc.cfg_scale)
            (run / "samples").mkdir(exist_ok=True)
            grid(images).save(run / "samples" / f"step-{step:06d}.png")
        plot_losses(log_path, run / "loss.png")

    model.train()
    for batch in loader(ds, args.workers):
        if step >= tc.max_steps:
            break
        x0 = batch["latents"].to(device)
        if sample_size is None:
            down = record.json["autoencoder"]["downsample"]
            sample_size = [x0.shape[-2] * down, x0.shape[-1] * down]
        # t and eps come from a generator seeded by (seed, step[, rank]): nothing to save, and a resumed
        # run draws what an uninterrupted one draws. In `global` mode every rank draws the global batch
        # and keeps its slice, so N ranks see exactly what one process sees.
        b = len(x0)
        n = b * world if ds.split == "global" else b
        gen = step_generator(tc.seed, step, 0 if ds.split == "global" else rank)
        t = sample_t(n, tc.timestep_density, tc.logit_mean, tc.logit_std, shift=tc.shift, generator=gen)
        eps = torch.randn((n, *x0.shape[1:]), generator=gen)
        lo = rank * b if ds.split == "global" else 0
        t, eps = t[lo:lo + b].to(device), eps[lo:lo + b].to(device)
        for g in opt.param_groups:
            g["lr"] = learning_rate(tc, step)
        with autocast:
            loss = flow_loss(net, x0, batch["context"].to(device), batch["pooled"].to(device), t, eps)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss.item()} (keys {batch['keys'][:4]}...); lower lr, "
                                     "keep grad clipping on, or resume from the last checkpoint")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        update_ema(ema, model, min(tc.ema_decay, (1 + step) / (10 + step)))
        step += 1
        seen += b * world
        if step % tc.log_every == 0 or step == tc.max_steps:
            value = loss.detach().clone()
            if world > 1:
                dist.all_reduce(value)
                value /= world
            if rank == 0:
                dt = time.time() - t0
                log_line(log_path, {"step": step, "loss": value.item(), "grad_norm": float(grad_norm),
                                    "lr": opt.param_groups[0]["lr"], "samples_per_s": seen / max(dt, 1e-9)})
        if rank == 0 and tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0:
            C.save(run, step, model, ema, opt, state_json(), keep=tc.keep_checkpoints)
        if rank == 0 and tc.sample_every > 0 and step % tc.sample_every == 0:
            periodic()
        if step == crash_at:
            os._exit(17)
    if rank == 0:
        if C.latest(run) is None or C.read_state(C.latest(run))["step"] != step:
            C.save(run, step, model, ema, opt, state_json(), keep=tc.keep_checkpoints)
        if tc.sample_every == 0 or step % tc.sample_every:
            periodic()
        print(f"trained {step} steps; run folder {run}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return run


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="train the MM-DiT on curated shards (one process or torchrun DDP)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n"
               "  flowcurate train --shards out/ --config tiny --output run/ --max-steps 400\n"
               "  flowcurate train --shards 'out/shards/train-{000000..000031}.tar' --config sd3 --output run/\n"
               "  torchrun --nproc_per_node 8 -m flowcurate.trainer train --shards out/ --config sd3 --output run/\n"
               "  flowcurate train --shards out/ --config sd3 --output run/ \\\n"
               "      --init-from stabilityai/stable-diffusion-3-medium-diffusers/transformer   # fine-tune\n"
               "Rerun the same command on an existing run folder to resume from its latest checkpoint.")
    p.add_argument("--shards", required=True, help="pipeline output folder, shards folder, brace spec, glob or URLs")
    p.add_argument("--val-shards", help="validation shards (default: the val split of an output folder)")
    p.add_argument("--conditioning", help="conditioning.json (default: found beside the shards)")
    p.add_argument("--config", default="tiny", help="preset name (tiny, sd3) or TOML path")
    p.add_argument("--output", required=True, help="run folder (resumed when it has checkpoints)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--sample-every", type=int, help="steps between validation loss + sample grid (0: at the end)")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--init-from", help="diffusers SD3Transformer2DModel folder to start from (official weights)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default auto: cuda when available)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--shuffle-buffer", type=int, default=256)
    p.add_argument("--split", default="auto", choices=("auto", "global", "shards", "resampled"),
                   help="how ranks share the shards (trainer/data.py)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU: ~1.7x faster steps)")
    p.set_defaults(func=lambda a: (train(a), 0)[1])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowcurate.trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    from flowcurate.trainer.memorization import add_parser as add_memorization
    from flowcurate.trainer.sample import add_parser as add_sample

    add_sample(sub)
    add_memorization(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
