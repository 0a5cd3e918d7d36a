"""MM-DiT, the Stable Diffusion 3 transformer (Esser et al. 2024, §4), in one file read top to bottom.

Config -> helpers -> embedders -> joint block -> final layer -> model -> sin-cos positional embedding
-> size registry. Conversion to and from diffusers' `SD3Transformer2DModel`: `mmdit_diffusers.py`.

Convention (the one trainer/flow.py states): `x_t = (1 - t) x0 + t eps`, t = 1 is pure noise, and the
model predicts the velocity `v = eps - x0`. `forward` takes t in [0, 1]; the network sees `t * 1000`, as
both reference codebases (Stability-AI/sd3.5 and diffusers) feed it, so official weights work unchanged.

Module and parameter names follow the reference implementation (Stability-AI/sd3.5 `mmditx.py`:
`x_embedder`, `pos_embed`, `t_embedder`, `y_embedder`, `context_embedder`,
`joint_blocks.{i}.x_block|context_block`, `adaLN_modulation`, `final_layer`), so a reference checkpoint
loads with `load_state_dict` after stripping its `model.diffusion_model.` prefix, and diffusers
checkpoints convert with `flowcurate.models.mmdit_diffusers`.

Not implemented: SD3.5-medium's dual-attention layers (MMDiT-X).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class MMDiTConfig:
    # number of joint blocks; the last block's context stream is pre-only (as in the reference)
    depth: int = 24
    # width of both streams; None: 64 * depth, the paper's size rule (head dim 64, §4)
    hidden_size: int | None = None
    # attention heads; None: depth (so head dim 64)
    num_heads: int | None = None
    # latent pixels per patch side (SD3: 2x2 patches)
    patch_size: int = 2
    # latent channels in and out (the SD3 autoencoder has 16)
    in_channels: int = 16
    # channels predicted, when fewer than taken in (None: in_channels). Instruction-based editing feeds
    # the noisy latent and the source image's latent on channels (32 in) and predicts one velocity (16
    # out), as InstructPix2Pix does (models/edit.py); diffusers calls it `out_channels` too
    out_channels: int | None = None
    # width of the context tokens (diffusers `joint_attention_dim`): 4096 = T5-XXL, CLIP padded to it
    context_dim: int = 4096
    # width of the pooled text vector: CLIP-L 768 + CLIP-G 1280
    pooled_dim: int = 2048
    # side, in patches, of the stored sin-cos table that inputs are centre-cropped from (released: 192)
    pos_embed_max_size: int = 192
    # latent side the sin-cos frequencies are scaled for: position p becomes p * (sample_size / patch) /
    # pos_embed_max_size (diffusers `sample_size`; only fills a fresh table, checkpoints carry their own).
    # The whole table always spans [0, sample_size / patch): a bigger table is a finer grid of that range.
    sample_size: int = 128
    # SD3 §5.3.2 resolution curriculum: the latent side (latent pixels; 32 = 256 px images with an f=8
    # autoencoder) whose position range this table keeps when training at a higher resolution
    # (`at_resolution`). None: the model was not moved to another resolution. A record only: the table
    # is fixed by pos_embed_max_size and sample_size, which is all diffusers needs to rebuild it.
    pos_embed_base_size: int | None = None
    # per-head RMS norm on queries and keys, "rms" or None: needed for stable bf16 training (§5.3.2)
    qk_norm: str | None = "rms"
    # MLP width / hidden width
    mlp_ratio: float = 4.0

    def __post_init__(self):
        # fill the size-rule defaults in place, so asdict(config) records the real widths
        if self.hidden_size is None:
            object.__setattr__(self, "hidden_size", 64 * self.depth)
        if self.num_heads is None:
            object.__setattr__(self, "num_heads", self.depth)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 (2-D sin-cos embedding)")
        if self.qk_norm not in (None, "rms"):
            raise ValueError(f"qk_norm must be None or 'rms', got {self.qk_norm!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def output_channels(self) -> int:
        """Channels of the predicted velocity: `out_channels`, or `in_channels` when that is None."""
        return self.in_channels if self.out_channels is None else self.out_channels


#################################################################################
#                                    Helpers                                    #
#################################################################################


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, L, D) scaled and shifted per sample by shift, scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned scale (the reference's QK-norm, eps 1e-6)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in float32 so bf16 activations do not lose the normalisation (as diffusers does)
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class Mlp(nn.Module):
    """Linear -> GELU (tanh approximation) -> Linear, reference names `fc1`, `fc2`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C), each token laid out (p, q, c) as the final layer emits."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """(B, H/p * W/p, p * p * C) -> (B, C, H, W); the inverse of `patchify` (reference `unpatchify`)."""
    b, p = x.shape[0], patch_size
    h, w = height // p, width // p
    x = x.reshape(b, h, w, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, -1, h * p, w * p)


#################################################################################
#                 Embedding layers for timesteps, pooled text, patches          #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (B, D): 256-d sinusoid ([cos, sin], max period 1e4) -> Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """t: (B,) float, any scale (we pass t * 1000) -> (B, dim) float32, cos half first."""
        half = dim // 2
        # the same float32 op order as diffusers' Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        args = t.float()[:, None] * torch.exp(exponent)[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_size).to(dtype))


class VectorEmbedder(nn.Module):
    """Pooled text vector (B, pooled_dim) -> (B, D): Linear, SiLU, Linear (reference `VectorEmbedder`)."""

    def __init__(self, input_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.mlp(y)


class PatchEmbed(nn.Module):
    """Latents (B, C, H, W) -> tokens (B, H/p * W/p, D), row-major, with a p x p stride-p conv."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


#################################################################################
#                                 Core MM-DiT                                   #
#################################################################################


class SelfAttention(nn.Module):
    """One stream's attention weights: fused qkv, optional per-head QK-norm, output projection.

    The attention itself runs in `JointBlock` over both streams at once; a pre-only stream has no `proj`.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # per-head RMS norm, separate weights per stream (SD3 §5.3.2); Identity keeps the names of
        # checkpoints without QK-norm (SD3-medium) identical to the reference's
        self.ln_q = RMSNorm(dim // num_heads) if qk_norm == "rms" else nn.Identity()
        self.ln_k = RMSNorm(dim // num_heads) if qk_norm == "rms" else nn.Identity()
        if not pre_only:
            self.proj = nn.Linear(dim, dim)

    def pre_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, L, D) -> q, k, v: (B, heads, L, head_dim)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).unbind(2)  # (B, L, h, hd)
        q, k = self.ln_q(q), self.ln_k(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class StreamBlock(nn.Module):
    """One stream (image or text) of a joint block: adaLN-Zero around attention and MLP (DiT).

    The reference calls this `DismantledBlock`. A pre-only stream (the text stream of the last block)
    only supplies q, k, v: its adaLN gives (shift, scale), and it has no projection, MLP or output.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: str | None, pre_only: bool):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm, pre_only)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        n_mods = 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n_mods * hidden_size))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """x: (B, L, D), c: (B, D) -> ((q, k, v), what post_attention needs or None)."""
        if self.pre_only:
            shift_msa, scale_msa = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa)), None
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        qkv = self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa))
        return qkv, (gate_msa, shift_mlp, scale_mlp, gate_mlp)

    def post_attention(self, x, attn, gate_msa, shift_mlp, scale_mlp, gate_mlp) -> torch.Tensor:
        """x: (B, L, D) residual stream, attn: (B, L, D) this stream's share of the joint attention."""
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attn)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class JointBlock(nn.Module):
    """Two streams with separate weights, joined only in one attention over [context; x] (SD3 Fig. 2)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: str | None, pre_only: bool):
        super().__init__()
        self.context_block = StreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=pre_only)
        self.x_block = StreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=False)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor):
        """context: (B, Lc, D), x: (B, Lx, D), c: (B, D) -> (context or None after a pre-only block, x)."""
        context_qkv, context_rest = self.context_block.pre_attention(context, c)
        x_qkv, x_rest = self.x_block.pre_attention(x, c)
        # text tokens first, as the reference does (diffusers puts the image first: same result, since
        # attention has no positional term). A pre-only block still computes the text queries and
        # throws their output away, as both references do; skipping them would leave the last `ln_q`
        # without a gradient, which DDP rejects.
        q, k, v = (torch.cat([a, b], dim=2) for a, b in zip(context_qkv, x_qkv))  # (B, h, Lc + Lx, hd)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, Lc + Lx, D)
        context_attn, x_attn = attn.split([context.shape[1], x.shape[1]], dim=1)
        x = self.x_block.post_attention(x, x_attn, *x_rest)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, context_attn, *context_rest), x


class FinalLayer(nn.Module):
    """LayerNorm, adaLN (shift, scale) from c, Linear to p * p * C per token (reference `FinalLayer`)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # (shift, scale) as in the reference; diffusers' AdaLayerNormContinuous stores (scale, shift)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    """The SD3 MM-DiT: predicts the flow velocity of 16-channel latents from timestep and text.

    `device`, `dtype`: where and in which precision the weights are created ("meta" builds no storage;
    used when weights are loaded right after). `gradient_checkpointing` may also be toggled later as an
    attribute: it recomputes each joint block in the backward pass, trading compute for memory.
    """

    def __init__(self, config: MMDiTConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, gradient_checkpointing: bool = False):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = gradient_checkpointing
        d, p = config.hidden_size, config.patch_size
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.x_embedder = PatchEmbed(p, config.in_channels, d)
            # fixed 2-D sin-cos table, a buffer as in the reference so checkpoints carry it
            self.register_buffer("pos_embed", torch.zeros(1, config.pos_embed_max_size ** 2, d))
            self.t_embedder = TimestepEmbedder(d)
            self.y_embedder = VectorEmbedder(config.pooled_dim, d)
            self.context_embedder = nn.Linear(config.context_dim, d)
            self.joint_blocks = nn.ModuleList([
                JointBlock(d, config.num_heads, config.mlp_ratio, config.qk_norm, pre_only=i == config.depth - 1)
                for i in range(config.depth)
            ])
            self.final_layer = FinalLayer(d, p, config.output_channels)
            self.initialize_weights()
        if dtype is not None:
            self.to(dtype)

    def initialize_weights(self):
        """DiT's initialisation (facebookresearch/DiT models.py), which the inference references lack."""
        # Transformer layers: xavier-uniform weights, zero biases
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(_basic_init)

        # Patch embedding: like an nn.Linear over the flattened patch
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        # Timestep MLP: N(0, 0.02) as in DiT. The pooled-text MLP keeps xavier: DiT's label table has no
        # counterpart here, and a Linear on a continuous vector is initialised like the others.
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # Fixed sin-cos positions
        self.pos_embed.copy_(get_2d_sincos_pos_embed(
            self.config.hidden_size, self.config.pos_embed_max_size,
            base_size=self.config.sample_size // self.config.patch_size).unsqueeze(0))

        # Zero-out adaLN modulation layers: every block starts as the identity (adaLN-Zero)
        for block in self.joint_blocks:
            for stream in (block.context_block, block.x_block):
                nn.init.zeros_(stream.adaLN_modulation[-1].weight)
                nn.init.zeros_(stream.adaLN_modulation[-1].bias)

        # Zero-out output layers: a fresh model predicts exactly zero velocity
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def cropped_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """(1, h * w, D) for a latent of `height` x `width`: the centre h x w patches of the stored table.

        SD3 §5.3.2: positions of a smaller (or non-square) input are the centre of the largest grid,
        `top = (max - h) // 2`, `left = (max - w) // 2` (reference and diffusers `cropped_pos_embed`).
        """
        p, m = self.config.patch_size, self.config.pos_embed_max_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {p}")
        h, w = height // p, width // p
        if h > m or w > m:
            raise ValueError(f"latent {height}x{width} is {h}x{w} patches, more than pos_embed_max_size {m}")
        top, left = (m - h) // 2, (m - w) // 2
        table = self.pos_embed.view(1, m, m, -1)[:, top:top + h, left:left + w, :]
        return table.reshape(1, h * w, -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Velocity `eps - x0` at noise level t.

        x: (B, C, H, W) noisy latents, H and W multiples of patch_size, C = in_channels (an editing model:
        the noisy latent and the source latent concatenated); t: (B,) in [0, 1], 1 = pure noise;
        context: (B, L, context_dim) text tokens (SD3: 77 CLIP + L T5); pooled: (B, pooled_dim).
        Returns (B, output_channels, H, W).
        """
        height, width = x.shape[-2:]
        # the fixed table in the parameters' dtype: a bf16 FSDP policy casts parameters, never buffers
        pos = self.cropped_pos_embed(height, width).to(self.x_embedder.proj.weight.dtype)
        x = self.x_embedder(x) + pos                                      # (B, T, D), T = H * W / p**2
        c = self.t_embedder(t * 1000, x.dtype) + self.y_embedder(pooled)  # (B, D), t * 1000 (§1.5)
        context = self.context_embedder(context)                          # (B, L, D)
        for block in self.joint_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                context, x = checkpoint(block, context, x, c, use_reentrant=False)
            else:
                context, x = block(context, x, c)
        x = self.final_layer(x, c)                                        # (B, T, p * p * C)
        return unpatchify(x, self.config.patch_size, height, width)       # (B, C, H, W)


#################################################################################
#                   Sine/cosine positional embedding functions                  #
#################################################################################


def get_1d_sincos_pos_embed(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: (M,) -> (M, dim) float64: [sin(pos * w), cos(pos * w)], w_i = 1 / 10000^(2i / dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    out = torch.outer(pos.double(), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_positions(grid_size: int, base_size: int) -> torch.Tensor:
    """(grid_size,) float32 positions `p / (grid_size / base_size)` of one axis of the stored table, computed
    as diffusers does: the whole table spans [0, base_size) whatever grid_size is."""
    return torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size)


def get_2d_sincos_pos_embed(dim: int, grid_size: int, base_size: int) -> torch.Tensor:
    """(grid_size**2, dim) float32 for a row-major square grid: first half encodes the column, second the row.

    Positions are `p / (grid_size / base_size)`: a grid bigger than the `base_size` one the model was
    designed for spans proportionally more of each frequency (diffusers `PatchEmbed`; SD3 §5.3.2 rescales
    positions the same way). Positions in float32, frequencies in float64, then float32, matching
    diffusers so that a fresh table equals its `pos_embed.pos_embed` exactly.
    """
    pos = sincos_positions(grid_size, base_size)
    cols = pos.repeat(grid_size)              # token n = row * grid_size + col
    rows = pos.repeat_interleave(grid_size)
    emb = torch.cat([get_1d_sincos_pos_embed(dim // 2, cols), get_1d_sincos_pos_embed(dim // 2, rows)], dim=1)
    return emb.float()


def cropped_positions(config: MMDiTConfig, patches: int) -> torch.Tensor:
    """(patches,) positions along one axis that an input `patches` patches wide gets (the centre crop of
    `sincos_positions`, as `MMDiT.cropped_pos_embed` takes it): what the curriculum test compares."""
    m = config.pos_embed_max_size
    if patches > m:
        raise ValueError(f"{patches} patches is more than pos_embed_max_size {m}")
    top = (m - patches) // 2
    return sincos_positions(m, config.sample_size // config.patch_size)[top:top + patches]


def at_resolution(config: MMDiTConfig, trained_latent: int, latent: int) -> MMDiTConfig:
    """The config for training at latent side `latent` a model that `config` trained at `trained_latent`,
    with positions interpolated into the range the trained resolution saw (SD3 §5.3.2).

    The table side grows with the resolution (pos_embed_max_size * latent / trained_latent) while
    sample_size, and so the range the whole table spans, stays: the grid gets finer by the same factor,
    and an input `latent / trained_latent` times wider covers the positions the trained one covered
    (at 2x: the same first position, half the spacing, so it ends half a new step past the old last
    position, i.e. on the same cells). Still a fixed sin-cos table that diffusers' config
    (`sample_size`, `pos_embed_max_size`) reproduces exactly. The first move records `trained_latent`
    as `pos_embed_base_size`; later moves keep it.

    The table must grow for that, not just be refilled: diffusers' grid starts at position 0 and inputs
    take its centre, so the same first position at half the spacing needs twice the side. Its memory
    grows with (latent / trained_latent)^2: d24's 192-patch table (226 MB in float32) is 906 MB at 2x.
    A base stage whose table has room to spare (192 patches hold 3072^2 images) can start smaller.
    """
    if latent == trained_latent:
        return config
    side = config.pos_embed_max_size * latent / trained_latent
    if side != int(side):
        raise ValueError(f"cannot move positions from latent side {trained_latent} to {latent}: the table side "
                         f"{config.pos_embed_max_size} * {latent} / {trained_latent} is not a whole number of patches")
    base = config.pos_embed_base_size if config.pos_embed_base_size is not None else trained_latent
    return replace(config, pos_embed_max_size=int(side), pos_embed_base_size=base)


#################################################################################
#                                  MM-DiT sizes                                 #
#################################################################################


def _cpu_size(depth: int) -> MMDiTConfig:
    # the paper's width rule at CPU scale; pos table 32 patches = 512 px images, frequencies for 256 px.
    # Text widths are SD3's: the trainer replaces them with its encoders' (dataclasses.replace).
    return MMDiTConfig(depth=depth, pos_embed_max_size=32, sample_size=32)


SIZES: dict[str, MMDiTConfig] = {
    # tests and the tiny demo: two heads, one full block and one pre-only block; tiny text widths
    "tiny": MMDiTConfig(depth=2, hidden_size=64, num_heads=2, context_dim=96, pooled_dim=80,
                        pos_embed_max_size=16, sample_size=16),
    # CPU-trainable: hidden 64 * depth, heads = depth
    "d2": _cpu_size(2),
    "d4": _cpu_size(4),
    "d6": _cpu_size(6),
    # the paper's scaling family (§5.3: d = 15 ... 38), with QK-norm as in its final recipe
    **{f"d{d}": MMDiTConfig(depth=d) for d in (15, 18, 21, 24, 30, 38)},
    # released checkpoints (their diffusers transformer/config.json)
    "sd3-medium": MMDiTConfig(depth=24, qk_norm=None),
    "sd3.5-large": MMDiTConfig(depth=38, qk_norm="rms"),
}


def mmdit_config(name: str, **overrides) -> MMDiTConfig:
    """SIZES[name] with fields replaced, e.g. `mmdit_config("d2", context_dim=96, pooled_dim=80)`.

    A registry entry already holds its width and heads: changing `depth` here keeps them. For the
    paper's size rule at another depth use `MMDiTConfig(depth=...)`.
    """
    if name not in SIZES:
        raise KeyError(f"unknown MM-DiT size {name!r}; known: {', '.join(SIZES)}")
    return replace(SIZES[name], **overrides)
