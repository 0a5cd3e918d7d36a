"""Conversion between our MM-DiT (`flowcurate.models.mmdit`) and diffusers' `SD3Transformer2DModel`.

diffusers' SD3Transformer2DModel has the same maths under other names, with q, k, v in separate Linears
and the (scale, shift) order in its AdaLayerNormContinuous layers: the final norm and the last block's
pre-only text norm (its conversion scripts call the fix `swap_scale_shift`). Parity is tested at 1e-6
(tests/test_mmdit.py).
"""

from __future__ import annotations

import torch

from flowcurate.models.mmdit import MMDiT, MMDiTConfig

_SAME, _QKV, _SWAP = "same", "qkv", "swap"


def diffusers_config(config: MMDiTConfig) -> dict:
    """Keyword arguments for `SD3Transformer2DModel(**kwargs)` describing the same network."""
    if config.mlp_ratio != 4.0:
        raise ValueError("diffusers' SD3Transformer2DModel has a fixed MLP ratio of 4")
    return dict(
        sample_size=config.sample_size, patch_size=config.patch_size, in_channels=config.in_channels,
        num_layers=config.depth, attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_dim, caption_projection_dim=config.hidden_size,
        pooled_projection_dim=config.pooled_dim, out_channels=config.output_channels,
        pos_embed_max_size=config.pos_embed_max_size, dual_attention_layers=(),
        qk_norm="rms_norm" if config.qk_norm == "rms" else None,
    )


def config_from_diffusers(dconfig) -> MMDiTConfig:
    """MMDiTConfig from an `SD3Transformer2DModel.config` (or its dict); rejects what we do not model."""
    get = dconfig.get if isinstance(dconfig, dict) else lambda k, default=None: getattr(dconfig, k, default)
    hidden = get("num_attention_heads") * get("attention_head_dim")
    if tuple(get("dual_attention_layers", ()) or ()):
        raise NotImplementedError("dual-attention layers (SD3.5-medium, MMDiT-X) are not supported yet")
    if get("caption_projection_dim") != hidden:
        raise ValueError(f"caption_projection_dim {get('caption_projection_dim')} != hidden width {hidden}")
    if get("pos_embed_max_size") is None:
        raise ValueError("pos_embed_max_size must be set (every SD3 release sets it)")
    qk = get("qk_norm")
    if qk not in (None, "rms_norm"):
        raise ValueError(f"unsupported qk_norm {qk!r}")
    return MMDiTConfig(
        depth=get("num_layers"), hidden_size=hidden, num_heads=get("num_attention_heads"),
        patch_size=get("patch_size"), in_channels=get("in_channels"), context_dim=get("joint_attention_dim"),
        pooled_dim=get("pooled_projection_dim"), pos_embed_max_size=get("pos_embed_max_size"),
        sample_size=get("sample_size"), qk_norm="rms" if qk == "rms_norm" else None,
        out_channels=None if get("out_channels") in (None, get("in_channels")) else get("out_channels"),
    )


def _key_table(config: MMDiTConfig) -> list[tuple[str, str | tuple[str, str, str], str]]:
    """(our key, diffusers key(s), how) for every tensor of the state dict."""
    rows: list = [("pos_embed", "pos_embed.pos_embed", _SAME)]

    def linear(ours, theirs, how=_SAME):
        for p in ("weight", "bias"):
            rows.append((f"{ours}.{p}", tuple(f"{t}.{p}" for t in theirs) if how == _QKV else f"{theirs}.{p}", how))

    linear("x_embedder.proj", "pos_embed.proj")
    linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    linear("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    linear("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    linear("context_embedder", "context_embedder")
    for i in range(config.depth):
        ours, theirs = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        pre_only = i == config.depth - 1
        for stream, q, k, v, norm_q, norm_k in (("x_block", "to_q", "to_k", "to_v", "norm_q", "norm_k"),
                                                ("context_block", "add_q_proj", "add_k_proj", "add_v_proj",
                                                 "norm_added_q", "norm_added_k")):
            linear(f"{ours}.{stream}.attn.qkv", tuple(f"{theirs}.attn.{n}" for n in (q, k, v)), _QKV)
            if config.qk_norm == "rms":
                rows.append((f"{ours}.{stream}.attn.ln_q.weight", f"{theirs}.attn.{norm_q}.weight", _SAME))
                rows.append((f"{ours}.{stream}.attn.ln_k.weight", f"{theirs}.attn.{norm_k}.weight", _SAME))
        linear(f"{ours}.x_block.adaLN_modulation.1", f"{theirs}.norm1.linear")
        linear(f"{ours}.x_block.attn.proj", f"{theirs}.attn.to_out.0")
        linear(f"{ours}.x_block.mlp.fc1", f"{theirs}.ff.net.0.proj")
        linear(f"{ours}.x_block.mlp.fc2", f"{theirs}.ff.net.2")
        linear(f"{ours}.context_block.adaLN_modulation.1", f"{theirs}.norm1_context.linear", _SWAP if pre_only else _SAME)
        if not pre_only:
            linear(f"{ours}.context_block.attn.proj", f"{theirs}.attn.to_add_out")
            linear(f"{ours}.context_block.mlp.fc1", f"{theirs}.ff_context.net.0.proj")
            linear(f"{ours}.context_block.mlp.fc2", f"{theirs}.ff_context.net.2")
    linear("final_layer.adaLN_modulation.1", "norm_out.linear", _SWAP)
    linear("final_layer.linear", "proj_out")
    return rows


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift) along dim 0; its own inverse."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _check_keys(have, want, what: str):
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
                         f" ({len(missing)} missing, {len(unexpected)} unexpected)")


def to_diffusers_state_dict(model: MMDiT) -> dict[str, torch.Tensor]:
    """Our state dict in `SD3Transformer2DModel` names and layout.

    Renamed tensors share storage with the model (like `state_dict()`); split and swapped ones are new
    and independent, so the result can be saved with safetensors.
    """
    ours = model.state_dict()
    table = _key_table(model.config)
    _check_keys(ours, [row[0] for row in table], "MMDiT state dict")
    out = {}
    for key, theirs, how in table:
        t = ours[key]
        if how == _QKV:
            out.update({name: part.clone() for name, part in zip(theirs, t.chunk(3, dim=0))})
        else:
            out[theirs] = _swap_halves(t) if how == _SWAP else t
    return out


def from_diffusers_state_dict(state_dict: dict[str, torch.Tensor], config: MMDiTConfig) -> dict[str, torch.Tensor]:
    """An `SD3Transformer2DModel` state dict in our names and layout (the inverse of the above)."""
    table = _key_table(config)
    want = [k for _, theirs, how in table for k in (theirs if how == _QKV else (theirs,))]
    _check_keys(state_dict, want, "diffusers state dict")
    out = {}
    for key, theirs, how in table:
        if how == _QKV:
            out[key] = torch.cat([state_dict[name] for name in theirs], dim=0)
        else:
            out[key] = _swap_halves(state_dict[theirs]) if how == _SWAP else state_dict[theirs]
    return out


def from_diffusers(transformer) -> MMDiT:
    """An MMDiT equal to a diffusers `SD3Transformer2DModel`, on its device and in its dtype.

    `MMDiT.forward(x, t, c, p)` equals `transformer(hidden_states=x, timestep=t * 1000,
    encoder_hidden_states=c, pooled_projections=p).sample`. The weights are copied: training the
    result leaves `transformer` unchanged.
    """
    config = config_from_diffusers(transformer.config)
    state = from_diffusers_state_dict(transformer.state_dict(), config)
    model = MMDiT(config, device="meta")  # no storage, no init work: every tensor is assigned below
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, assign=True)
    return model


def to_diffusers(model: MMDiT):
    """A diffusers `SD3Transformer2DModel` with a copy of our weights (e.g. to use diffusers' pipeline)."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**diffusers_config(model.config))
    state = to_diffusers_state_dict(model)
    transformer.load_state_dict({k: v.detach().clone() for k, v in state.items()}, assign=True)
    return transformer


def from_pretrained_diffusers(path_or_id: str, subfolder: str | None = "transformer", *,
                              revision: str | None = None, torch_dtype: torch.dtype | None = None,
                              device: torch.device | str | None = None, **kwargs) -> MMDiT:
    """Load `SD3Transformer2DModel.from_pretrained(path_or_id, subfolder=...)` (e.g. official SD3 weights,
    `stabilityai/stable-diffusion-3-medium-diffusers`) and convert it for fine-tuning.

    Extra `kwargs` go to `from_pretrained` (`local_files_only`, `token`, ...).
    """
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(
        path_or_id, subfolder=subfolder, revision=revision, torch_dtype=torch_dtype, **kwargs)
    model = from_diffusers(transformer)
    del transformer  # frees diffusers' copy before the move
    return model.to(device) if device is not None else model
