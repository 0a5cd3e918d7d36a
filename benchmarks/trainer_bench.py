"""Trainer speed: our MM-DiT against diffusers' SD3Transformer2DModel, and the shard loader against the step.

    OPENBLAS_NUM_THREADS=1 python benchmarks/trainer_bench.py                 # CPU: step ratio + loader
    OPENBLAS_NUM_THREADS=1 python benchmarks/trainer_bench.py --depths 2 4 6 --text-tokens 77 154
    python benchmarks/trainer_bench.py --mfu --device cuda --depth 24 --batch 32   # GPU: MFU, bf16

1. Step time: forward + backward (+ an AdamW step) of `MMDiT` and of diffusers' transformer with the
   same weights (converted with `to_diffusers_state_dict`), the same config and the same inputs, timed
   alternately in one process (depth d, hidden 64 d, heads d, 32x32 latents, batch 8, SD3 text widths
   4096 / 2048, 77 or 154 text tokens). Prints ms per step and ours / diffusers (target <= 0.8 on CPU).
2. Loader: samples/s of `flowcurate.trainer.data` over synthetic shards with SD3's real widths (CLIP-L 768, CLIP-G
   1280, T5 4096 x 77, 16x32x32 latents, float16) against the samples/s one training step consumes
   (batch / step time of the benchmarked depths). Target: >= 10x.
3. `--mfu` (GPU): model FLOP utilisation of a training step in bf16 autocast, FLOPs counted by
   `torch.utils.flop_counter` for one step, divided by time and by the GPU's dense bf16 peak
   (`--peak-tflops`; default: looked up from the GPU's name, 989.4 for H100 / H200 SXM). Printed beside
   it, as a cross-check of the count, the formula `formula_flops`: 6 x (token-wise weights) x tokens
   plus the attention matrix products (see `formula_flops`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine, peak_rss_mb  # benchmarks/ is on sys.path when run as a script

from flowcurate.models.mmdit import MMDiT, MMDiTConfig

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0}


def config(depth: int, sample: int = 32) -> MMDiTConfig:
    return MMDiTConfig(depth=depth, pos_embed_max_size=max(sample // 2, 32), sample_size=sample)


def inputs(cfg: MMDiTConfig, batch: int, latent: int, tokens: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    t = torch.rand(batch, generator=g)
    c = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    p = torch.randn(batch, cfg.pooled_dim, generator=g)
    v = torch.randn_like(x)
    return [a.to(device) for a in (x, t, c, p, v)]


def make_step(fn, params, v, autocast):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with autocast:
            out = fn()
        loss = (out.float() - v).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def timed(step, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def step_ratio(depth: int, tokens: int, batch: int, latent: int, repeats: int, device: str,
               compile: bool = False) -> dict:
    from diffusers import SD3Transformer2DModel

    from flowcurate.models.mmdit_diffusers import diffusers_config, to_diffusers_state_dict

    cfg = config(depth, latent)
    torch.manual_seed(0)
    ours = MMDiT(cfg).to(device)
    with torch.no_grad():  # non-zero adaLN / output so every path carries gradient
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    theirs = SD3Transformer2DModel(**diffusers_config(cfg)).to(device)
    theirs.load_state_dict(to_diffusers_state_dict(ours))
    x, t, c, p, v = inputs(cfg, batch, latent, tokens, device)
    off = torch.autocast("cpu", enabled=False)
    fast = torch.compile(ours) if compile else ours
    a = make_step(lambda: fast(x, t, c, p), ours.parameters(), v, off)
    b = make_step(lambda: theirs(hidden_states=x, timestep=t * 1000, encoder_hidden_states=c,
                                 pooled_projections=p).sample, theirs.parameters(), v, off)
    with torch.no_grad():
        diff = (ours(x, t, c, p) - theirs(hidden_states=x, timestep=t * 1000, encoder_hidden_states=c,
                                          pooled_projections=p).sample).abs().max().item()
    for f in (a, b, a):  # warm-up (and compile)
        f()
    ta, tb = [], []
    for _ in range(repeats):  # alternate so drift hits both equally
        ta.append(timed(a, device))
        tb.append(timed(b, device))
    ma, mb = statistics.median(ta), statistics.median(tb)
    return {"depth": depth, "hidden": cfg.hidden_size, "tokens": tokens, "batch": batch, "compile": compile,
            "ours_ms": ma * 1e3,
            "diffusers_ms": mb * 1e3, "ratio": ma / mb, "max_abs_diff": diff,
            "params_M": sum(q.numel() for q in ours.parameters()) / 1e6}


def synthetic_shards(folder: Path, n: int, shard_size: int = 32) -> tuple[list[str], object]:
    """Shards with SD3's real widths through flowcurate.formats.shards, exactly as the pipeline writes them."""
    from flowcurate.formats import shards as S
    from flowcurate.formats.files import write_atomic

    w = {"clip_l": 768, "clip_g": 1280, "t5": 4096}
    te = {r: {"width": w[r], "max_length": 77, "source": "synthetic", "content_hash": "-",
              **({"pooled_width": w[r]} if r != "t5" else {})} for r in w}
    doc = {"format_version": S.FORMAT_VERSION, "store_dtype": "float16", "text_encoders": te,
           "autoencoder": {"latent_channels": 16, "downsample": 8, "scaling_factor": 1.5305, "shift_factor": 0.0609},
           "context": {"clip_length": 77, "t5_length": 77, "length": 154, "width": 4096, "pooled_width": 2048},
           "prompts": {"empty": "", "validation": []}}
    record = S.write_record(folder, doc, {})
    rng = np.random.default_rng(0)
    shapes = {**{r: (77, w[r]) for r in w}, **{f"{r}_pooled": (w[r],) for r in ("clip_l", "clip_g")}}
    urls, buf = [], []
    for i in range(n):
        enc = {v: {k: rng.standard_normal(s).astype(np.float16) for k, s in shapes.items()} for v in S.VARIANTS}
        lat = rng.standard_normal((16, 32, 32)).astype(np.float16)
        meta = {"source": "-", "width": 256, "height": 256, "crop": [0, 0, 256, 256], "resolution": [256, 256],
                "caption": {"orig": "a", "syn": "b"}}
        buf.append(S.encode_sample(f"{i:09d}", lat, lat * 0 - 2, enc, meta, record.hash))
        if len(buf) == shard_size or i == n - 1:
            path = folder / "shards" / S.shard_name("train", len(urls))
            write_atomic(path, S.tar_bytes(buf))
            urls.append(str(path))
            buf = []
    return urls, record


def loader_rate(n: int, batch: int, workers: int, batches: int) -> dict:
    from flowcurate.trainer.data import CuratedShards, loader

    with tempfile.TemporaryDirectory() as tmp:
        urls, record = synthetic_shards(Path(tmp), n)
        ds = CuratedShards(urls, record, batch, seed=0, shuffle_buffer=64, num_workers=workers)
        it = iter(loader(ds, workers))
        next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        dt = time.perf_counter() - t0
    return {"samples_per_s": batches * batch / dt, "workers": workers, "batch": batch}


def formula_flops(cfg: MMDiTConfig, batch: int, latent: int, tokens: int) -> float:
    """FLOPs of one training step (forward + backward = 3 x forward) by formula, for the MM-DiT:
    6 x W x T for the weights each token goes through plus 12 x depth x T^2 x hidden for the joint
    attention (QK^T and AV: 2 x 2 T^2 hidden forward, x 3), per sample. W counts the token-wise weights
    of one stream of one block, (4 + 2 mlp_ratio) hidden^2 (q, k, v, out and the MLP); each token goes
    through its own stream's, so W is not halved and not doubled. Left out: the per-sample adaLN
    modulation (half the block parameters, applied once per sample, not per token), the embedders,
    norms and the final layer, and that the last block's context stream is pre-only: all small at
    SD3 sizes. T = (latent / patch)^2 image tokens + text tokens. On a CPU (depth 2, batch 2, 410 tokens)
    the counter gave 2.36 GFLOP against the formula's 2.97, the gap about the formula's attention term:
    the counter seems not to count the CPU attention kernel; compare the two on the GPU."""
    h = cfg.hidden_size
    t = (latent // cfg.patch_size) ** 2 + tokens
    weights = cfg.depth * (4 + 2 * cfg.mlp_ratio) * h * h
    return batch * (6 * weights * t + 12 * cfg.depth * t * t * h)


def mfu(depth: int, batch: int, latent: int, tokens: int, device: str, repeats: int, compile: bool = False,
        peak_tflops: float | None = None) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    cfg = config(depth, latent)
    model = MMDiT(cfg).to(device)
    x, t, c, p, v = inputs(cfg, batch, latent, tokens, device)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
    step = make_step(lambda: model(x, t, c, p), model.parameters(), v, autocast)
    with FlopCounterMode(display=False) as counter:  # FLOPs of the eager step (what compiling runs too)
        step()
    flops = counter.get_total_flops()
    if compile:
        fast = torch.compile(model)
        step = make_step(lambda: fast(x, t, c, p), model.parameters(), v, autocast)
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    warmup_s = time.perf_counter() - t0
    times = [timed(step, device) for _ in range(repeats)]
    dt = statistics.median(times)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    peak = peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    achieved = flops / dt / 1e12
    return {"depth": depth, "batch": batch, "latent": latent, "tokens": tokens, "compile": compile,
            "warmup_s": warmup_s, "step_ms": dt * 1e3,
            "tflop_per_step": flops / 1e12, "formula_tflop_per_step": formula_flops(cfg, batch, latent, tokens) / 1e12,
            "achieved_tflops": achieved, "peak_tflops": peak,
            "mfu": achieved / peak if peak else None, "params_M": sum(q.numel() for q in model.parameters()) / 1e6,
            "gpu": name, "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--text-tokens", type=int, nargs="+", default=[77, 154])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--loader-samples", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--skip-loader", action="store_true")
    ap.add_argument("--mfu", action="store_true", help="GPU: MFU of one training step in bf16")
    ap.add_argument("--depth", type=int, default=24, help="depth for --mfu")
    ap.add_argument("--peak-tflops", type=float,
                    help="--mfu: the GPU's dense bf16 peak in TFLOP/s (default: by the GPU's name, e.g. 989.4 "
                         "for H100 / H200 SXM; none for an unknown GPU)")
    ap.add_argument("--compile", action="store_true", help="time torch.compile(our model) (diffusers stays eager)")
    ap.add_argument("--json", help="write all results to this file")
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    results: dict = {"machine": machine()}
    if args.mfu:
        r = mfu(args.depth, args.batch, args.latent, args.text_tokens[-1], args.device, args.repeats, args.compile,
                args.peak_tflops)
        results["mfu"] = r
        print(json.dumps(r, indent=2))
    else:
        rows = []
        print("| depth | hidden | text tokens | params | ours ms | diffusers ms | ours / diffusers | max |diff| |")
        print("|---|---|---|---|---|---|---|---|")
        for d in args.depths:
            for tok in args.text_tokens:
                r = step_ratio(d, tok, args.batch, args.latent, args.repeats, args.device, args.compile)
                rows.append(r)
                print(f"| {d} | {r['hidden']} | {tok} | {r['params_M']:.1f}M | {r['ours_ms']:.0f} | "
                      f"{r['diffusers_ms']:.0f} | {r['ratio']:.2f} | {r['max_abs_diff']:.1e} |", flush=True)
        results["steps"] = rows
        if not args.skip_loader:
            consumption = max(r["batch"] / (r["ours_ms"] / 1e3) for r in rows)
            print(f"\nfastest step consumes {consumption:.1f} samples/s (batch {args.batch})")
            print("| loader workers | samples/s | / step consumption |")
            print("|---|---|---|")
            results["loader"] = []
            for w in args.workers:
                lr = loader_rate(args.loader_samples, args.batch, w, batches=args.loader_samples // args.batch * 2)
                lr["ratio_to_step"] = lr["samples_per_s"] / consumption
                results["loader"].append(lr)
                print(f"| {w} | {lr['samples_per_s']:.0f} | {lr['ratio_to_step']:.1f}x |", flush=True)
    results["peak_rss_mb"] = peak_rss_mb()
    print(f"peak RSS {results['peak_rss_mb']:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
