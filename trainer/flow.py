"""Rectified flow (SD3 §2-3): timestep densities, shift, v-loss, validation loss, Euler sampler with CFG.

Convention, followed by every function here and by `models/mmdit.py`:

    x_t = (1 - t) x0 + t eps,  eps ~ N(0, I),  t in [0, 1],  t = 0 is data and t = 1 is pure noise;
    the model predicts the velocity v = dx_t/dt = eps - x0;
    sampling integrates dx = v dt from t = 1 down to t = 0:  x <- x + (t_next - t) v.

A model is any callable `model_fn(x, t, context, pooled) -> v`, with x: (B, C, H, W), t: (B,) in [0, 1],
context: (B, L, D), pooled: (B, P): `MMDiT` or an analytic field in the tests. Numbers: the SD3 paper
(Esser et al. 2024) §2-3 and App. B.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

DENSITIES = ("logit_normal", "mode", "cosmap", "uniform")
MODE_SCALE_MAX = 2 / (math.pi - 2)  # f_mode is monotonic, so t stays in [0, 1], for -1 <= s <= 1.752


def shift_t(t, alpha: float):
    """Resolution shift t' = alpha t / (1 + (alpha - 1) t) (SD3 eq. 23): alpha > 1 moves t toward noise.

    t: float or tensor of any shape; alpha = sqrt(m / n) for m pixels vs n, SD3 uses 3.0 at 1024².
    """
    return t if alpha == 1 else alpha * t / (1 + (alpha - 1) * t)


def sample_t(n: int, density: str = "logit_normal", m: float = 0.0, s: float = 1.0, mode_scale: float = 1.29,
             shift: float = 1.0, generator: torch.Generator | None = None, device=None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n,) training timesteps t ~ pi(t) (SD3 §3.1), then shifted by `shift`.

    logit_normal: t = sigmoid(u), u ~ N(m, s) (SD3's best, m=0, s=1); mode: t = 1 - u - mode_scale
    (cos²(pi u / 2) - 1 + u), u ~ U(0, 1), heavy tails, favours t = 1/2 for mode_scale > 0; cosmap:
    t = 1 - 1 / (tan(pi u / 2) + 1), the cosine schedule's log-SNR; uniform: t ~ U(0, 1).
    """
    if density == "logit_normal":
        return shift_t(torch.sigmoid(m + s * torch.randn(n, generator=generator, device=device, dtype=dtype)), shift)
    u = torch.rand(n, generator=generator, device=device, dtype=dtype)
    if density == "mode":
        if not -1 <= mode_scale <= MODE_SCALE_MAX:
            raise ValueError(f"mode_scale must be in [-1, {MODE_SCALE_MAX:.3f}] (monotonic), got {mode_scale}")
        t = 1 - u - mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
    elif density == "cosmap":
        a = math.pi / 2 * u  # 1 - 1 / (tan a + 1) = sin a / (sin a + cos a), finite at u -> 1
        t = torch.sin(a) / (torch.sin(a) + torch.cos(a))
    elif density == "uniform":
        t = u
    else:
        raise ValueError(f"unknown timestep density {density!r}; expected one of {DENSITIES}")
    return shift_t(t.clamp(0, 1), shift)


def noise_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """eps ~ N(0, I) with x's shape, dtype and device (drawn where `generator` lives, then moved)."""
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) in x's dtype, to scale x: (B, ...)."""
    return t.to(x.dtype).view(-1, *[1] * (x.ndim - 1))


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps. x0, eps: (B, ...); t: (B,)."""
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * eps


def flow_loss(model_fn: ModelFn, x0: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
              t: torch.Tensor, eps: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Unweighted v-MSE |model(x_t, t) - (eps - x0)|² (SD3 eq. 18 with t ~ pi(t); not diffusers' x0 loss).

    x0, eps: (B, C, H, W); t: (B,); context: (B, L, D); pooled: (B, P). Computed in float32.
    Returns a scalar ("mean") or per-sample means (B,) ("none").
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    v = model_fn(interpolate(x0, eps, t), t, context, pooled)
    per_sample = (v.float() - (eps - x0).float()).pow(2).flatten(1).mean(1)
    return per_sample.mean() if reduction == "mean" else per_sample


def validation_ts(n: int = 8, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n,) equally spaced levels t_i = (i + 0.5) / n (SD3 App. B.3: 8 levels); none is t = 1, which §5.3 drops."""
    return ((torch.arange(n, dtype=torch.float64) + 0.5) / n).to(device=device, dtype=dtype)


@torch.no_grad()
def validation_loss(model_fn: ModelFn, x0: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                    n: int = 8, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) v-loss at each level t_i = (i + 0.5) / n, averaged over the batch; `.mean()` is the score.

    Noise is fixed: drawn from `generator` (default: a CPU generator seeded 0), one eps per level, so
    the same batch scores the same on every call and every device. x0: (B, C, H, W).
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    levels = validation_ts(n, device=x0.device)
    losses = [flow_loss(model_fn, x0, context, pooled, t.expand(len(x0)), noise_like(x0, generator))
              for t in levels]
    return torch.stack(losses)


def sigmas(steps: int, shift: float = 1.0, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(steps + 1,) sampling times shift_t(linspace(1, 0, steps + 1)), from 1 (noise) down to 0 (data).

    Unlike diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps` and sd3.5's `get_sigmas` (grid
    linspace(1, shift_t(1/1000), steps), shifted a second time, then 0 appended, so the last model call
    is at t ~ 0.009 for shift 3 and the others are spaced over steps - 1 intervals), every step here is
    one equal interval of the unshifted grid. Pass their table as `ts` to `euler_sample` to match them.
    """
    return shift_t(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift).to(device=device, dtype=dtype)


@torch.no_grad()
def euler_sample(model_fn: ModelFn, noise: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 steps: int = 28, shift: float = 1.0, uncond: tuple[torch.Tensor, torch.Tensor] | None = None,
                 cfg_scale: float = 1.0, ts: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate from noise at t = 1 to a sample at t = 0 with Euler steps x <- x + (t_next - t) v.

    noise: (B, C, H, W), also the integration dtype; context: (B, L, D); pooled: (B, P).
    uncond: (context, pooled) of the empty prompt's encoding, batch 1 or B (SD3 uses the encoded "" at
    inference, zeros only in training dropout). With cfg_scale w != 1, each step is one batched forward on
    [cond; uncond] and v = v_u + w (v_c - v_u) (on v, as diffusers; equal to sd3.5's x0 form).
    ts: explicit decreasing times (K + 1,), 1 -> 0, replacing `sigmas(steps, shift)`. Returns (B, C, H, W).
    """
    ts = sigmas(steps, shift, device=noise.device) if ts is None else ts.to(noise.device, torch.float32)
    guided = uncond is not None and cfg_scale != 1
    if guided:
        b = len(noise)
        context = torch.cat([context, uncond[0].expand(b, *uncond[0].shape[1:]).to(context)])
        pooled = torch.cat([pooled, uncond[1].expand(b, *uncond[1].shape[1:]).to(pooled)])
    x = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        x_in = torch.cat([x, x]) if guided else x
        v = model_fn(x_in, t.expand(len(x_in)), context, pooled)
        if guided:
            v_c, v_u = v.chunk(2)
            v = v_u + cfg_scale * (v_c - v_u)
        x = x + (t_next - t).to(x.dtype) * v.to(x.dtype)
    return x
