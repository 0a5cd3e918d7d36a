"""trainer/flow.py: timestep densities (KS tests), shift vs diffusers, Euler + CFG on analytic fields, losses."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logit

from flowcurate.trainer import flow

N = 20_000  # samples per KS test: a wrong m, s or formula is rejected at p << 1e-3


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logit_normal_cdf(m: float, s: float):
    return lambda t: stats.norm.cdf((logit(t) - m) / s)


def _mode_cdf(scale: float):
    """CDF of t = f(u), f decreasing on [0, 1]: P(t <= x) = 1 - f^{-1}(x), f^{-1} by bisection."""
    def f(u):
        return 1 - u - scale * (np.cos(np.pi * u / 2) ** 2 - 1 + u)

    def cdf(x):
        lo, hi = np.zeros_like(x), np.ones_like(x)
        for _ in range(60):
            mid = (lo + hi) / 2
            above = f(mid) > x  # f decreasing: the root is to the right of mid
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        return 1 - (lo + hi) / 2
    return cdf


def _cosmap_cdf(t):
    # u = (2 / pi) arctan(t / (1 - t)) inverts t = 1 - 1 / (tan(pi u / 2) + 1); its derivative is SD3's
    # pi_CosMap(t) = 2 / (pi (1 - 2t + 2t²))
    return 2 / np.pi * np.arctan2(t, 1 - t)


# ----------------------------------------------------------------------------- timestep densities


def test_logit_normal_passes_ks_and_rejects_wrong_parameters():
    t = flow.sample_t(N, "logit_normal", m=0.3, s=0.8, generator=_gen()).double().numpy()
    assert t.shape == (N,) and ((t > 0) & (t < 1)).all()
    assert stats.kstest(t, _logit_normal_cdf(0.3, 0.8)).pvalue > 1e-3
    assert stats.kstest(t, _logit_normal_cdf(0.0, 0.8)).pvalue < 1e-6  # the test can tell m apart
    assert stats.kstest(t, _logit_normal_cdf(0.3, 1.0)).pvalue < 1e-6  # and s


def test_default_density_is_sd3_logit_normal_0_1():
    t = flow.sample_t(N, generator=_gen(1)).double().numpy()
    assert stats.kstest(t, _logit_normal_cdf(0.0, 1.0)).pvalue > 1e-3


def test_uniform_passes_ks():
    t = flow.sample_t(N, "uniform", generator=_gen(2)).double().numpy()
    assert stats.kstest(t, "uniform").pvalue > 1e-3


def test_cosmap_within_unit_interval_and_passes_ks():
    t = flow.sample_t(N, "cosmap", generator=_gen(3)).double().numpy()
    assert ((t >= 0) & (t <= 1)).all()
    assert stats.kstest(t, _cosmap_cdf).pvalue > 1e-3
    assert stats.kstest(t, "uniform").pvalue < 1e-6


def test_mode_density_symmetric_centred_and_passes_ks():
    t = flow.sample_t(N, "mode", mode_scale=1.29, generator=_gen(4)).double().numpy()
    assert ((t >= 0) & (t <= 1)).all()
    # f(1 - u) = 1 - f(u): symmetric about 1/2; positive scale concentrates mass around the middle
    assert abs(t.mean() - 0.5) < 0.01 and abs(np.median(t) - 0.5) < 0.01
    assert t.std() < 0.8 * math.sqrt(1 / 12)
    assert stats.kstest(t, _mode_cdf(1.29)).pvalue > 1e-3
    assert stats.kstest(t, _mode_cdf(0.0)).pvalue < 1e-6


def test_mode_scale_zero_is_uniform_and_out_of_range_raises():
    t = flow.sample_t(N, "mode", mode_scale=0.0, generator=_gen(5)).double().numpy()
    assert stats.kstest(t, "uniform").pvalue > 1e-3
    with pytest.raises(ValueError, match="mode_scale"):
        flow.sample_t(4, "mode", mode_scale=1.8)
    with pytest.raises(ValueError, match="density"):
        flow.sample_t(4, "lognorm")


def test_sample_t_is_reproducible_and_honours_dtype():
    a = flow.sample_t(16, "cosmap", generator=_gen(6), dtype=torch.float64)
    assert a.dtype == torch.float64 and torch.equal(a, flow.sample_t(16, "cosmap", generator=_gen(6),
                                                                      dtype=torch.float64))


# ----------------------------------------------------------------------------- shift


def test_shift_formula_values():
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    # SD3 eq. 23: alpha = 3 maps 0.25 / 0.5 / 0.75 to 0.5 / 0.75 / 0.9; the endpoints stay put
    assert torch.allclose(flow.shift_t(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 0.9, 1.0], dtype=torch.float64))
    assert flow.shift_t(t, 1.0) is t
    # a log-SNR shift by log(alpha): shifts compose multiplicatively and invert with 1 / alpha
    assert torch.allclose(flow.shift_t(flow.shift_t(t, 3.0), 2.0), flow.shift_t(t, 6.0))
    assert torch.allclose(flow.shift_t(flow.shift_t(t, 3.0), 1 / 3), t)


def test_shifted_logit_normal_is_logit_normal_with_m_plus_log_alpha():
    # logit(shift_t(t, a)) = logit(t) + log a, so the shift in training moves m by log a
    t = flow.sample_t(N, m=0.0, s=1.0, shift=3.0, generator=_gen(7)).double().numpy()
    assert stats.kstest(t, _logit_normal_cdf(math.log(3.0), 1.0)).pvalue > 1e-3


@pytest.fixture(scope="module")
def scheduler_cls():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler


def test_shift_matches_diffusers_training_table(scheduler_cls):
    sched = scheduler_cls(shift=3.0)
    base = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000  # diffusers: linspace(1, 1000)[::-1] / 1000
    assert torch.allclose(sched.sigmas.double(), flow.shift_t(base, 3.0), atol=1e-6)


@pytest.mark.parametrize("steps", [5, 28])
def test_sigmas_vs_diffusers_set_timesteps(scheduler_cls, steps):
    sched = scheduler_cls(shift=3.0)
    sched.set_timesteps(steps)
    theirs = sched.sigmas.double()
    assert theirs.shape == (steps + 1,) and theirs[0] == 1 and theirs[-1] == 0
    assert torch.allclose(sched.timesteps.double(), theirs[:-1] * 1000, atol=1e-3)  # model sees t * 1000
    # What diffusers does: its grid runs from 1 to the *already shifted* smallest training sigma,
    # shift_t(1/1000), and is shifted again; so the last model call is at shift_t(shift_t(1/1000)) ~ 0.0089
    sigma_min = flow.shift_t(1 / 1000, 3.0)
    grid = torch.linspace(1, sigma_min, steps, dtype=torch.float64)
    assert torch.allclose(theirs[:-1], flow.shift_t(grid, 3.0), atol=1e-6)
    assert theirs[-2].item() == pytest.approx(flow.shift_t(flow.shift_t(1 / 1000, 3.0), 3.0), rel=1e-5)
    # Ours (deliberate difference): steps equal intervals of linspace(1, 0, steps + 1), shifted once; the
    # shift formula agrees exactly when diffusers is handed our unshifted grid
    ours = flow.sigmas(steps, 3.0, dtype=torch.float64)
    sched.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1)[:-1].numpy())
    assert torch.allclose(sched.sigmas.double(), ours, atol=1e-6)
    assert ours.shape == (steps + 1,) and ours[0] == 1 and ours[-1] == 0 and (ours.diff() < 0).all()


def test_euler_sampler_matches_diffusers_step_loop_on_their_schedule(scheduler_cls):
    sched = scheduler_cls(shift=3.0)
    sched.set_timesteps(6)
    noise = torch.randn(2, 3, 4, 4, generator=_gen(8))
    x0 = torch.randn(2, 3, 4, 4, generator=_gen(9))
    field = _gaussian_field(mu=0.5, sd=0.7)
    x = noise
    for t in sched.timesteps:
        v = field(x, (t / 1000).expand(2), None, None)
        x = sched.step(v, t, x).prev_sample
    ours = flow.euler_sample(field, noise, torch.zeros(2, 1, 1), torch.zeros(2, 1), ts=sched.sigmas)
    assert torch.allclose(ours, x, atol=1e-5)
    assert not torch.allclose(ours, x0)


# ----------------------------------------------------------------------------- Euler sampler and CFG


def _point_field(calls=None):
    """Exact velocity when all data is one point x0 = pooled reshaped to x: v = (x_t - x0) / t = eps - x0.

    Along x_t = x0 + t (eps - x0) this field is constant, so Euler is exact on any schedule.
    """
    def field(x, t, context, pooled):
        if calls is not None:
            calls.append(len(x))
        return (x - pooled.view(x.shape)) / t.view(-1, *[1] * (x.ndim - 1))
    return field


def _gaussian_field(mu: float, sd: float):
    """Exact marginal velocity E[eps - x0 | x_t = x] for data x0 ~ N(mu, sd² I).

    x_t ~ N((1 - t) mu, V), V = (1 - t)² sd² + t²; v = (t - (1 - t) sd²) / V (x - (1 - t) mu) - mu.
    Its ODE maps noise z at t = 1 to mu + sd z at t = 0.
    """
    def field(x, t, context, pooled):
        t = t.view(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        var = (1 - t) ** 2 * sd**2 + t**2
        return (t - (1 - t) * sd**2) / var * (x - (1 - t) * mu) - mu
    return field


@pytest.mark.parametrize("steps, shift", [(1, 1.0), (3, 3.0), (10, 2.0)])
def test_euler_lands_exactly_on_point_data(steps, shift):
    x0 = torch.randn(3, 2, 4, 4, generator=_gen(10), dtype=torch.float64)
    noise = torch.randn(3, 2, 4, 4, generator=_gen(11), dtype=torch.float64)
    out = flow.euler_sample(_point_field(), noise, torch.zeros(3, 1, 1), x0.flatten(1), steps=steps, shift=shift)
    assert out.dtype == torch.float64
    assert torch.allclose(out, x0, atol=1e-6)


def test_euler_on_gaussian_data_converges_to_known_endpoint():
    mu, sd = 0.5, 0.3
    z = torch.randn(4, 1, 8, 8, generator=_gen(12), dtype=torch.float64)
    target = mu + sd * z
    cond = torch.zeros(4, 1, 1), torch.zeros(4, 1)
    err = {n: (flow.euler_sample(_gaussian_field(mu, sd), z, *cond, steps=n, shift=3.0) - target).abs().max()
           for n in (50, 500)}
    assert err[500] < 1.2e-2  # on samples of spread ~1 (|z| up to ~3)
    assert 7 < err[50] / err[500] < 13  # first order: ten times the steps, a tenth of the error


def test_cfg_scale_one_equals_conditional():
    x0_c = torch.randn(2, 4, 2, 2, generator=_gen(13))
    noise = torch.randn(2, 4, 2, 2, generator=_gen(14))
    ctx = torch.zeros(2, 1, 1)
    plain = flow.euler_sample(_point_field(), noise, ctx, x0_c.flatten(1), steps=4, shift=3.0)
    calls = []
    guided = flow.euler_sample(_point_field(calls), noise, ctx, x0_c.flatten(1), steps=4, shift=3.0,
                               uncond=(torch.zeros(1, 1, 1), torch.ones(1, 16)), cfg_scale=1.0)
    assert torch.equal(plain, guided)
    assert calls == [2] * 4  # w = 1 skips the unconditional half


@pytest.mark.parametrize("w", [0.0, 2.5, 7.0])
def test_cfg_extrapolates_with_one_batched_forward(w):
    # Both fields are point fields, so the guided field is the point field of x0_u + w (x0_c - x0_u)
    b = 3
    x0_c = torch.randn(b, 2, 4, 4, generator=_gen(15), dtype=torch.float64)
    x0_u = torch.randn(1, 2, 4, 4, generator=_gen(16), dtype=torch.float64)  # the empty prompt: batch 1
    noise = torch.randn(b, 2, 4, 4, generator=_gen(17), dtype=torch.float64)
    calls = []
    out = flow.euler_sample(_point_field(calls), noise, torch.zeros(b, 5, 8), x0_c.flatten(1), steps=5,
                            shift=3.0, uncond=(torch.zeros(1, 5, 8), x0_u.flatten(1)), cfg_scale=w)
    assert torch.allclose(out, x0_u + w * (x0_c - x0_u), atol=1e-6)
    assert calls == [2 * b] * 5


# ----------------------------------------------------------------------------- losses


def test_interpolate_endpoints():
    x0, eps = torch.randn(2, 3, generator=_gen(18)), torch.randn(2, 3, generator=_gen(19))
    assert torch.equal(flow.interpolate(x0, eps, torch.tensor([0.0, 1.0])), torch.stack([x0[0], eps[1]]))


def test_v_loss_zero_for_exact_velocity_and_positive_otherwise():
    x0 = torch.randn(4, 2, 4, 4, generator=_gen(20))
    eps = flow.noise_like(x0, _gen(21))
    t = flow.sample_t(4, generator=_gen(22))
    ctx, pooled = torch.zeros(4, 1, 1), x0.flatten(1)
    assert flow.flow_loss(_point_field(), x0, ctx, pooled, t, eps).item() < 1e-10
    zero = flow.flow_loss(lambda x, t, c, p: torch.zeros_like(x), x0, ctx, pooled, t, eps, reduction="none")
    assert zero.shape == (4,)
    assert torch.allclose(zero, (eps - x0).pow(2).flatten(1).mean(1))
    # a sign error in the target (x0 - eps) is caught
    flipped = flow.flow_loss(lambda x, t, c, p: x0 - eps, x0, ctx, pooled, t, eps)
    assert flipped > 1.0
    with pytest.raises(ValueError, match="reduction"):
        flow.flow_loss(_point_field(), x0, ctx, pooled, t, eps, reduction="sum")


def test_validation_levels_and_determinism():
    assert torch.allclose(flow.validation_ts(), torch.tensor([0.0625 + 0.125 * i for i in range(8)]))
    x0 = torch.randn(3, 2, 4, 4, generator=_gen(23))
    ctx, pooled = torch.zeros(3, 1, 1), torch.zeros(3, 32)

    def model(x, t, c, p):  # a wrong model, so the loss depends on the noise
        return 0.5 * x

    a = flow.validation_loss(model, x0, ctx, pooled, generator=_gen(1))
    assert a.shape == (8,) and (a > 0).all()
    assert torch.equal(a, flow.validation_loss(model, x0, ctx, pooled, generator=_gen(1)))
    assert torch.equal(flow.validation_loss(model, x0, ctx, pooled),
                       flow.validation_loss(model, x0, ctx, pooled))  # default: fixed seed
    assert not torch.equal(a, flow.validation_loss(model, x0, ctx, pooled, generator=_gen(2)))
    assert flow.validation_loss(_point_field(), x0, ctx, x0.flatten(1)).abs().max() < 1e-10


# ----------------------------------------------------------------------------- with the MM-DiT


def test_with_tiny_mmdit():
    from flowcurate.models.mmdit import SIZES, MMDiT

    cfg = SIZES["tiny"]
    torch.manual_seed(0)
    model = MMDiT(cfg)
    g = _gen(24)
    x0 = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    ctx, pooled = torch.randn(2, 7, cfg.context_dim, generator=g), torch.randn(2, cfg.pooled_dim, generator=g)
    eps, t = flow.noise_like(x0, g), flow.sample_t(2, shift=3.0, generator=g)
    loss = flow.flow_loss(model, x0, ctx, pooled, t, eps)
    # a fresh MM-DiT predicts zero velocity (zeroed output layer), so the loss is |eps - x0|²
    assert torch.allclose(loss, (eps - x0).pow(2).mean())
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    uncond = torch.zeros(1, 7, cfg.context_dim), torch.zeros(1, cfg.pooled_dim)
    out1 = flow.euler_sample(model, eps, ctx, pooled, steps=3, shift=3.0, uncond=uncond, cfg_scale=1.0)
    out4 = flow.euler_sample(model, eps, ctx, pooled, steps=3, shift=3.0, uncond=uncond, cfg_scale=4.0)
    assert out4.shape == x0.shape and torch.isfinite(out4).all()
    assert not torch.allclose(out1, out4)
