"""Image-path throughput of `flowcurate dedup`: decode + preprocess + embed, against the bare model.

    OPENBLAS_NUM_THREADS=1 python benchmarks/sscd_throughput_bench.py --n 256 --workers 0 1 2
    python benchmarks/sscd_throughput_bench.py --device cuda --n 4096 --batch 128 --workers 8 --dtype bf16

The model is the real SSCD architecture at real size with random weights (ResNet-50 trunk, GeM
pooling p=3, 2048 -> 512 projection, L2 normalisation; `sscd_disc_mixup` has this shape), saved as
TorchScript and loaded with `flowcurate.models.sscd.load_sscd`, like the released file. Tiny models would measure
only overhead.

- bare: the same images, decoded and preprocessed beforehand, fed batch by batch to `flowcurate.models.sscd.embed`;
- ours: `flowcurate.dedup.inputs.embed_images` over JPEG files listed by `flowcurate.dedup.inputs.list_images`, with
  DataLoader workers decoding (EXIF transpose, RGB) and resizing to 320x320 in parallel.
Prints images/s of each and ours / bare (target >= 0.85).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from common import machine  # benchmarks/ is on sys.path when run as a script


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, width, 1), nn.ReLU(), conv_bn(width, width, 3, stride), nn.ReLU(),
                                  conv_bn(width, width * 4, 1))
        self.down = conv_bn(cin, width * 4, 1, stride) if stride != 1 or cin != width * 4 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.down(x))


class SSCDResNet50(nn.Module):
    """ResNet-50 trunk + GeM + linear 512 + L2 norm: the shape of SSCD's disc_mixup descriptor model."""

    def __init__(self, dim: int = 512):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
        self.trunk = nn.Sequential(*layers)
        self.proj = nn.Linear(2048, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk(self.stem(x))
        x = x.clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1.0 / 3.0)  # GeM, p = 3
        return F.normalize(self.proj(x), dim=-1)


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    from flowcurate.models.tiny import procedural

    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (int(v) for v in rng.integers(384, 769, 2))
        img, _ = procedural.random_image(rng, w, h)
        (folder / f"{i:06d}.jpg").write_bytes(procedural.jpeg_bytes(img, 90))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="images (JPEG, 384-768 px sides)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    args = ap.parse_args(argv)
    from flowcurate.dedup.inputs import embed_images, expand, list_images
    from flowcurate.formats.images import decode_image
    from flowcurate.models.sscd import SSCDPreprocess, embed, load_sscd

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        torch.jit.script(SSCDResNet50().eval()).save(str(tmp / "sscd_r50.torchscript.pt"))
        model = load_sscd(tmp / "sscd_r50.torchscript.pt", device=args.device)
        (tmp / "img").mkdir()
        write_images(tmp / "img", args.n)
        listing = list_images(expand([str(tmp / "img" / "*.jpg")]))
        pre = SSCDPreprocess()
        batches = []
        for s in range(0, args.n, args.batch):
            imgs = [decode_image(Path(it.path).read_bytes()).image for it in listing.items[s:s + args.batch]]
            batches.append(torch.stack([pre(im) for im in imgs]))
        for b in {len(b): b for b in batches}.values():  # warm-up: every batch shape once
            embed(model, b, args.device, dtype)

        def run_bare() -> tuple[np.ndarray, float]:
            t0 = time.perf_counter()
            out = np.concatenate([embed(model, b, args.device, dtype) for b in batches])
            return out, time.perf_counter() - t0

        bare, t_bare = run_bare()
        print(f"bare model: {args.n / t_bare:.2f} images/s ({t_bare:.1f} s, batch {args.batch}, {args.dtype})")
        print("| workers | ours images/s | ours / bare | max |diff| vs bare |")
        print("|---|---|---|---|")
        for w in args.workers:
            t0 = time.perf_counter()
            got = embed_images(listing, model, pre, batch_size=args.batch, workers=w, device=args.device, dtype=dtype)
            dt = time.perf_counter() - t0
            diff = float(np.abs(got.embeddings - bare).max())
            print(f"| {w} | {args.n / dt:.2f} | {t_bare / dt:.2f} | {diff:.1e} |", flush=True)
        _, t_again = run_bare()
        print(f"bare model again (drift check): {args.n / t_again:.2f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
