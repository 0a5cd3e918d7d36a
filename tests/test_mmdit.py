"""models/mmdit.py: parity with diffusers' SD3Transformer2DModel, conversion, init, patches, positions."""

import dataclasses

import pytest
import torch
from diffusers import SD3Transformer2DModel

from flowcurate.models import mmdit, mmdit_diffusers
from flowcurate.models.mmdit import MMDiT, MMDiTConfig

TINY = mmdit.SIZES["tiny"]
# (config, why): every model's last block is pre-only; depth 1 is nothing but the pre-only block
CONFIGS = {
    "qk_rms": dataclasses.replace(TINY, qk_norm="rms"),
    "no_qk": dataclasses.replace(TINY, qk_norm=None),
    "depth1_pre_only": dataclasses.replace(TINY, depth=1, qk_norm="rms"),
}
# (B, H, W, context length): square, and non-square with an odd crop offset (5 of 16 patches)
SHAPES = [(2, 8, 8, 7), (1, 10, 4, 5)]


def _randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and buffer random (a fresh model's zeros would hide conversion mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            scale = 1 / t[0].numel() ** 0.5 if t.ndim in (2, 4) else 0.3  # Linear/conv: ~unit activations
            t.copy_(torch.randn(t.shape, generator=g) * scale)
    return module


def _inputs(cfg: MMDiTConfig, b: int, h: int, w: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, cfg.in_channels, h, w, generator=g), torch.rand(b, generator=g),
            torch.randn(b, n, cfg.context_dim, generator=g), torch.randn(b, cfg.pooled_dim, generator=g))


def _diffusers_out(transformer, x, t, context, pooled):
    return transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=context,
                       pooled_projections=pooled).sample


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers_both_directions(name):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    ours = _randomize_(MMDiT(cfg), seed=1).eval()
    theirs = mmdit_diffusers.to_diffusers(ours).eval()
    torch.manual_seed(0)
    theirs_random = _randomize_(SD3Transformer2DModel(**mmdit_diffusers.diffusers_config(cfg)), seed=2).eval()
    ours_from = mmdit_diffusers.from_diffusers(theirs_random).eval()
    with torch.no_grad():
        for b, h, w, n in SHAPES:
            x, t, context, pooled = _inputs(cfg, b, h, w, n)
            out = ours(x, t, context, pooled)
            assert out.shape == x.shape
            assert out.abs().max() > 0.1  # a real signal, not a near-zero output that matches trivially
            torch.testing.assert_close(out, _diffusers_out(theirs, x, t, context, pooled), atol=1e-5, rtol=0)
            torch.testing.assert_close(ours_from(x, t, context, pooled),
                                       _diffusers_out(theirs_random, x, t, context, pooled), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["qk_rms", "no_qk"])
def test_converter_round_trips_exactly(name):
    cfg = CONFIGS[name]
    theirs = _randomize_(SD3Transformer2DModel(**mmdit_diffusers.diffusers_config(cfg)), seed=3)
    back = mmdit_diffusers.to_diffusers_state_dict(mmdit_diffusers.from_diffusers(theirs))
    expected = theirs.state_dict()
    assert back.keys() == expected.keys()
    for k in expected:
        assert torch.equal(back[k], expected[k]), k

    ours = _randomize_(MMDiT(cfg), seed=4)
    again = mmdit_diffusers.from_diffusers_state_dict(mmdit_diffusers.to_diffusers_state_dict(ours), cfg)
    assert again.keys() == ours.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(again[k], v), k
    assert mmdit_diffusers.config_from_diffusers(mmdit_diffusers.diffusers_config(cfg)) == cfg


@pytest.mark.parametrize("name", ["qk_rms", "no_qk"])
def test_our_names_are_the_reference_checkpoint_names(name):
    # diffusers' own converter for reference-format (sd3.5 mmditx.py) checkpoints consumes our state dict
    # key for key and gives what our converter gives: official single-file weights load with
    # `load_state_dict`, and our (scale, shift) swaps agree with diffusers'.
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    cfg = CONFIGS[name]
    ours = _randomize_(MMDiT(cfg), seed=9)
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {}  # every key consumed
    expected = mmdit_diffusers.to_diffusers_state_dict(ours)
    assert converted.keys() == expected.keys()
    for k in expected:
        assert torch.equal(converted[k], expected[k]), k


def test_from_diffusers_copies_weights():
    theirs = _randomize_(SD3Transformer2DModel(**mmdit_diffusers.diffusers_config(TINY)), seed=5)
    ours = mmdit_diffusers.from_diffusers(theirs)
    before = theirs.proj_out.weight.clone()
    with torch.no_grad():
        ours.final_layer.linear.weight.add_(1.0)
    assert torch.equal(theirs.proj_out.weight, before)
    assert all(p.requires_grad for p in ours.parameters())


def test_converter_rejects_wrong_keys_and_dual_attention():
    sd = mmdit_diffusers.to_diffusers_state_dict(MMDiT(TINY))
    del sd["proj_out.bias"]
    with pytest.raises(ValueError, match="missing keys.*proj_out.bias"):
        mmdit_diffusers.from_diffusers_state_dict(sd, TINY)
    with pytest.raises(NotImplementedError, match="dual-attention"):
        mmdit_diffusers.config_from_diffusers({**mmdit_diffusers.diffusers_config(TINY), "dual_attention_layers": (0,)})


def test_from_pretrained_diffusers_loads_a_saved_transformer(tmp_path):
    theirs = _randomize_(SD3Transformer2DModel(**mmdit_diffusers.diffusers_config(TINY)), seed=6).eval()
    theirs.save_pretrained(tmp_path / "transformer")
    ours = mmdit_diffusers.from_pretrained_diffusers(str(tmp_path), local_files_only=True).eval()
    assert ours.config == TINY
    x, t, context, pooled = _inputs(TINY, *SHAPES[0])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, context, pooled), _diffusers_out(theirs, x, t, context, pooled),
                                   atol=1e-5, rtol=0)


def test_fresh_model_outputs_zero_and_still_learns():
    torch.manual_seed(0)
    model = MMDiT(TINY)
    x, t, context, pooled = _inputs(TINY, *SHAPES[1])
    out = model(x, t, context, pooled)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))
    # adaLN-Zero as in DiT: the first gradient reaches only the output Linear (its zero weight gates
    # everything upstream); after one step the rest of the network starts to receive gradient
    ((out - x) ** 2).mean().backward()
    learning = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert learning == {"final_layer.linear.weight", "final_layer.linear.bias"}
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad if p.grad is not None else 0
    model.zero_grad()
    model(x, t, context, pooled).square().mean().backward()
    assert model.final_layer.adaLN_modulation[-1].weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_same_output_and_grads():
    torch.manual_seed(0)
    model = _randomize_(MMDiT(TINY), seed=7)
    x, t, context, pooled = _inputs(TINY, *SHAPES[0])
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        out = model(x, t, context, pooled)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=0, rtol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_patchify_round_trip_and_layout():
    p, c, h, w = 2, 3, 6, 4
    x = torch.arange(2 * c * h * w, dtype=torch.float32).reshape(2, c, h, w)
    tokens = mmdit.patchify(x, p)
    assert tokens.shape == (2, (h // p) * (w // p), p * p * c)
    assert torch.equal(mmdit.unpatchify(tokens, p, h, w), x)
    y = torch.randn(2, 6, p * p * c)
    assert torch.equal(mmdit.patchify(mmdit.unpatchify(y, p, h, w), p), y)
    # token (row i, col j), feature (pi, pj, ch) holds pixel x[ch, i*p + pi, j*p + pj]
    i, j, pi, pj, ch = 2, 1, 1, 0, 2
    assert tokens[1, i * (w // p) + j, (pi * p + pj) * c + ch] == x[1, ch, i * p + pi, j * p + pj]


@pytest.mark.parametrize("sample_size,max_size", [(16, 16), (128, 12)])
def test_pos_embed_and_crop_match_diffusers(sample_size, max_size):
    cfg = dataclasses.replace(TINY, sample_size=sample_size, pos_embed_max_size=max_size)
    ours = MMDiT(cfg)
    theirs = SD3Transformer2DModel(**mmdit_diffusers.diffusers_config(cfg))
    assert torch.equal(ours.pos_embed, theirs.pos_embed.pos_embed)
    assert ours.pos_embed.abs().sum() > 0
    for h, w in [(2 * max_size, 2 * max_size), (8, 8), (10, 4), (2, 2 * max_size), (6, 12)]:
        torch.testing.assert_close(ours.cropped_pos_embed(h, w), theirs.pos_embed.cropped_pos_embed(h, w),
                                   atol=0, rtol=0)
    with pytest.raises(ValueError, match="more than pos_embed_max_size"):
        ours.cropped_pos_embed(2 * max_size + 2, 4)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ours.cropped_pos_embed(7, 4)


def test_centre_crop_picks_the_middle():
    model = MMDiT(TINY)
    m, d = TINY.pos_embed_max_size, TINY.hidden_size
    table = model.pos_embed.view(m, m, d)
    crop = model.cropped_pos_embed(2 * 3, 2 * 4).view(3, 4, d)  # 3 x 4 patches
    assert torch.equal(crop, table[(m - 3) // 2:(m - 3) // 2 + 3, (m - 4) // 2:(m - 4) // 2 + 4])


# released transformer/config.json files (stabilityai/stable-diffusion-3-medium-diffusers, -3.5-large)
RELEASED = {
    "sd3-medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
    "sd3.5-large": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
                        dual_attention_layers=[], qk_norm="rms_norm"),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_sizes_match_diffusers_shapes(name):
    cfg = mmdit.SIZES[name]
    assert mmdit_diffusers.config_from_diffusers(RELEASED[name]) == cfg
    # built on the meta device: real-size shapes without allocating billions of weights
    ours = MMDiT(cfg, device="meta")
    with torch.device("meta"):
        theirs = SD3Transformer2DModel(**mmdit_diffusers.diffusers_config(cfg))
    converted = {k: tuple(v.shape) for k, v in mmdit_diffusers.to_diffusers_state_dict(ours).items()}
    assert converted == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_registry_follows_the_size_rule():
    for name in ("d2", "d4", "d6", "d24", "d38"):
        cfg = mmdit.SIZES[name]
        assert cfg.hidden_size == 64 * cfg.depth and cfg.num_heads == cfg.depth and cfg.head_dim == 64
        assert cfg.qk_norm == "rms"
    assert mmdit.SIZES["sd3-medium"].qk_norm is None and mmdit.SIZES["sd3-medium"].depth == 24
    assert mmdit.SIZES["sd3.5-large"].hidden_size == 2432
    assert mmdit.mmdit_config("d2", context_dim=96).context_dim == 96
    with pytest.raises(KeyError, match="unknown MM-DiT size"):
        mmdit.mmdit_config("d3")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MMDiTConfig(depth=2, hidden_size=64, num_heads=3)


def test_dtype_and_device_are_parameters():
    model = MMDiT(TINY, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.state_dict().values()} == {torch.bfloat16}
    x, t, context, pooled = (a.to(torch.bfloat16) for a in _inputs(TINY, *SHAPES[0]))
    with torch.no_grad():
        assert model(x, t, context, pooled).dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_runs_bf16_autocast():
    cfg = CONFIGS["qk_rms"]
    cpu = _randomize_(MMDiT(cfg), seed=8).eval()
    gpu = MMDiT(cfg, device="cuda").eval()
    gpu.load_state_dict(cpu.state_dict())
    inputs = _inputs(cfg, *SHAPES[0])
    with torch.no_grad():
        expected = cpu(*inputs)
        got = gpu(*(a.cuda() for a in inputs))
        torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.isfinite(gpu(*(a.cuda() for a in inputs))).all()
