"""`flowcurate train`: rectified-flow MM-DiT training on curated shards (DiT's train.py is the model).

One process, or `torchrun --nproc_per_node N` for DDP or FSDP (gloo on CPU, nccl on GPU; the ranks'
process group, wrappers and FSDP's sharded checkpoints are trainer/parallel.py). The batch size in
the config is the global batch. Every step: a batch of model-space latents and assembled text
conditioning (trainer/data.py), t ~ the configured density then shifted, eps ~ N(0, I), the v-loss
(trainer/flow.py; in `grad_accum` micro-batches when asked, the same gradient), AdamW with linear
warm-up and gradient clipping, bf16 autocast on GPUs, then an EMA update. t and eps are drawn for the
whole global batch from one generator on every rank and sliced, so N ranks see exactly what one
process sees; the generator lives on the step's device, so a CUDA step waits for nothing on the host
(pinned batches, fused AdamW, the loss read back once per log interval: `LossInterval`). Validation
is split over the ranks (`evaluate`); grids and checkpoints are rank 0's (under FSDP every rank takes
part in both: the sharded EMA's forwards and the checkpoint's shards are collectives).

`train(launch)` takes a `TrainLaunch`: the TOML config plus what only this launch knows (paths, device,
loader workers, compile, gradient checkpointing, parallel mode; trainer/launch.py). `launch_from_args`
builds it from the command line, and every checkpoint's state.json keeps it (`config`, `launch`) with
the settings that fix the stream of batches (`data_order`).

The run folder: `conditioning.json/.npz` (a copy of the shards' record), `log.jsonl`, `loss.png`,
`samples/step-NNNNNN.png`, `checkpoints/step-NNNNNN/`. Rerunning the same command on a run folder
with checkpoints resumes from the latest; on CPU the result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from flowcurate.formats import shards as S
from flowcurate.formats.config import Config, ConfigError, resolve_device, to_dict
from flowcurate.formats.hashing import stable_hash
from flowcurate.models.mmdit import MMDiT, MMDiTConfig, mmdit_config
from flowcurate.trainer import checkpoint as C
from flowcurate.trainer import parallel as P
from flowcurate.trainer.data import Augment, CuratedShards, DataError, loader, open_record, resolve_shards
from flowcurate.trainer.flow import flow_loss, sample_t, validation_loss
from flowcurate.trainer.init import init_models, resolve_shift
from flowcurate.trainer.launch import TrainLaunch, data_order, launch_from_args, launch_record, resume_data
from flowcurate.trainer.report import Reporter, progress_bar

# ------------------------------------------------------------------------------------------------------
# Helpers

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


def step_generator(seed: int, step: int, stream: int = 0, device: str = "cpu") -> torch.Generator:
    """The generator of one step's noise, on `device` so that t and eps are drawn where the step runs
    (no host-to-device copy per step). Seeded by (seed, step, stream): a CUDA generator draws other
    numbers than a CPU one from the same seed, but the same ones on every run, rank and resume."""
    return torch.Generator(device=device).manual_seed(stable_hash("noise", f"{seed}:{step}:{stream}") >> 1)


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
        theirs = S.read_record(mine, task=record.json.get("task", S.TASK)).hash  # editing runs: trainer/edit.py
        if theirs != record.hash:
            raise DataError(f"{run} was trained on shards with conditioning {theirs}, these shards "
                            f"have {record.hash}: use another --output")
    else:
        shutil.copyfile(Path(record.path).with_name(record.json["arrays"]["file"]), run / S.RECORD_NPZ)
        shutil.copyfile(record.path, mine)


@torch.no_grad()
def evaluate(model, urls, record, batch_size: int, device, autocast, rank: int = 0,
             world: int = 1) -> tuple[float, list[float]]:
    """Mean validation v-loss at t_i = (i + 0.5) / 8 over every validation sample (fixed noise: batch i
    draws from a generator seeded i). The ranks share the work: every rank reads the same batches and
    evaluates batch i when i % world == rank, then the per-level sums and the sample count are summed
    over ranks, so N ranks score the set one process scores (up to the order of the float sums) in
    1/N of the time, and no rank idles in a collective while another evaluates everything."""
    total, count = torch.zeros(8), 0
    ds = CuratedShards(urls, record, batch_size, train=False)
    for i, batch in enumerate(loader(ds)):
        if i % world != rank:
            continue
        with autocast:
            per_t = validation_loss(model, batch["latents"].to(device), batch["context"].to(device),
                                    batch["pooled"].to(device), generator=torch.Generator().manual_seed(i))
        n = len(batch["keys"])
        total = total + per_t.float().cpu() * n
        count += n
    if world > 1:  # on the device: nccl reduces CUDA tensors only (gloo either)
        sums = torch.cat([total, torch.tensor([float(count)])]).to(device)
        dist.all_reduce(sums)
        total, count = sums[:-1].cpu(), int(sums[-1].item())
    if count == 0:
        raise DataError(f"no validation samples in {urls[:2]}...")
    per_t = (total / count).tolist()
    return float(sum(per_t) / len(per_t)), per_t


@dataclass(frozen=True)
class Run:
    """Where a launch reads and writes: the run folder, the shard URLs and the conditioning record."""

    folder: Path
    urls: list[str]
    val_urls: list[str]
    record: S.Conditioning


TINY_SHARD_SIZES = ("tiny", "d2", "d4", "d6")  # the sizes a CPU trains on tiny shards


def check_models_fit(config: Config, record: S.Conditioning) -> None:
    """Refuse to build a paper-size model for shards of the offline tiny models: the sd3 preset is the
    default, and on tiny shards it would start a d24 MM-DiT without a word (sizes in models/mmdit.py)."""
    source = record.json["autoencoder"]["source"]
    if source.startswith("tiny://") and config.train.model not in TINY_SHARD_SIZES:
        raise DataError(f"these shards were curated with the offline tiny models ({source}) and the config "
                        f"trains a {config.train.model} MM-DiT (the sd3 preset is the default): pass --config "
                        "tiny for the offline tiny models, or a [train] model of "
                        f"{', '.join(TINY_SHARD_SIZES)}")


def open_run(launch: TrainLaunch, rank: int) -> Run:
    """The launch's shards and record; rank 0 creates the run folder and its copy of the record (the
    other ranks wait for it at the barrier after the model is placed, see `train`)."""
    urls, found = resolve_shards(launch.shards, "train")
    val_spec = launch.val_shards or (launch.shards if Path(launch.shards).is_dir() else None)
    val_urls = resolve_shards(val_spec, "val")[0] if val_spec else []
    record = open_record(launch.conditioning or found, urls)
    check_models_fit(launch.config, record)
    folder = Path(launch.output)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        copy_record(record, folder)
    return Run(folder, urls, val_urls, record)


def check_parallel(launch: TrainLaunch, world: int, rank: int) -> bool:
    """Whether this launch shards the model (FSDP over more than one rank); refuses unknown settings."""
    if launch.parallel not in P.PARALLEL:
        raise ConfigError(f"parallel must be one of {', '.join(P.PARALLEL)}, got {launch.parallel!r}")
    if launch.fsdp_mixed_precision is not None and launch.parallel != "fsdp":
        raise ConfigError("--fsdp-mixed-precision is FSDP's parameter/reduction policy: pass --parallel fsdp "
                          "(for bf16 autocast with DDP, set [train] mixed_precision)")
    if launch.parallel == "fsdp" and world == 1 and rank == 0:
        print("--parallel fsdp in one process: nothing to shard, training as one process", file=sys.stderr)
    return launch.parallel == "fsdp" and world > 1


def build_models(launch: TrainLaunch, record: S.Conditioning, device: str) -> tuple[MMDiT, MMDiT, MMDiTConfig]:
    """(model, EMA copy, its config): the config's size with the record's widths, seeded, or the
    `init_from` weights (trainer/init.py); the EMA starts equal to the model unless init_from has one."""
    tc = launch.config.train
    mc = mmdit_config(tc.model, context_dim=record.context_width, pooled_dim=record.pooled_width,
                      in_channels=record.latent_channels)
    torch.manual_seed(tc.seed)
    model = MMDiT(mc).to(device)
    ema_weights = None
    if launch.init_from:
        model, ema_weights = init_models(launch, record, device)
        mc = model.config
    if launch.gradient_checkpointing:
        model.gradient_checkpointing = True
    ema = MMDiT(mc).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict() if ema_weights is None else ema_weights)
    return model, ema, mc


def grid_autoencoder(record: S.Conditioning, path: str, device: str):
    """The record's autoencoder (at `path`) for sample grids, or None (with a warning) when it is not
    the one the latents were made with: grids need that exact AE, training does not."""
    from flowcurate.trainer.sample import ModelMismatch, load_autoencoder

    try:
        return load_autoencoder(record, path, device)
    except (ModelMismatch, OSError) as e:
        print(f"warning: sample grids disabled: {e}", file=sys.stderr)
        return None


def step_noise(tc, step: int, shape: tuple[int, ...], world: int, rank: int, split: str, device: str = "cpu"):
    """(t, eps) for this rank's `shape[0]` samples of `step`, drawn on `device`. They come from a
    generator seeded by (seed, step[, rank]): nothing to save, and a resumed run draws what an
    uninterrupted one draws. In `global` mode every rank draws the global batch and keeps its slice, so
    N ranks see exactly what one process sees."""
    b = shape[0]
    n = b * world if split == "global" else b
    gen = step_generator(tc.seed, step, 0 if split == "global" else rank, device)
    t = sample_t(n, tc.timestep_density, tc.logit_mean, tc.logit_std, shift=tc.shift, generator=gen, device=device)
    eps = torch.randn((n, *shape[1:]), generator=gen, device=device)
    lo = rank * b if split == "global" else 0
    return t[lo:lo + b], eps[lo:lo + b]


def training_autocast(device: str, mixed_precision: bool, bf16_on_cpu: bool = False) -> torch.autocast:
    """bf16 autocast for the forward passes (weights, optimizer and loss stay float32): on CUDA when the
    config asks for mixed precision and the GPU has bf16; on the CPU only when also `bf16_on_cpu`."""
    kind = device.split(":")[0]
    enabled = mixed_precision and (torch.cuda.is_bf16_supported() if kind == "cuda" else kind == "cpu" and bf16_on_cpu)
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=enabled)


def compile_model(net, backend="inductor"):
    """torch.compile for a stream of aspect buckets. The first batch compiles for its shape; dynamo's
    automatic dynamic shapes recompile once when the latent width first changes and once when the height
    does, with those sizes symbolic from then on, so every later bucket reuses that graph: three compiles
    at most (tests/test_compile.py), under dynamo's recompile limit. `dynamic=True` would compile once
    with every size symbolic (batch, channels, sequence too) for the whole run."""
    return torch.compile(net, backend=backend)


def accumulate_gradients(net, x0: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, t: torch.Tensor,
                         eps: torch.Tensor, micro_batches: int = 1, autocast=None, no_sync=None) -> torch.Tensor:
    """Backward of the batch's mean v-loss in `micro_batches` equal slices (gradient accumulation): each
    slice's mean loss is scaled by 1 / micro_batches, so the summed gradient is the whole batch's (the
    mean of equal-size means is the mean) while only one slice's activations are alive at a time.
    `no_sync` (DDP's) skips the gradient all-reduce on all but the last slice: one all-reduce per
    step, as without accumulation. t and eps are the whole batch's, drawn before the split, so the
    same step draws the same noise whatever the accumulation. Returns the batch's loss (detached);
    gradients add to what `.grad` holds (zero them before)."""
    n = len(x0)
    if n % micro_batches:
        raise ValueError(f"a batch of {n} is not divisible into {micro_batches} micro-batches")
    size, total = n // micro_batches, None
    for i in range(micro_batches):
        part = slice(i * size, (i + 1) * size)
        sync = no_sync() if no_sync is not None and i < micro_batches - 1 else contextlib.nullcontext()
        with sync:
            with autocast or contextlib.nullcontext():
                loss = flow_loss(net, x0[part], context[part], pooled[part], t[part], eps[part])
            (loss / micro_batches if micro_batches > 1 else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total / micro_batches if micro_batches > 1 else total


class LossInterval:
    """The training loss since the last log line, summed on the device: adding a step's loss does not
    wait for the GPU, so the host queues steps ahead. `mean_checked` reads it back (one sync, and one
    all-reduce under DDP) at log and checkpoint steps only, and raises there when it is not finite;
    checking every step, as before, cost a host sync per step. The log reports this mean over the
    interval, not the interval's last step. A non-finite loss is caught at the next log or checkpoint
    step, before any checkpoint of the weights it reached is written."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total: torch.Tensor | None = None
        self.steps = 0

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.total = loss if self.total is None else self.total + loss
        self.steps += 1

    def mean_checked(self, step: int, world: int) -> float | None:
        """The interval's mean loss over steps and ranks (None when no step was added since the last
        reset); a collective: every rank calls it at the same steps."""
        if self.total is None:
            return None
        value = P.mean_over_ranks(self.total / self.steps, world)
        if not math.isfinite(value):
            first = step - self.steps + 1
            raise FloatingPointError(f"steps {first}-{step}: mean training loss is {value}; lower lr, keep grad "
                                     "clipping on, or resume from the last checkpoint (none is written after a "
                                     "non-finite loss)")
        return value


def validate_and_show(run: Run, ema, ae, tc, step: int, sample_size, device: str, autocast,
                      reporter: Reporter, rank: int = 0, world: int = 1, sharded: bool = False) -> None:
    """Validation loss (logged), a sample grid of the record's validation prompts, the loss plot. Every
    rank calls it at the same steps: validation is split over the ranks (`evaluate`); the grid and the
    files are rank 0's, and the other ranks wait for them at a barrier here rather than inside the next
    step's gradient all-reduce (same wait, but at a named place; COLLECTIVE_TIMEOUT bounds it).
    A `sharded` (FSDP) EMA's every forward is a collective, so each rank scores the whole validation set
    and draws the grid with the others (the same number of forwards on every rank); rank 0 keeps it."""
    record, log = run.record, run.folder / "log.jsonl"
    if run.val_urls:
        val, per_t = evaluate(ema, run.val_urls, record, max(1, tc.batch_size), device, autocast,
                              *((0, 1) if sharded else (rank, world)))
        if rank == 0:
            log_line(log, {"step": step, "val_loss": val, "val_loss_by_t": per_t})
            reporter.scalars(step, {"val_loss": val, "val_loss_by_t": per_t})
    if (rank == 0 or sharded) and ae is not None and sample_size is not None:
        from flowcurate.trainer.sample import generate, grid

        cond, empty = record.prompt_parts("validation"), record.prompt_parts("empty")
        seeds = list(range(len(record.json["prompts"]["validation"])))
        with autocast:
            images = generate(ema, ae, cond, empty, sample_size, seeds, tc.sample_steps, tc.shift, tc.cfg_scale)
    if rank == 0 and ae is not None and sample_size is not None:
        (run.folder / "samples").mkdir(exist_ok=True)
        picture = grid(images)
        picture.save(run.folder / "samples" / f"step-{step:06d}.png")
        reporter.image(step, "samples", picture)
    if rank == 0:
        plot_losses(log, run.folder / "loss.png")
    if world > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------------------
# Training

def train(launch: TrainLaunch) -> Path:
    launch, shift_record = resolve_shift(launch)  # shift "auto" -> a number, from the shards' resolution
    tc = launch.config.train
    device = resolve_device(launch.device)
    rank, world, device = P.setup_distributed(device)
    if tc.grad_accum < 1 or (tc.batch_size // world) % tc.grad_accum:
        raise ConfigError(f"grad_accum {tc.grad_accum} does not divide each rank's batch of {tc.batch_size // world} "
                          f"(batch_size {tc.batch_size} over {world} ranks) into equal micro-batches")
    sharded = check_parallel(launch, world, rank)
    run = open_run(launch, rank)
    record, folder = run.record, run.folder

    if sharded:  # before the optimizer: it holds the sharded parameters; no rank but 0 builds a whole model
        model, ema, mc = P.build_sharded(lambda where: build_models(launch, record, where), rank, device, world,
                                         launch.fsdp_mixed_precision)
    else:
        model, ema, mc = build_models(launch, record, device)
    if world > 1:  # after the model is placed (nccl's barrier runs on the current device); rank 0 made the folder
        dist.barrier()
    # fused AdamW: one kernel for all parameters on CUDA instead of a loop of small ones (same update)
    fused = device.startswith("cuda") or None
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, eps=tc.adam_eps, weight_decay=tc.weight_decay, fused=fused)
    step, saved = 0, None
    resume = C.latest(folder)
    if resume is not None:
        P.check_checkpoint_kind(resume, sharded)
        saved = P.load_sharded(resume, model, ema, opt) if sharded else C.load(resume, model, ema, opt, device)
        step = saved["step"]
        for group in opt.param_groups:  # load_state_dict took the saving run's choice; this device decides
            group["fused"] = fused
        if rank == 0:
            print(f"resuming from {resume} (step {step})", file=sys.stderr)

    autocast = training_autocast(device, tc.mixed_precision, launch.bf16_on_cpu)
    net = P.wrap_ddp(model, device) if world > 1 and not sharded else model  # fully_shard wrapped it in place
    no_sync = None  # kept before compile wraps the module
    if world > 1:
        no_sync = (lambda: P.fsdp_no_sync(model)) if sharded else net.no_sync
    if launch.compile:  # optional: the same maths, faster GPU steps once compiled
        net = compile_model(net)
    augment = Augment(tc.orig_caption_prob, tc.text_drop_prob)
    stream_settings = dict(seed=tc.seed, augment=augment, rank=rank, world_size=world, split=tc.split,
                           num_workers=launch.workers, shuffle_buffer=tc.shuffle_buffer)
    split = CuratedShards(run.urls, record, tc.batch_size, **stream_settings).split  # the mode "auto" picks
    data = resume_data(saved, data_order(launch, world, split), launch.accept_data_change, resume)
    if data.note and rank == 0:
        print(data.note, file=sys.stderr)
        log_line(folder / "log.jsonl", {"step": step, "data_order_change": data.note})
    ds = CuratedShards(run.urls, record, tc.batch_size, **stream_settings, start_epoch=data.start_epoch,
                       position=data.positions[rank] if data.positions else None)
    ae = None
    if (rank == 0 or sharded) and tc.sample_every > 0 and "validation.t5" in record.arrays:  # grids need the record's AE
        from flowcurate.trainer.sample import model_paths

        ae = grid_autoencoder(record, model_paths(record, ("autoencoder",))["autoencoder"], device)
    sample_size = None

    stream = loader(ds, launch.workers, pin_memory=device.startswith("cuda"))

    def data_position() -> dict:
        """Every rank's data position (a collective: all ranks call it at the same steps)."""
        ranks = [stream.position()]
        if world > 1:
            ranks = [None] * world
            dist.all_gather_object(ranks, stream.position())
        return {"batches": stream.batches, "ranks": ranks}

    def state(position: dict) -> dict:  # state.json beside the weights
        return {"config": to_dict(launch.config), "launch": launch_record(launch),
                "data_order": data_order(launch, world, ds.split), "model_config": dataclasses.asdict(mc),
                "data_position": position, "world_size": world, "conditioning": record.hash,
                "sample_size": sample_size, "shards": launch.shards, "shift": shift_record}

    reporter = Reporter(folder, launch.report_to if rank == 0 else (), to_dict(launch.config))
    bar = progress_bar(step, tc.max_steps, enabled=rank == 0)

    def periodic() -> None:
        validate_and_show(run, ema, ae, tc, step, sample_size, device, autocast, reporter, rank, world, sharded)

    def save(position: dict) -> None:
        if sharded:  # a collective: every rank writes its shards
            P.save_sharded(folder, step, model, ema, opt, state(position), tc.keep_checkpoints, rank)
        elif rank == 0:
            C.save(folder, step, model, ema, opt, state(position), keep=tc.keep_checkpoints)

    model.train()
    t0, seen = time.time(), 0
    interval = LossInterval()
    batches = iter(stream)
    while step < tc.max_steps:  # checked before taking a batch: the saved position counts trained batches only
        batch = next(batches)
        if data.positions is not None and rank == 0 and stream.batches == data.positions[0]["batches"] + 1:
            print(f"data position restored: loader workers read {stream.first_samples_read} samples before "
                  "the first step (the held samples and this batch; no replay)", file=sys.stderr)
        x0 = batch["latents"].to(device, non_blocking=True)
        if sample_size is None:
            down = record.json["autoencoder"]["downsample"]
            sample_size = [x0.shape[-2] * down, x0.shape[-1] * down]
        t, eps = step_noise(tc, step, tuple(x0.shape), world, rank, ds.split, device)
        for g in opt.param_groups:
            g["lr"] = learning_rate(tc, step)
        opt.zero_grad(set_to_none=True)
        loss = accumulate_gradients(net, x0, batch["context"].to(device, non_blocking=True),
                                    batch["pooled"].to(device, non_blocking=True), t, eps, tc.grad_accum, autocast,
                                    no_sync)
        interval.add(loss)
        grad_norm = P.clip_gradients(model, tc.grad_clip)
        opt.step()
        update_ema(ema, model, min(tc.ema_decay, (1 + step) / (10 + step)))
        step += 1
        seen += len(x0) * world
        bar.update()
        if step % tc.log_every == 0 or step == tc.max_steps:
            value = interval.mean_checked(step, world)
            interval.reset()
            if rank == 0:
                entry = {"step": step, "loss": value, "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"],
                         "samples_per_s": seen / max(time.time() - t0, 1e-9)}
                log_line(folder / "log.jsonl", entry)
                reporter.scalars(step, {k: v for k, v in entry.items() if k != "step"})
                bar.set_postfix(loss=f"{value:.4f}", samples_s=f"{entry['samples_per_s']:.1f}", refresh=False)
        if tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0:
            interval.mean_checked(step, world)  # no checkpoint of weights a non-finite loss has reached
            save(data_position())
        if tc.sample_every > 0 and step % tc.sample_every == 0:
            periodic()
    interval.mean_checked(step, world)
    position = data_position()
    if (rank == 0 or sharded) and (C.latest(folder) is None or C.read_state(C.latest(folder))["step"] != step):
        save(position)
    if tc.sample_every == 0 or step % tc.sample_every:
        periodic()
    if rank == 0:
        bar.close()
        reporter.close()
        print(f"trained {step} steps; run folder {folder}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return folder


# ------------------------------------------------------------------------------------------------------
# CLI (trainer/launch.py builds the launch from the arguments)

def run_cli(args: argparse.Namespace) -> int:
    train(launch_from_args(args))
    return 0

