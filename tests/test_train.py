"""trainer/train.py and trainer/sample.py end to end on tiny shards: overfitting, bit-identical resume
after a kill, 2-process DDP equal to one process, refusal of foreign shards, official-weight init."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowcurate.formats import shards as S
from flowcurate.trainer import checkpoint as C
from flowcurate.trainer.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--sample-every", "0"]


def write_config(path: Path, **train) -> Path:
    base = dict(model='"tiny"', batch_size=4, lr=2e-3, warmup_steps=5, max_steps=6, ema_decay=0.9, shift=1.0,
                checkpoint_every=3, sample_every=0, log_every=1, mixed_precision="false", seed=0)
    base.update({k: (f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v)
                 for k, v in train.items()})
    path.write_text("[train]\n" + "".join(f"{k} = {v}\n" for k, v in base.items()))
    return path


def run_cli(*args: str, env: dict | None = None, module: tuple[str, ...] = ("-m", "flowcurate.trainer", "train")):
    return subprocess.run([sys.executable, *module, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def weights(step_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_file(step_dir / f"{n}.safetensors") for n in ("model", "ema", "optimizer")}


def kill_after_first_checkpoint(args: list[str], run: Path, timeout: float = 300) -> subprocess.Popen:
    """Start `python -m flowcurate.trainer train ARGS` and SIGKILL it as soon as RUN holds a complete
    checkpoint: a preempted job's end, with no help from the trainer. Returns the killed process."""
    with open(run.with_name(run.name + ".stderr"), "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "flowcurate.trainer", "train", *args], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + timeout
    try:
        while not C.checkpoints(run):
            assert proc.poll() is None, f"training ended before its first checkpoint: {err.name}"
            assert time.monotonic() < deadline, f"no checkpoint in {timeout} s"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(golden, tmp_path):
    # constant lr after warm-up: --max-steps changes when a run stops, not what its steps compute
    cfg = write_config(tmp_path / "c.toml")
    common = ["--shards", str(golden), "--config", str(cfg), "--shuffle-buffer", "4"]
    killed = kill_after_first_checkpoint([*common, "--output", str(tmp_path / "b"), "--max-steps", "100000"],
                                         tmp_path / "b")
    assert killed.returncode == -signal.SIGKILL
    last = C.read_state(C.latest(tmp_path / "b"))["step"]
    assert last % 3 == 0 and 3 <= last < 100000  # every 3 steps, and interrupted long before the end
    end = last + 3
    a = run_cli(*common, "--output", str(tmp_path / "a"), "--max-steps", str(end))
    assert a.returncode == 0, a.stderr[-2000:]
    resumed = run_cli(*common, "--output", str(tmp_path / "b"), "--max-steps", str(end))
    assert resumed.returncode == 0 and f"resuming from {C.step_dir(tmp_path / 'b', last)}" in resumed.stderr
    step = f"step-{end:06d}"
    wa, wb = weights(tmp_path / "a" / "checkpoints" / step), weights(tmp_path / "b" / "checkpoints" / step)
    for part in wa:
        assert wa[part].keys() == wb[part].keys()
        for k in wa[part]:
            assert torch.equal(wa[part][k], wb[part][k]), (part, k)
    sa, sb = (C.read_state(p / "checkpoints" / step) for p in (tmp_path / "a", tmp_path / "b"))
    # the resumed run stands where the uninterrupted one does: same epoch, shard, byte offset, held keys
    assert sa["data_position"] == sb["data_position"] and sb["data_position"]["batches"] == end
    worker = sb["data_position"]["ranks"][0]["workers"][0]
    assert worker["batches"] == end and len(worker["buffer"]) == 3 and worker["offset"] % 512 == 0
    assert "data position restored: loader workers read {0: " in resumed.stderr
    # how the run was launched, and the settings that fix its batch stream, travel with the checkpoint
    assert sb["data_order"] == {"batch_size": 4, "world_size": 1, "split": "shards", "split_requested": "auto",
                                "workers": 0, "shuffle_buffer": 4, "seed": 0, "grad_accum": 1}
    assert sb["launch"] == {"shards": str(golden), "output": str(tmp_path / "b"), "val_shards": None,
                            "conditioning": None, "init_from": None, "init_subfolder": None, "device": "auto",
                            "workers": 0, "compile": False, "gradient_checkpointing": False, "report_to": [],
                            "accept_data_change": False, "bf16_on_cpu": False, "parallel": "ddp",
                            "fsdp_mixed_precision": None}
    assert sb["config"]["train"]["shuffle_buffer"] == 4 and sb["config"]["train"]["max_steps"] == end


def test_a_resume_that_changes_the_data_order_is_refused_unless_accepted(golden, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.toml", max_steps=2, checkpoint_every=2)
    common = ["--shards", str(golden), "--config", str(cfg), "--output", str(tmp_path / "run"), *QUIET]
    assert main(["train", *common, "--shuffle-buffer", "4"]) == 0
    from flowcurate.cli.main import main as flowcurate

    # the batch size shapes every saved position: refused, naming the setting, the old and new value
    assert flowcurate(["train", *common, "--shuffle-buffer", "4", "--batch-size", "2", "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "batch_size 4 -> 2" in err and "--accept-data-change" in err
    from flowcurate.trainer.data import DataError

    with pytest.raises(DataError, match="shuffle_buffer 4 -> 8"):
        main(["train", *common, "--shuffle-buffer", "8", "--max-steps", "3"])
    assert C.read_state(C.latest(tmp_path / "run"))["step"] == 2  # nothing trained by the refused launches
    # accepted: the weights go on, the data order restarts at the start of the run's epoch, and the log says so
    assert main(["train", *common, "--shuffle-buffer", "4", "--batch-size", "2", "--max-steps", "3",
                 "--accept-data-change"]) == 0
    assert "data order restarts at the start of epoch 1" in capsys.readouterr().err
    assert '"data_order_change"' in (tmp_path / "run" / "log.jsonl").read_text()
    state = C.read_state(C.latest(tmp_path / "run"))
    assert state["step"] == 3 and state["data_order"]["batch_size"] == 2 and state["data_position"]["batches"] == 1


def val_losses(run: Path) -> dict[int, float]:
    import json

    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def test_two_process_ddp_with_accumulation_and_validation_matches_one_process(fresh_shards, tmp_path):
    # validation and sample grids every 2 steps and at the end; the val set is the 8-sample train shard,
    # 3 batches of up to 4 (two latent shapes), so both ranks evaluate part of it and rank 0 draws grids
    cfg = write_config(tmp_path / "c.toml", max_steps=3, checkpoint_every=3, sample_every=2, sample_steps=2)
    common = ["--shards", str(fresh_shards), "--config", str(cfg), "--shuffle-buffer", "4", "--device", "cpu",
              "--val-shards", str(fresh_shards / "shards" / "train-000000.tar")]
    one = run_cli(*common, "--output", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    # and with 2 micro-batches a rank (DDP's no_sync on the first): the same weights as one process in one batch
    two = run_cli(*common, "--output", str(tmp_path / "two"), "--grad-accum", "2", env={"OMP_NUM_THREADS": "1"},
                  module=("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                          "-m", "flowcurate.trainer", "train"))
    assert two.returncode == 0, two.stderr[-3000:]
    w1, w2 = weights(tmp_path / "one" / "checkpoints" / "step-000003"), weights(tmp_path / "two" / "checkpoints" / "step-000003")
    moved = 0
    for k, v in w1["model"].items():
        torch.testing.assert_close(w2["model"][k], v, atol=2e-5, rtol=1e-4)
        moved += int(not torch.equal(v, w1["ema"][k]) or v.abs().sum() > 0)
    assert moved > 0
    state = C.read_state(tmp_path / "two" / "checkpoints" / "step-000003")
    # one shard cannot feed two ranks: "auto" chose the global stream
    assert state["world_size"] == state["data_order"]["world_size"] == 2 and state["data_order"]["split"] == "global"
    # validation split over the ranks and summed: the one-process score, logged once per validation
    v1, v2 = val_losses(tmp_path / "one"), val_losses(tmp_path / "two")
    assert sorted(v1) == sorted(v2) == [2, 3]
    for s in v1:
        assert abs(v2[s] - v1[s]) <= 1e-4 * abs(v1[s]), (s, v1[s], v2[s])
    for run in ("one", "two"):
        assert sorted(p.name for p in (tmp_path / run / "samples").iterdir()) == ["step-000002.png", "step-000003.png"]


def test_foreign_shards_are_refused_with_a_clear_message(golden, tmp_path):
    import shutil

    shutil.copytree(golden, tmp_path / "out")
    rec = S.read_record(tmp_path / "out")
    doc = {k: v for k, v in rec.json.items() if k != "arrays"}
    doc["autoencoder"]["scaling_factor"] = 0.18215
    S.write_record(tmp_path / "out", doc, rec.arrays)
    from flowcurate.cli.main import main as flowcurate

    code = flowcurate(["train", "--shards", str(tmp_path / "out"), "--config", str(write_config(tmp_path / "c.toml")),
                       "--output", str(tmp_path / "run")])
    assert code == 2
    # and a run folder made from other shards is not mixed with these
    assert main(["train", "--shards", str(golden), "--config", str(tmp_path / "c.toml"), "--output",
                 str(tmp_path / "run2"), "--max-steps", "1", *QUIET]) == 0
    from flowcurate.trainer.data import DataError

    with pytest.raises(DataError, match="another --output"):
        main(["train", "--shards", str(tmp_path / "out"), "--config", str(tmp_path / "c.toml"), "--output",
              str(tmp_path / "run2"), "--conditioning", str(tmp_path / "out" / "conditioning.json"),
              "--max-steps", "2", *QUIET])


def test_init_from_a_diffusers_transformer(golden, tmp_path):
    from diffusers import SD3Transformer2DModel

    from flowcurate.models.mmdit import mmdit_config
    from flowcurate.models.mmdit_diffusers import diffusers_config

    torch.manual_seed(5)
    ref = SD3Transformer2DModel(**diffusers_config(mmdit_config("tiny")))
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    ref.save_pretrained(tmp_path / "transformer")
    cfg = write_config(tmp_path / "c.toml")
    assert main(["train", "--shards", str(golden), "--config", str(cfg), "--output", str(tmp_path / "run"),
                 "--max-steps", "0", "--init-from", str(tmp_path / "transformer"), *QUIET]) == 0
    from flowcurate.models.mmdit_diffusers import from_diffusers

    expected = from_diffusers(ref).state_dict()
    got = load_file(tmp_path / "run" / "checkpoints" / "step-000000" / "model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_overfits_four_samples(four_shards, tmp_path):
    # d2 (hidden 128) on 4x4 latents, cosine decay: measured 11.3x at 500 steps, 10.5x at 400
    cfg = write_config(tmp_path / "c.toml", model="d2", lr=2e-3, max_steps=OVERFIT_STEPS, warmup_steps=10,
                       lr_schedule="cosine",
                       orig_caption_prob=1.0, text_drop_prob=0.0, checkpoint_every=0, log_every=1)
    assert main(["train", "--shards", str(four_shards), "--config", str(cfg), "--output", str(tmp_path / "run"),
                 *QUIET]) == 0
    import json

    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert last < first / 10, (first, last)


OVERFIT_STEPS = 600


def test_train_writes_logs_plots_samples_and_sample_cli_works(fresh_shards, tmp_path):
    cfg = write_config(tmp_path / "c.toml", max_steps=4, checkpoint_every=2, keep_checkpoints=1, sample_every=2,
                       sample_steps=3)
    assert main(["train", "--shards", str(fresh_shards), "--config", str(cfg), "--output", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    assert [p.name for p in C.checkpoints(run)] == ["step-000004"]  # keep the last K = 1
    assert (run / "loss.png").stat().st_size > 0 and (run / "samples" / "step-000004.png").exists()
    assert S.read_record(run).hash == S.read_record(fresh_shards).hash
    log = (run / "log.jsonl").read_text()
    assert '"val_loss"' in log and '"loss"' in log
    from PIL import Image

    from flowcurate.cli.main import main as flowcurate

    out = tmp_path / "grid.png"
    assert flowcurate(["sample", "--checkpoint", str(run), "--prompt", "a red circle", "--prompt", "a blue square",
                       "--seeds", "2", "--steps", "3", "--output", str(out)]) == 0
    img = Image.open(out)
    assert img.size == (2 * 64 + 2, 2 * 64 + 2)
    # a record naming other weights than the cache holds is refused when sampling
    rec = S.read_record(run)
    doc = {k: v for k, v in rec.json.items() if k != "arrays"}
    doc["autoencoder"]["content_hash"] = "sha256:0"
    S.write_record(run, doc, rec.arrays)
    from flowcurate.trainer.sample import ModelMismatch

    with pytest.raises(ModelMismatch, match="not the weights"):
        flowcurate(["sample", "--checkpoint", str(run), "--output", str(tmp_path / "g2.png"), "--steps", "2"])



def test_training_goes_on_without_grids_when_the_ae_differs(fresh_shards, tmp_path, capsys, monkeypatch):
    import flowcurate.trainer.sample as sample_mod

    def mismatch(*a, **k):
        raise sample_mod.ModelMismatch("autoencoder at X has content sha256:1, the record says sha256:0")

    monkeypatch.setattr(sample_mod, "load_autoencoder", mismatch)
    cfg = write_config(tmp_path / "c.toml", max_steps=2, sample_every=1)
    assert main(["train", "--shards", str(fresh_shards), "--config", str(cfg), "--output", str(tmp_path / "run")]) == 0
    assert "sample grids disabled" in capsys.readouterr().err
    assert not (tmp_path / "run" / "samples").exists() and C.latest(tmp_path / "run") is not None


def logged_losses(run: Path) -> list[float]:
    import json

    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def test_the_log_shows_the_mean_loss_of_its_interval_and_a_non_finite_loss_stops_the_run(golden, tmp_path):
    from flowcurate.trainer.train import LossInterval

    cfg = write_config(tmp_path / "c.toml", max_steps=4, checkpoint_every=0)
    common = ["train", "--shards", str(golden), "--config", str(cfg), "--shuffle-buffer", "4", *QUIET]
    assert main([*common, "--output", str(tmp_path / "every")]) == 0
    assert main([*common, "--output", str(tmp_path / "pairs"), "--config", str(write_config(
        tmp_path / "c2.toml", max_steps=4, checkpoint_every=0, log_every=2))]) == 0
    every, pairs = logged_losses(tmp_path / "every"), logged_losses(tmp_path / "pairs")
    assert len(every) == 4 and len(pairs) == 2
    for i, value in enumerate(pairs):  # steps 1-2 and 3-4, not steps 2 and 4 alone
        assert value == pytest.approx((every[2 * i] + every[2 * i + 1]) / 2, rel=1e-6)
    # the check that replaced a host sync per step: at log and checkpoint steps, naming the interval
    interval = LossInterval()
    assert interval.mean_checked(3, 1) is None
    interval.add(torch.tensor(1.0))
    interval.add(torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="steps 4-5: mean training loss is nan"):
        interval.mean_checked(5, 1)


BF16_STEPS = 10  # bf16 on a CPU is slow (~3x fp32 here): few steps
# per logged step; measured at most 0.02 % over these 10 steps (0.16 % over 20): the margin is for
# other CPUs' bf16 kernels, while a broken mixed-precision path (a bf16 loss or optimizer, an overflow)
# moves the loss by far more
BF16_RTOL = 0.05


def test_bf16_autocast_follows_the_fp32_loss_curve(golden, tmp_path):
    # mixed_precision on, --bf16-on-cpu: the forward passes in bf16 on the CPU, as on a GPU; every step's
    # loss stays within 5 % of the fp32 run's (same data, noise and initialisation), yet differs from it
    cfg = write_config(tmp_path / "c.toml", max_steps=BF16_STEPS, checkpoint_every=0, mixed_precision=True)
    common = ["train", "--shards", str(golden), "--config", str(cfg), "--shuffle-buffer", "4", "--device", "cpu",
              *QUIET]
    assert main([*common, "--output", str(tmp_path / "fp32")]) == 0  # mixed precision asks for CUDA only
    assert main([*common, "--output", str(tmp_path / "bf16"), "--bf16-on-cpu"]) == 0
    fp32, bf16 = logged_losses(tmp_path / "fp32"), logged_losses(tmp_path / "bf16")
    assert len(fp32) == len(bf16) == BF16_STEPS
    rel = [abs(b - f) / f for f, b in zip(fp32, bf16)]
    print("bf16 vs fp32 relative loss differences:", [f"{r:.4f}" for r in rel])
    assert max(rel) <= BF16_RTOL, rel
    assert max(rel) > 0, "bf16 run identical to fp32: autocast did not run"
