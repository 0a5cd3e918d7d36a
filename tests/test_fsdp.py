"""`--parallel fsdp` (trainer/parallel.py) on 2 gloo CPU ranks: the same weights and EMA as one process
after 5 steps (fp32), a bounded gap with bf16 parameters, a stopped and resumed run equal to an
uninterrupted one, and a checkpoint the readers (sample, export, --init-from) take as any other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowcurate.trainer import checkpoint as C
from tests.test_train import run_cli, write_config

STEPS = 5
TORCHRUN = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
            "-m", "flowcurate.trainer", "train")


def common(shards: Path, cfg: Path) -> list[str]:
    return ["--shards", str(shards), "--config", str(cfg), "--shuffle-buffer", "4", "--device", "cpu"]


def fsdp(*args: str):
    return run_cli(*args, "--parallel", "fsdp", module=TORCHRUN)


@pytest.fixture(scope="module")
def runs(fresh_shards, tmp_path_factory):
    """One process and 2 FSDP ranks, 5 steps each, checkpoints at 3 and 5; 2 micro-batches a rank on
    the FSDP side (its no-sync accumulation) against one batch in one process: the same gradient."""
    tmp = tmp_path_factory.mktemp("fsdp")
    cfg = write_config(tmp / "c.toml", max_steps=STEPS, checkpoint_every=3)
    one = run_cli(*common(fresh_shards, cfg), "--output", str(tmp / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = fsdp(*common(fresh_shards, cfg), "--output", str(tmp / "fsdp"), "--grad-accum", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    return tmp, cfg


def max_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_fsdp_ranks_equal_one_process_in_fp32(runs):
    tmp, _ = runs
    step = f"step-{STEPS:06d}"
    one = {n: C.load_weights(tmp / "one" / "checkpoints" / step, n) for n in ("model", "ema")}
    two = {n: C.load_weights(tmp / "fsdp" / "checkpoints" / step, n) for n in ("model", "ema")}
    for part in ("model", "ema"):
        assert max_gap(one[part], two[part]) <= 1e-5, part
    # the weights moved, so the comparison says something
    start = C.load_weights(tmp / "one" / "checkpoints" / "step-000003", "model")
    assert max_gap(start, one["model"]) > 1e-4
    folder = tmp / "fsdp" / "checkpoints" / step
    assert (folder / "sharded" / ".metadata").is_file() and not (folder / "optimizer.safetensors").exists()
    state = C.read_state(folder)
    assert state["launch"]["parallel"] == "fsdp" and state["world_size"] == 2
    assert state["optimizer"]["sharded"] == "sharded"
