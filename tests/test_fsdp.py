"""`--parallel fsdp` (trainer/parallel.py) on 2 gloo CPU ranks: the same weights, EMA and validation
loss as one process after 5 steps (fp32), a bounded gap with bf16 parameters, a stopped and resumed
run equal to an uninterrupted one, and a checkpoint the readers (sample, export, --init-from) take as
any other run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flowcurate.trainer import checkpoint as C
from tests.test_train import run_cli, val_losses, write_config

STEPS = 5
TORCHRUN = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
            "-m", "flowcurate.trainer", "train")


def fsdp(*args: str):
    return run_cli(*args, "--parallel", "fsdp", module=TORCHRUN)


def step_dir(run: Path, step: int = STEPS) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


def whole(run: Path, step: int = STEPS) -> dict[str, dict[str, torch.Tensor]]:
    return {n: C.load_weights(step_dir(run, step), n) for n in ("model", "ema")}


def max_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(fresh_shards, tmp_path_factory):
    """One process and 2 FSDP ranks, 5 steps each, checkpoints at 3 and 5, validation and a sample grid
    at 5 (the FSDP EMA's forwards are collectives); 2 micro-batches a rank on the FSDP side (its no-sync
    accumulation) against one batch in one process: the same gradient."""
    tmp = tmp_path_factory.mktemp("fsdp")
    cfg = write_config(tmp / "c.toml", max_steps=STEPS, checkpoint_every=3, sample_every=STEPS, sample_steps=2)
    common = ["--shards", str(fresh_shards), "--config", str(cfg), "--shuffle-buffer", "4", "--device", "cpu",
              "--val-shards", str(fresh_shards / "shards" / "train-000000.tar")]
    one = run_cli(*common, "--output", str(tmp / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = fsdp(*common, "--output", str(tmp / "fsdp"), "--grad-accum", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    return tmp, common


def test_two_fsdp_ranks_equal_one_process_in_fp32(runs):
    tmp, _ = runs
    one, two = whole(tmp / "one"), whole(tmp / "fsdp")
    for part in ("model", "ema"):
        assert max_gap(one[part], two[part]) <= 1e-5, part  # measured 1.6e-6 (model), 1.3e-6 (EMA)
    assert max_gap(whole(tmp / "one", 3)["model"], one["model"]) > 1e-3  # the weights moved: a real comparison
    v1, v2 = val_losses(tmp / "one"), val_losses(tmp / "fsdp")
    assert sorted(v1) == sorted(v2) == [STEPS]
    for s in v1:
        assert abs(v2[s] - v1[s]) <= 1e-4 * abs(v1[s]), (s, v1[s], v2[s])
    assert [p.name for p in (tmp / "fsdp" / "samples").iterdir()] == ["step-000005.png"]
    folder = step_dir(tmp / "fsdp")
    assert (folder / "sharded" / ".metadata").is_file() and not (folder / "optimizer.safetensors").exists()
    state = C.read_state(folder)
    assert state["launch"]["parallel"] == "fsdp" and state["launch"]["fsdp_mixed_precision"] is None
    assert state["world_size"] == 2 and state["optimizer"]["sharded"] == "sharded"


def l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The L2 norm of a - b over all tensors together."""
    return sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a).item() ** 0.5


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r] + [r["val_loss"] for r in rows if "val_loss" in r]


def test_bf16_parameters_stay_near_the_fp32_run(runs):
    tmp, common = runs
    run = fsdp(*common, "--output", str(tmp / "bf16"), "--grad-accum", "2", "--fsdp-mixed-precision", "bf16")
    assert run.returncode == 0, run.stderr[-3000:]
    one, bf16, before = whole(tmp / "one"), whole(tmp / "bf16"), whole(tmp / "one", 3)
    # The stated tolerance of bf16 parameters (fp32 reduction and shards) after 5 steps: every logged
    # training and validation loss within 1e-3 (relative) of the fp32 run's (measured 4e-5), and the
    # weights' gap (L2 over all tensors) under 30 % of what the fp32 run moved from step 3 to 5
    # (measured 15 %; the max per weight, 6e-3, says little: Adam's normalised step turns the rounding
    # of a near-zero gradient into a full step of either sign).
    for a, b in zip(losses(tmp / "one"), losses(tmp / "bf16"), strict=True):
        assert abs(a - b) <= 1e-3 * abs(a), (a, b)
    for part in ("model", "ema"):
        assert 1e-6 < max_gap(one[part], bf16[part])  # bf16 really ran
        assert l2(one[part], bf16[part]) <= 0.3 * l2(one[part], before[part]), part
    assert all(v.dtype == torch.float32 for v in bf16["model"].values())  # the shards stay fp32
    assert C.read_state(step_dir(tmp / "bf16"))["launch"]["fsdp_mixed_precision"] == "bf16"


def test_a_stopped_fsdp_run_resumes_to_the_uninterrupted_weights(runs):
    tmp, common = runs
    # the uninterrupted run as it stood had it been stopped (killed) after its step-3 checkpoint
    shutil.copytree(tmp / "fsdp", tmp / "resumed")
    shutil.rmtree(step_dir(tmp / "resumed"))
    assert C.read_state(C.latest(tmp / "resumed"))["step"] == 3
    second = fsdp(*common, "--output", str(tmp / "resumed"), "--grad-accum", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {step_dir(tmp / 'resumed', 3)}" in second.stderr
    a, b = whole(tmp / "fsdp"), whole(tmp / "resumed")
    for part in a:
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    sa, sb = C.read_state(step_dir(tmp / "fsdp")), C.read_state(step_dir(tmp / "resumed"))
    assert sa["data_position"] == sb["data_position"]


def test_an_fsdp_checkpoint_is_refused_by_a_ddp_resume_and_read_by_every_reader(runs, tmp_path, capsys):
    tmp, common = runs
    from flowcurate.cli.main import main as flowcurate

    # resuming the sharded run without FSDP: refused with the way out, before any step
    assert flowcurate(["train", *common, "--output", str(tmp / "fsdp"), "--max-steps", "6"]) == 2
    assert "--parallel fsdp" in capsys.readouterr().err
    assert C.read_state(C.latest(tmp / "fsdp"))["step"] == STEPS
    # sample and export read the whole safetensors of the step folder, as for any run
    grid = tmp_path / "grid.png"
    assert flowcurate(["sample", "--checkpoint", str(tmp / "fsdp"), "--prompt", "a red circle", "--steps", "2",
                       "--output", str(grid), "--device", "cpu"]) == 0
    assert grid.stat().st_size > 0
    from flowcurate.trainer.export import export

    folder = export(tmp / "fsdp", tmp_path / "sd3", log=lambda *a: None)
    assert json.loads((folder / "flowcurate_export.json").read_text())
    from safetensors.torch import load_file

    exported = load_file(folder / "diffusion_pytorch_model.safetensors")
    assert len(exported) > 0
    # and --init-from the FSDP run starts one process from its EMA
    from flowcurate.formats import shards as S
    from flowcurate.trainer.init import from_flowcurate

    record = S.read_record(tmp / "fsdp")
    _, ema = from_flowcurate(tmp / "fsdp", record, tuple(C.read_state(step_dir(tmp / "fsdp"))["sample_size"]), "cpu")
    want = C.load_weights(step_dir(tmp / "fsdp"), "ema")
    assert all(torch.equal(ema[k], want[k]) for k in want)


def _build_sharded_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of `test_only_rank_0_builds_a_whole_model` (spawned; module level so it pickles)."""
    import os

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    from flowcurate.models.mmdit import MMDiT, mmdit_config
    from flowcurate.trainer import parallel as P

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    config, calls = mmdit_config("tiny", depth=2, context_dim=32, pooled_dim=16, in_channels=4), []

    def build(where: str):
        calls.append(where)
        torch.manual_seed(3)
        model, ema = MMDiT(config), MMDiT(config).requires_grad_(False)
        with torch.no_grad():  # an EMA unlike the model, so a mix-up shows
            for a, b in zip(ema.parameters(), model.parameters()):
                a.copy_(b * 0.5 + 0.25)
        return model, ema, config

    model, ema, got = P.build_sharded(build, rank, "cpu", world)
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    torch.save({"calls": calls, "config": got == config, "local": local,
                "total": sum(p.numel() for p in model.parameters()),
                "model": get_model_state_dict(model, options=whole), "ema": get_model_state_dict(ema, options=whole)},
               f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_only_rank_0_builds_a_whole_model(tmp_path):
    """FSDP ranks build on the meta device and receive their shards from rank 0, the one rank that
    builds the whole model (on its CPU): the sharded weights and EMA equal what rank 0 built."""
    import torch.multiprocessing as mp

    from flowcurate.models.mmdit import MMDiT, mmdit_config

    mp.spawn(_build_sharded_rank, args=(2, 29543, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["calls"] == ["cpu"] and r1["calls"] == []  # rank 1 never held a whole model
    assert r0["config"] and r1["config"]
    assert r0["local"] + r1["local"] == r0["total"] and r1["local"] < 0.6 * r0["total"]
    torch.manual_seed(3)
    want = MMDiT(mmdit_config("tiny", depth=2, context_dim=32, pooled_dim=16, in_channels=4)).state_dict()
    assert r0["model"].keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(r0["model"][k], v), k
        if v.is_floating_point() and k != "pos_embed":
            assert torch.equal(r0["ema"][k], v * 0.5 + 0.25), k
