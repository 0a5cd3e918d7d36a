"""A launch of `flowcurate train`: the `TrainLaunch` (config plus what only this launch knows), its
record in state.json, the settings that fix the stream of batches (`data_order`) and the check a resume
makes against them (`resume_data`), and `launch_from_args`, the only place argparse meets the trainer.
Imported by trainer/train.py and trainer/init.py."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from flowcurate.formats.config import Config, load_config, override
from flowcurate.trainer.data import DataError
from flowcurate.trainer.report import parse_report_to

# ------------------------------------------------------------------------------------------------------
# The launch: what one `flowcurate train` command asked for

@dataclass(frozen=True)
class TrainLaunch:
    """One launch of the trainer. `config` is the recipe (the TOML schema after the CLI's overrides: model,
    optimiser, batch size, seed, split, shuffle buffer, ...), the same whichever machine runs it; the
    other fields are what only this launch knows: its paths and the machine it runs on. Built from
    argparse by `launch_from_args` and saved in every checkpoint's state.json (`config` and `launch`)."""

    config: Config
    # pipeline output folder, shards folder, brace spec, glob or URLs joined by "::"
    shards: str
    # the run folder (resumed from its latest checkpoint when it has one)
    output: str
    # validation shards (None: the val split of an output folder, else no validation)
    val_shards: str | None = None
    # conditioning.json (None: the record found beside the shards)
    conditioning: str | None = None
    # weights to start from instead of a fresh initialisation: a flowcurate run or step folder (weights and
    # EMA, the next stage of a resolution curriculum) or a diffusers SD3Transformer2DModel (trainer/init.py)
    init_from: str | None = None
    # subfolder of a diffusers init_from (None: "transformer" unless init_from/config.json exists)
    init_subfolder: str | None = None
    # "auto" (formats.config.resolve_device), "cpu", "cuda", ...; under torchrun "cuda" means the local rank's GPU
    device: str = "auto"
    # DataLoader worker processes per rank (part of the data order: each reads every W-th shard)
    workers: int = 0
    # torch.compile the model (faster GPU steps, same maths)
    compile: bool = False
    # recompute each joint block in the backward pass: memory for compute, same maths
    gradient_checkpointing: bool = False
    # trackers beside log.jsonl: "tensorboard", "wandb" (trainer/report.py)
    report_to: tuple[str, ...] = ()
    # resume even though a data-order setting changed: keep weights and optimizer, restart the data
    # order at the start of the epoch the run was in (see `resume_data`)
    accept_data_change: bool = False
    # bf16 autocast on the CPU as well when the config's mixed_precision is on (by default only CUDA
    # autocasts): lets a machine without a GPU check bf16 training against fp32 (tests/test_train.py);
    # slower than fp32 on most CPUs
    bf16_on_cpu: bool = False
    # how ranks share the model under torchrun: "ddp" (a whole copy each, gradients all-reduced) or "fsdp"
    # (parameters, gradients, optimizer state and EMA sharded over the ranks; trainer/parallel.py)
    parallel: str = "ddp"
    # FSDP only: "bf16" gathers bf16 parameters for forward and backward and reduces gradients in fp32
    # into fp32 shards; None keeps fp32 throughout
    fsdp_mixed_precision: str | None = None


def launch_record(launch: TrainLaunch) -> dict:
    """state.json's `launch`: every field but the config (stored beside it as `config`)."""
    return {f.name: getattr(launch, f.name) for f in dataclasses.fields(launch) if f.name != "config"}


def data_order(launch: TrainLaunch, world: int, split: str) -> dict:
    """state.json's `data_order`: what fixes the stream of batches. A run resumed with other values
    would not replay the batches the interrupted run saw. `split` is the mode the loader chose
    (`split_requested` may be "auto")."""
    tc = launch.config.train
    return {"batch_size": tc.batch_size, "world_size": world, "split": split, "split_requested": tc.split,
            "workers": launch.workers, "shuffle_buffer": tc.shuffle_buffer, "seed": tc.seed,
            "grad_accum": tc.grad_accum}


# the data_order entries a resume must match: each one shapes the saved data position (per rank and
# worker, batches of this size, this shuffle) or how its batches are stepped (micro-batches); a run
# saved before an entry existed is not compared on it; `split_requested` is not compared, only the
# mode it resolved to
DATA_ORDER_CHECKED = ("batch_size", "world_size", "split", "workers", "shuffle_buffer", "seed", "grad_accum")


@dataclass(frozen=True)
class DataResume:
    """How the stream resumes: `positions` (one per rank, from the checkpoint) or, after an accepted
    change of the data-order settings, a fresh stream from the start of `start_epoch`."""

    positions: list[dict] | None
    start_epoch: int = 0
    note: str | None = None  # what an accepted change does, for the log


def resume_data(saved: dict | None, order: dict, accept_change: bool, where: Path | None = None) -> DataResume:
    """The data position to resume from, or a refusal (DataError) when this launch would read another
    stream than the one the checkpoint's position belongs to: batches of another size, another number
    of ranks or workers, another split mode, shuffle buffer or seed, or batches split into other
    micro-batches. A silent resume would not continue the run's order (samples skipped or repeated,
    no bit-identical result), and the saved offsets would be read as if they meant the new layout.
    `accept_change` keeps the weights and optimizer and restarts the data order at the start of the
    epoch the run was in (the earliest of its workers)."""
    if saved is None:
        return DataResume(None)
    position = saved.get("data_position")
    before = saved.get("data_order", {})
    changes = [(k, before.get(k), order[k]) for k in DATA_ORDER_CHECKED if k in before and before[k] != order[k]]
    legacy = not isinstance(position, dict)
    if not changes and not legacy:
        return DataResume(position["ranks"])
    what = (", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes) if changes else
            f"the checkpoint keeps its data position as a batch count ({position}), from before seekable "
            "data positions")
    epochs = [w["epoch"] for r in (position["ranks"] if not legacy else []) for w in r["workers"] if w]
    epoch = min(epochs, default=0)
    if not accept_change:
        raise DataError(f"{where or 'the checkpoint'}: cannot resume the run's data order: {what}. Resume with "
                        "the run's settings (state.json's data_order), train into another --output, or pass "
                        f"--accept-data-change to keep the weights and optimizer and restart the data order at "
                        f"the start of epoch {epoch}")
    return DataResume(None, epoch, f"--accept-data-change: {what}; the data order restarts at the start of epoch "
                                   f"{epoch} (samples of that epoch seen before the checkpoint are seen again)")


def launch_from_args(args: argparse.Namespace) -> TrainLaunch:
    cfg = override(load_config(args.config), "train", max_steps=args.max_steps, checkpoint_every=args.checkpoint_every,
                   seed=args.seed, batch_size=args.batch_size, sample_every=args.sample_every, lr=args.lr,
                   split=args.split, shuffle_buffer=args.shuffle_buffer, grad_accum=args.grad_accum)
    return TrainLaunch(config=cfg, shards=args.shards, output=args.output, val_shards=args.val_shards,
                       conditioning=args.conditioning, init_from=args.init_from,
                       init_subfolder=args.init_subfolder, device=args.device,
                       workers=args.workers, compile=args.compile, gradient_checkpointing=args.gradient_checkpointing,
                       report_to=parse_report_to(args.report_to), accept_data_change=args.accept_data_change,
                       bf16_on_cpu=args.bf16_on_cpu, parallel=args.parallel,
                       fsdp_mixed_precision=args.fsdp_mixed_precision)
