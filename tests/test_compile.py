"""`--compile` over aspect buckets (trainer/train.py, `compile_model`): the MM-DiT is compiled for the
first batch's shape, recompiled once when the width changes and once when the height does (dynamo's
automatic dynamic shapes make those sizes symbolic), and every later bucket shape reuses that graph.
Counted with dynamo's CompileCounter backend (no inductor, no C++ compiler: seconds on a CPU)."""

from __future__ import annotations

import torch


def test_aspect_buckets_do_not_recompile_per_shape():
    from torch._dynamo.testing import CompileCounter

    from flowcurate.models.mmdit import MMDiT, mmdit_config
    from flowcurate.trainer.train import compile_model

    torch._dynamo.reset()
    model = MMDiT(mmdit_config("tiny", depth=1, context_dim=32, pooled_dim=16, in_channels=4))
    counter = CompileCounter()
    net = compile_model(model, backend=counter)
    compiles = []
    # latent (H, W) of a few buckets, then earlier ones again
    for h, w in ((8, 8), (8, 12), (12, 8), (6, 10), (10, 6), (8, 8), (12, 8)):
        out = net(torch.randn(2, 4, h, w), torch.rand(2), torch.randn(2, 5, 32), torch.randn(2, 16))
        out.square().mean().backward()
        compiles.append(counter.frame_count)
    assert compiles == [1, 2, 3, 3, 3, 3, 3]  # the third shape makes both sides symbolic; then none
