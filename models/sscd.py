"""SSCD copy-detection descriptors (Pizzi et al. 2022), as the released TorchScript models compute them.

    model = load_sscd("sscd_disc_mixup")            # a release name, a URL or a local .torchscript.pt
    pre = SSCDPreprocess()                            # EXIF-corrected RGB -> 320x320, ImageNet mean/std
    emb = embed(model, torch.stack([pre(img) ...]))   # (B, 512) float32, L2-normalised

Preprocessing follows the SSCD README's recommendation for copy detection: resize the whole image to
a square (320x320) rather than keeping the aspect ratio, so batches stack; ImageNet mean/std. It is
configurable and `record()` writes it into outputs, since descriptors from different preprocessing
are not comparable. Loading TorchScript runs code from the file: only load files you trust.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flowcurate.formats.files import cache_root, write_atomic

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RELEASE_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/{name}.torchscript.pt"
# name -> descriptor width (sscd_disc_mixup is the recommended default; disc_large is more accurate)
RELEASES = {
    "sscd_disc_blur": 512, "sscd_disc_advanced": 512, "sscd_disc_mixup": 512, "sscd_disc_large": 1024,
    "sscd_imagenet_blur": 512, "sscd_imagenet_advanced": 512, "sscd_imagenet_mixup": 512,
}


@dataclass(frozen=True)
class SSCDPreprocess:
    """RGB PIL image -> (3, size, size) float32 tensor: square resize, [0, 1], ImageNet normalisation."""

    size: int = 320
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.resize(img))

    def resize(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> (size, size, 3) uint8: the first half of `__call__`, so a pipeline can resize
        where it decodes and ship the small array to the model (`normalize`) with identical results."""
        if img.mode != "RGB":
            raise ValueError(f"expected an RGB image (decode with flowcurate.formats.images.decode_image), got {img.mode}")
        # BILINEAR with PIL's antialiasing, as torchvision's Resize does on PIL images
        return np.asarray(img.resize((self.size, self.size), Image.Resampling.BILINEAR), dtype=np.uint8)

    def normalize(self, pixels: np.ndarray) -> torch.Tensor:
        """(size, size, 3) uint8 from `resize` -> (3, size, size) float32, ImageNet-normalised."""
        x = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std

    def record(self) -> dict:
        return {"resize": "square", "interpolation": "bilinear", **asdict(self)}


def resolve_sscd(location: str | os.PathLike) -> Path:
    """A local path for `location`: an existing file, a release name, or an http(s) URL (downloaded
    once into `$FLOWCURATE_CACHE/sscd/`, atomically)."""
    location = str(location)
    if Path(location).expanduser().is_file():
        return Path(location).expanduser()
    if location in RELEASES:
        location = RELEASE_URL.format(name=location)
    if not location.startswith(("http://", "https://")):
        raise FileNotFoundError(f"SSCD model {location!r}: no such file, and not a URL or a release name "
                                f"({', '.join(sorted(RELEASES))})")
    name = location.rstrip("/").rsplit("/", 1)[-1] or "sscd.torchscript.pt"
    digest = hashlib.sha256(location.encode()).hexdigest()[:12]
    target = cache_root() / "sscd" / f"{digest}-{name}"
    if target.is_file():
        return target
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("FLOWCURATE_OFFLINE") == "1":
        raise FileNotFoundError(f"SSCD model {location} is not cached at {target} and downloads are off "
                                "(HF_HUB_OFFLINE/FLOWCURATE_OFFLINE=1)")
    def download(tmp: str) -> None:
        with open(tmp, "wb") as out, urllib.request.urlopen(location, timeout=60) as resp:
            shutil.copyfileobj(resp, out)

    write_atomic(target, download)
    return target


def load_sscd(location: str | os.PathLike, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load an SSCD TorchScript model (path, URL or release name) in eval mode on `device`."""
    model = torch.jit.load(str(resolve_sscd(location)), map_location=device)
    return model.eval()


@torch.inference_mode()
def embed(model: torch.nn.Module, batch: torch.Tensor, device: str | torch.device = "cpu",
          dtype: torch.dtype = torch.float32) -> np.ndarray:
    """`batch (B, 3, S, S)` preprocessed -> `(B, D)` float32 descriptors, re-normalised in float32
    (a float16/bfloat16 forward pass leaves norms slightly off 1)."""
    x = batch.to(device=device)
    if dtype == torch.float32:
        out = model(x)
    else:  # reduced precision through autocast, so the model's weights stay as loaded
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
            out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return F.normalize(out.float(), dim=-1).cpu().numpy()
