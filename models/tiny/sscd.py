"""A tiny stand-in for the released SSCD copy-detection models, fitted on procedural images.

Interface of `sscd_disc_mixup.torchscript.pt` (SSCD README): `model = torch.jit.load(path)`,
`emb = model(batch)` with `batch: (B, 3, H, W)` float, ImageNet-normalised (the pipeline feeds 320x320
squares, see `preprocess`), `emb: (B, 512)` float32, L2-normalised. The head is SSCD's
(`sscd/models/model.py`): backbone -> GeM pooling (p = 3) -> Linear -> L2 norm. The backbone is a
four-layer CNN that first average-pools any input to 64x64, so a 320x320 batch costs little on a CPU.

A random network cannot tell images apart (unrelated pairs score 0.96-1.00), so `build_sscd` trains it
for a fixed number of steps on views of procedural images (the original and `copy_variant` copies:
re-encode, resize, crop, colour jitter) with NT-Xent (SimCLR) plus a hinge that pushes unrelated pairs
under a cosine of 0.1, and measures on held-out images how well copies and unrelated pairs separate at
the thresholds dedup cares about. Training data goes through the pipeline's own preprocessing
(`flowcurate.models.sscd.SSCDPreprocess`), pregenerated at the 64x64 the network pools it to.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from flowcurate.models.sscd import IMAGENET_MEAN, IMAGENET_STD, SSCDPreprocess
from flowcurate.models.tiny.procedural import COPY_KINDS, copy_variant, jpeg_bytes, random_image

SSCD_SIZE = 320  # the pipeline's input: a 320x320 square (SSCD README's advice for copy detection)
EMBED_DIM = 512
POOLED = 64  # the network sees every input average-pooled to POOLED x POOLED (320 / 64 = 5: exact 5x5 boxes)

# Training recipe (fixed step counts: the build is a pure function of the seed).
STEPS = 400
BATCH = 64  # originals per step; each contributes two views, so NT-Xent sees 128 embeddings
POOL_ORIGINALS = 2000  # pregenerated originals, each with VIEWS views (itself + copies)
VIEWS = 3
TEMPERATURE = 0.1
LR = 3e-3
# NT-Xent stops caring about a negative long before its cosine drops under 0.3 (at temperature 0.1 a
# negative at 0.3 weighs e^-6 against the positive), so unrelated pairs get an explicit hinge as well.
NEG_MARGIN = 0.1
NEG_WEIGHT = 30.0
# Share of training views cropped (80-100 % of each side) and resized back, on the fly: without it crop
# copies are the ones that fall under 0.75.
CROP_AUG = 0.5
# Held-out evaluation: DISC's 90 %-precision point for copies, and the margin unrelated pairs must keep.
COPY_THRESHOLD = 0.75
UNRELATED_THRESHOLD = 0.3
EVAL_ORIGINALS = 200


def preprocess(images: Sequence[Image.Image], size: int = SSCD_SIZE) -> torch.Tensor:
    """The pipeline's SSCD preprocessing (`flowcurate.models.sscd.SSCDPreprocess`: square resize, ImageNet
    mean/std) of EXIF-corrected PIL images, stacked: `(B, 3, size, size)` float32."""
    pre = SSCDPreprocess(size=size)
    return torch.stack([pre(im.convert("RGB")) for im in images])


def _conv(c_in: int, c_out: int, kernel: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2 if stride < kernel else 0, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class TinySSCD(nn.Module):
    """x: (B, 3, H, W) ImageNet-normalised -> (B, 512) unit-norm descriptors."""

    def __init__(self, widths: tuple[int, ...] = (24, 48, 96, 192), dim: int = EMBED_DIM, p: float = 3.0,
                 pooled: int = POOLED):
        super().__init__()
        self.pooled = pooled
        self.p = p
        # 4x4 patchify stem (64 -> 16 px), then stride-2 convs (16 -> 8 -> 4 -> 2)
        layers = _conv(3, widths[0], 4, 4)
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += _conv(c_in, c_out, 3, 2)
        self.backbone = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1], dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, self.pooled)  # identity for pooled inputs; 5x5 boxes at 320x320
        x = self.backbone(x)
        # GeM pooling (SSCD gem_pooling.py): mean(clamp(x, eps)^p)^(1/p)
        x = x.clamp(min=1e-6).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)
        return F.normalize(self.fc(x), dim=1)


def _pooled_uint8(img: Image.Image) -> np.ndarray:
    """`img` as the network sees it after `preprocess` and its own 5x5 average pooling, as uint8
    `(64, 64, 3)` before normalisation: the same 320x320 bilinear resize, then PIL's box reduction
    (equal to the float path up to uint8 rounding, and ~5x cheaper)."""
    factor = SSCD_SIZE // POOLED
    return np.asarray(img.convert("RGB").resize((SSCD_SIZE, SSCD_SIZE), Image.Resampling.BILINEAR).reduce(factor))


def _reencode(img: Image.Image, rng: np.random.Generator, lo: int, hi: int) -> Image.Image:
    return Image.open(io.BytesIO(jpeg_bytes(img, int(rng.integers(lo, hi + 1))))).convert("RGB")


def _random_original(rng: np.random.Generator) -> Image.Image:
    """A procedural image of the sizes and aspect ratios sample data uses (64-200 px a side)."""
    w, h = (int(v) for v in rng.integers(64, 201, size=2))
    return random_image(rng, w, h)[0]


def _views(rng: np.random.Generator) -> np.ndarray:
    """One original and VIEWS-1 near-duplicates of it, pooled: uint8 `(VIEWS, 64, 64, 3)`.
    The original is sometimes JPEG-stored (as sample shards are); copies are one `copy_variant`, at
    times two stacked or followed by a re-encode, for margin over the single edits dedup must catch."""
    img = _random_original(rng)
    orig = _reencode(img, rng, 75, 95) if rng.random() < 0.5 else img
    out = [_pooled_uint8(orig)]
    for _ in range(VIEWS - 1):
        v = copy_variant(img, rng)
        r = rng.random()
        if r < 0.25:
            v = copy_variant(v, rng)
        elif r < 0.5:
            v = _reencode(v, rng, 40, 95)
        out.append(_pooled_uint8(v))
    return np.stack(out)


def _to_input(pooled: torch.Tensor) -> torch.Tensor:
    """uint8 `(B, 64, 64, 3)` -> ImageNet-normalised float `(B, 3, 64, 64)`."""
    x = pooled.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _random_crops(x: torch.Tensor, rng: np.random.Generator, share: float = CROP_AUG,
                  min_side: float = 0.8) -> torch.Tensor:
    """x: (B, C, H, W). A random `share` of the batch becomes a crop (min_side..1 of each side, anywhere
    inside the image) resized back to H x W; the rest passes unchanged."""
    n = x.shape[0]
    scale = torch.from_numpy(rng.uniform(min_side, 1.0, size=(n, 2))).float()
    scale[torch.from_numpy(rng.random(n) >= share)] = 1.0
    shift = (1 - scale) * torch.from_numpy(rng.uniform(-1.0, 1.0, size=(n, 2))).float()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale[:, 0], scale[:, 1], shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """SimCLR's NT-Xent: z1, z2: (B, D) unit-norm, row i of each a view of the same image."""
    z = torch.cat([z1, z2])
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


@torch.no_grad()
def separation(model: nn.Module, rng: np.random.Generator, n: int = EVAL_ORIGINALS) -> dict:
    """Held-out copy / unrelated separation through the real preprocessing path (320x320 float input).

    `n` originals, one `copy_variant` of each kind per original (`exact` excluded: it scores 1.0);
    copy pairs are (original, its copy), unrelated pairs all pairs of distinct originals."""
    kinds = [k for k in COPY_KINDS if k != "exact"]
    originals = [_random_original(rng) for _ in range(n)]
    copies = [copy_variant(img, rng, kind) for img in originals for kind in kinds]
    emb_o = torch.cat([model(preprocess(originals[i:i + 50])) for i in range(0, n, 50)])
    emb_c = torch.cat([model(preprocess(copies[i:i + 50])) for i in range(0, len(copies), 50)])
    copy_cos = (emb_o.repeat_interleave(len(kinds), 0) * emb_c).sum(1)
    unrelated = (emb_o @ emb_o.T)[torch.triu_indices(n, n, 1).unbind()]
    per_kind = copy_cos.view(n, len(kinds))
    return {
        "copy_pairs": len(copies),
        "unrelated_pairs": len(unrelated),
        "copy_above_0.75": round(float((copy_cos > COPY_THRESHOLD).float().mean()), 4),
        "unrelated_below_0.3": round(float((unrelated < UNRELATED_THRESHOLD).float().mean()), 4),
        "copy_above_0.75_by_kind": {k: round(float((per_kind[:, j] > COPY_THRESHOLD).float().mean()), 4)
                                    for j, k in enumerate(kinds)},
        "copy_cos_p5": round(float(copy_cos.quantile(0.05)), 3),
        "unrelated_cos_p95": round(float(unrelated.quantile(0.95)), 3),
        "unrelated_cos_max": round(float(unrelated.max()), 3),
    }


def train(seed: int, steps: int = STEPS, originals: int = POOL_ORIGINALS, log=None) -> TinySSCD:
    """Fit a TinySSCD on pregenerated pooled views; deterministic for (seed, steps, originals).
    Loss: NT-Xent over two views of each original + a squared hinge on negatives above NEG_MARGIN."""
    rng = np.random.default_rng([seed, 0])
    pool = torch.from_numpy(np.stack([_views(rng) for _ in range(originals)]))  # (N, VIEWS, 64, 64, 3) uint8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinySSCD()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    batch = min(BATCH, originals)
    for step in range(steps):
        idx = torch.from_numpy(rng.choice(originals, size=batch, replace=False))
        a = torch.from_numpy(rng.integers(0, VIEWS, size=batch))
        b = (a + torch.from_numpy(rng.integers(1, VIEWS, size=batch))) % VIEWS  # a different view
        x = _random_crops(_to_input(torch.cat([pool[idx, a], pool[idx, b]])), rng)
        z = model(x)
        owner = idx.repeat(2)
        negatives = (z @ z.T)[owner[:, None] != owner[None, :]]
        loss = nt_xent(z[:batch], z[batch:]) + NEG_WEIGHT * F.relu(negatives - NEG_MARGIN).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"[tiny-sscd] step {step} loss {loss.item():.3f}")
    return model.eval()


def build_sscd(out_path: Path, seed: int = 0, steps: int | None = None, originals: int | None = None,
               eval_originals: int = EVAL_ORIGINALS, log=None) -> dict:
    """Train, evaluate on held-out images and save as TorchScript at `out_path`; returns the report.
    `steps` / `originals` / `eval_originals` shrink the recipe for tests; the defaults are the cached
    build's."""
    t0, c0 = time.perf_counter(), time.process_time()
    model = train(seed, steps=STEPS if steps is None else steps,
                  originals=POOL_ORIGINALS if originals is None else originals, log=log)
    t_train = time.process_time() - c0
    report = separation(model, np.random.default_rng([seed, 1]), eval_originals)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13, but it is SSCD's release format
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(model), str(out_path))
    report.update({
        "steps": STEPS if steps is None else steps,
        "params": sum(p.numel() for p in model.parameters()),
        "bytes": out_path.stat().st_size,
        "train_cpu_seconds": round(t_train, 1),
        "cpu_seconds": round(time.process_time() - c0, 1),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    })
    return report
