"""Ranks and how they share the model: the process group, DDP's or FSDP's wrapping, and FSDP's checkpoints.

`--parallel ddp` (the default) keeps a whole model, EMA and optimizer state on every rank and all-reduces
the gradients (DistributedDataParallel). `--parallel fsdp` shards them: `torch.distributed.fsdp.
fully_shard` (FSDP2) on each MM-DiT joint block and on the root, over a 1-D mesh of all ranks, so a rank
holds 1/N of every parameter, gradient, AdamW moment and EMA tensor; a block's parameters are gathered
for its forward and backward and freed after, and gradients are reduce-scattered. The maths is DDP's
(2 CPU ranks match one process within 1e-5 in fp32, tests/test_fsdp.py).

`--fsdp-mixed-precision bf16`: FSDP gathers the parameters in bf16 for the forward and backward and
reduces the gradients in fp32 into the fp32 shards the optimizer and the EMA keep (torch's
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`); the network's output is cast back to fp32
so the loss is computed in fp32.

An FSDP checkpoint (`save_sharded`) is the usual step folder (model.safetensors, ema.safetensors,
state.json: every reader works unchanged) plus `sharded/`, a torch.distributed.checkpoint (DCP)
folder in which every rank writes its own shards of the model, the EMA and the optimizer state. A
resume reads `sharded/` (`load_sharded`); DCP reshards on load, so the saved number of ranks need not
be the loading one (the data order still refuses another world size unless --accept-data-change).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist

from flowcurate.formats.config import ConfigError
from flowcurate.trainer import checkpoint as C

PARALLEL = ("ddp", "fsdp")
FSDP_MIXED_PRECISION = ("bf16",)  # the one policy offered: bf16 parameters, fp32 gradient reduction
SHARDED = "sharded"  # the DCP folder inside an FSDP run's step folder

# How long a rank waits in a collective (gloo and nccl) before the run fails. Rank 0 alone writes
# checkpoints and draws sample grids (cfg_scale guidance over sample_steps Euler steps at full size)
# while the other ranks wait in the barrier after them or in their next collective; torch's default
# (10 min for nccl) could end a healthy run on a slow disk or a large grid, so the wait is generous.
# A real hang still ends the run, later.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


def setup_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, this rank's device). Under torchrun, "cuda" becomes the local rank's GPU, made
    the current device before the process group exists, so that nccl (bound to it by `device_id`) and
    every later CUDA call use that GPU, not GPU 0 on every rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=torch.device(device))
        else:
            dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return dist.get_rank(), world, device


def mean_over_ranks(value: torch.Tensor, world: int) -> float:
    value = value.detach().clone()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return value.item()


# ------------------------------------------------------------------------------------------------------
# Wrapping

def shard_models(model: torch.nn.Module, ema: torch.nn.Module, device: str, world: int,
                 mixed_precision: str | None = None) -> None:
    """fully_shard `model` and `ema` in place, the same way: each joint block, then the root (the
    embedders and the final layer). The EMA's shards are then the model's shards, so the EMA update is
    a local lerp per rank. The EMA (only evaluated) keeps fp32 parameters whatever `mixed_precision`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(torch.device(device).type, (world,))
    block_policy = root_policy = MixedPrecisionPolicy()
    if mixed_precision == "bf16":  # blocks pass bf16 on; the root's output (the velocity) comes back fp32
        block_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                           output_dtype=torch.float32)
    elif mixed_precision is not None:
        raise ValueError(f"FSDP mixed precision must be one of {FSDP_MIXED_PRECISION}, got {mixed_precision!r}")
    for block in model.joint_blocks:
        fully_shard(block, mesh=mesh, mp_policy=block_policy)
    fully_shard(model, mesh=mesh, mp_policy=root_policy)  # the root stays gathered from forward to its backward
    # the EMA runs forwards only (validation, grids): its root too reshards after each, or its parameters
    # would stay whole, and no longer the model's shards, when the next EMA update comes
    for block in ema.joint_blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(ema, mesh=mesh, reshard_after_forward=True)


def build_sharded(build, rank: int, device: str, world: int, mixed_precision: str | None = None):
    """FSDP's (model, EMA, config) without a whole model on every rank. `build(device)` makes the
    whole model and EMA as one process would (seeded, or --init-from): rank 0 alone calls it, on its
    CPU. Every rank builds both on the meta device (no storage), shards them, allocates only its own
    shards on `device`, and receives their values from rank 0 (a broadcast per tensor). Peak memory:
    one whole model + EMA in rank 0's host memory, 1/N of each on every device; building on each rank
    first would need the whole model + EMA on every device, which an 8B model does not fit beside its
    activations. The result equals building everywhere: every rank holds rank 0's numbers."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from flowcurate.models.mmdit import MMDiT

    whole = build("cpu") if rank == 0 else None
    shape = [(whole[2], whole[0].gradient_checkpointing) if whole else None]
    dist.broadcast_object_list(shape, src=0)  # an --init-from run's config is known to rank 0 only
    config, checkpointing = shape[0]
    model = MMDiT(config, device="meta", gradient_checkpointing=checkpointing)
    ema = MMDiT(config, device="meta").requires_grad_(False)
    shard_models(model, ema, device, world, mixed_precision)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    for i, module in enumerate((model, ema)):
        module.to_empty(device=device)
        set_model_state_dict(module, whole[i].state_dict() if whole else {}, options=options)
    return model, ema, config


def wrap_ddp(model: torch.nn.Module, device: str):
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[torch.device(device).index] if device.startswith("cuda")
                                   else None)


@contextlib.contextmanager
def fsdp_no_sync(model):
    """FSDP's counterpart of DDP's `no_sync`: the gradients of the micro-batches inside accumulate
    unreduced; the next backward outside reduce-scatters the sum (one reduction per step)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over the (possibly sharded) gradients; returns the total norm as a plain tensor
    (under FSDP the norm of the whole gradient, reduced over the ranks, not of this rank's shard)."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ------------------------------------------------------------------------------------------------------
# Sharded checkpoints

def is_sharded(step: Path) -> bool:
    return (Path(step) / SHARDED).is_dir()


def check_checkpoint_kind(step: Path, sharded: bool) -> None:
    """Refuse to resume a DCP checkpoint without FSDP or a whole-model checkpoint with it."""
    if is_sharded(step) == sharded:
        return
    if sharded:
        raise ConfigError(f"{step} was written without FSDP (no {SHARDED}/): resume it with --parallel ddp, "
                                "or start an FSDP run from its weights with --init-from and another --output")
    raise ConfigError(f"{step} was written by FSDP ranks (optimizer state in {SHARDED}/): resume it with "
                            "--parallel fsdp under torchrun, or start from its weights with --init-from and "
                            "another --output")


def _sharded_state(model, ema, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema),
            "optimizer": get_optimizer_state_dict(model, opt)}


def save_sharded(run: Path, step: int, model, ema, opt, state: dict, keep: int, rank: int) -> Path:
    """A collective: every rank writes its shards into the staged step folder's `sharded/` (DCP), then
    model and EMA are gathered tensor by tensor to rank 0's CPU and written as the usual whole
    safetensors, and rank 0 commits the folder (renamed into place, old ones pruned). Costs a full
    copy of model + EMA on rank 0's host memory and on disk beside the shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    staged = [C.stage(run, step) if rank == 0 else None]
    dist.broadcast_object_list(staged, src=0)  # the staging name is rank 0's (it holds its pid)
    tmp = Path(staged[0])
    dcp.save(_sharded_state(model, ema, opt), checkpoint_id=tmp / SHARDED)
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=whole), get_model_state_dict(ema, options=whole)
    final = C.step_dir(run, step)
    if rank == 0:
        groups = opt.state_dict()["param_groups"]
        final = C.commit(run, step, tmp, *weights, {**state, "optimizer": {"param_groups": groups,
                                                                             "sharded": SHARDED}}, keep)
    dist.barrier()  # no rank goes on (or reads the run's checkpoints) before the folder is in place
    return final


def load_sharded(step: Path, model, ema, opt) -> dict:
    """Model, EMA and optimizer shards from `step/sharded/` into the FSDP-wrapped modules (a collective;
    DCP reads the slices this rank's shards need, whatever the number of ranks that wrote them).
    Returns state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    check_checkpoint_kind(step, True)
    target = _sharded_state(model, ema, opt)
    dcp.load(target, checkpoint_id=Path(step) / SHARDED)
    set_model_state_dict(model, target["model"])
    set_model_state_dict(ema, target["ema"])
    set_optimizer_state_dict(model, opt, target["optimizer"])
    return C.read_state(step)
