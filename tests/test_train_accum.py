"""Gradient accumulation (`--grad-accum N`, `[train] grad_accum`): N micro-batches give the gradient of
the whole batch, and the setting travels with the run like the other data-order settings."""

from __future__ import annotations

import pytest
import torch

from flowcurate.models.mmdit import MMDiT, mmdit_config
from flowcurate.trainer.flow import sample_t
from flowcurate.trainer.train import accumulate_gradients


def gradients(model: MMDiT, inputs: tuple, micro_batches: int) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, *inputs, micro_batches=micro_batches)
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_four_micro_batches_of_four_give_the_gradient_of_the_batch_of_sixteen():
    torch.manual_seed(0)
    mc = mmdit_config("tiny", context_dim=96, pooled_dim=80)
    model = MMDiT(mc)
    with torch.no_grad():  # adaLN-zero starts the blocks at identity: move every weight off zero
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    # t and eps drawn once for the whole batch and split, as the trainer does
    x0 = torch.randn(16, mc.in_channels, 8, 8, generator=g)
    inputs = (x0, torch.randn(16, 154, mc.context_dim, generator=g), torch.randn(16, mc.pooled_dim, generator=g),
              sample_t(16, "logit_normal", 0.0, 1.0, shift=1.0, generator=g), torch.randn(x0.shape, generator=g))
    loss_full, full = gradients(model, inputs, 1)
    loss_accum, accum = gradients(model, inputs, 4)
    assert full.keys() == accum.keys() and len(full) == len(list(model.parameters()))
    assert abs(loss_full - loss_accum) < 1e-6
    worst = max((full[n] - accum[n]).abs().max().item() for n in full)
    assert worst < 1e-6, worst
    assert max(v.abs().max().item() for v in full.values()) > 1e-3  # gradients that mean something
    with pytest.raises(ValueError, match="not divisible"):
        accumulate_gradients(model, *inputs, micro_batches=3)


def test_grad_accum_is_saved_with_the_run_and_a_change_is_refused(golden, tmp_path):
    from flowcurate.cli.main import main as flowcurate
    from flowcurate.trainer import checkpoint as C
    from flowcurate.trainer.cli import main
    from flowcurate.trainer.data import DataError
    from tests.test_train import QUIET, write_config

    cfg = write_config(tmp_path / "c.toml", max_steps=2, checkpoint_every=2)
    common = ["train", "--shards", str(golden), "--config", str(cfg), "--output", str(tmp_path / "run"),
              "--shuffle-buffer", "4", *QUIET]
    # a micro-batch split that does not divide the batch of 4 is refused before anything is written
    assert flowcurate([*common, "--grad-accum", "3"]) == 2 and not (tmp_path / "run").exists()
    assert main([*common, "--grad-accum", "2"]) == 0
    state = C.read_state(C.latest(tmp_path / "run"))
    assert state["config"]["train"]["grad_accum"] == state["data_order"]["grad_accum"] == 2
    with pytest.raises(DataError, match="grad_accum 2 -> 4"):
        main([*common, "--grad-accum", "4", "--max-steps", "3"])
