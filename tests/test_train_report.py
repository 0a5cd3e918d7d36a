"""`flowcurate train --report-to`: TensorBoard event files that tensorboard's own reader loads, a W&B
run folder written offline without an account, and a clear refusal of an unknown tracker."""

from __future__ import annotations

import pytest

from flowcurate.formats.config import ConfigError
from flowcurate.trainer.report import parse_report_to
from tests.test_train import QUIET, run_cli, write_config


def test_tensorboard_events_hold_the_logged_losses(golden, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = write_config(tmp_path / "c.toml", max_steps=4, log_every=2)
    r = run_cli("--shards", str(golden), "--config", str(cfg), "--output", str(tmp_path / "run"), *QUIET,
                "--report-to", "tensorboard")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "train" in r.stderr and "4/4" in r.stderr  # the progress bar reached the last step
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [2, 4] and all(e.value > 0 for e in losses)
    assert {"lr", "grad_norm", "samples_per_s"} <= set(events.Tags()["scalars"])
    logged = [line for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(logged) == 2  # log.jsonl stays


def test_wandb_offline_writes_a_run_folder(golden, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    cfg = write_config(tmp_path / "c.toml", max_steps=2, log_every=1)
    for name in ("WANDB_API_KEY", "WANDB_MODE"):  # no account: the trainer must choose offline itself
        monkeypatch.delenv(name, raising=False)
    env = {"WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    r = run_cli("--shards", str(golden), "--config", str(cfg), "--output", str(tmp_path / "run"), *QUIET,
                "--report-to", "wandb", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs


def test_unknown_tracker_is_refused():
    assert parse_report_to(["none"]) == () and parse_report_to(None) == ()
    with pytest.raises(ConfigError, match="choose from tensorboard, wandb, none"):
        parse_report_to(["tensorbored"])
