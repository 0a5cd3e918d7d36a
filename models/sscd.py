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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import urlopen

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


# sha256 of the released files, checked after every download (independently recorded by several
# projects; a file whose digest is not known here can be pinned with `[models] sscd_sha256`)
RELEASE_SHA256 = {"sscd_disc_mixup": "9f26bd4c848cc19b73d2ae92eea6e04886f61a7b764ceb7a13aeee62e6a6db56"}
DOWNLOAD_ATTEMPTS = 4  # with exponential backoff: 1, 2, 4 s between attempts
OFFLINE_HINT = "pass --config tiny for the offline tiny models"


class DownloadError(OSError):
    """A download failed for good, or its bytes do not have the expected digest (nothing was kept)."""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("FLOWCURATE_OFFLINE") == "1"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def release_source(location: str) -> tuple[str, str | None]:
    """A release name or URL -> (URL, the release's pinned digest or None)."""
    name = location if location in RELEASES else None
    url = RELEASE_URL.format(name=location) if name else location
    if name is None and url.startswith(RELEASE_URL.split("{", 1)[0]):
        name = url.rsplit("/", 1)[-1].removesuffix(".torchscript.pt")
    return url, RELEASE_SHA256.get(name or "")


def cached_path(url: str) -> Path:
    name = url.rstrip("/").rsplit("/", 1)[-1] or "sscd.torchscript.pt"
    return cache_root() / "sscd" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"


def verified(path: Path, expected: str | None) -> bool:
    """Whether a cached file has the expected digest (computed once, then remembered beside it)."""
    if expected is None:
        return True
    mark = path.with_name(path.name + ".sha256")
    if mark.is_file() and mark.read_text().strip() == expected:
        return True
    if file_sha256(path) != expected:
        return False
    write_atomic(mark, expected.encode())
    return True


def _download(url: str, expected: str | None, tmp: str) -> None:
    """Stream `url` into `tmp` with retries; refuse bytes whose sha256 is not `expected`."""
    for attempt in range(DOWNLOAD_ATTEMPTS):
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as out, urlopen(url, timeout=60) as resp:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
            break
        except HTTPError as e:
            if e.code < 500 or attempt == DOWNLOAD_ATTEMPTS - 1:  # 4xx: asking again will not help
                raise DownloadError(f"SSCD model {url}: HTTP {e.code} {e.reason}") from None
        except (URLError, OSError) as e:
            if attempt == DOWNLOAD_ATTEMPTS - 1:
                raise DownloadError(f"SSCD model {url}: {e} (after {DOWNLOAD_ATTEMPTS} attempts)") from None
        time.sleep(2 ** attempt)
    got = digest.hexdigest()
    if expected is not None and got != expected:
        raise DownloadError(f"SSCD model {url}: downloaded sha256 {got} does not match the expected {expected}; "
                            "the file was not kept")


def resolve_sscd(location: str | os.PathLike, sha256: str | None = None) -> Path:
    """A local path for `location`: an existing file, a release name, or an http(s) URL (downloaded
    once into `$FLOWCURATE_CACHE/sscd/`, with retries, checked against `sha256` or the release's pinned
    digest, and moved into the cache only when whole and matching). A cached file that does not match
    is downloaded again. Loading TorchScript runs code from the file: this is why the digest matters."""
    location = str(location)
    local = Path(location).expanduser()
    if local.is_file():
        if sha256 is not None and file_sha256(local) != sha256:
            raise DownloadError(f"SSCD model {local}: sha256 {file_sha256(local)} is not the expected {sha256}")
        return local
    url, pinned = release_source(location)
    if not url.startswith(("http://", "https://")):
        raise FileNotFoundError(f"SSCD model {location!r}: no such file, and not a URL or a release name "
                                f"({', '.join(sorted(RELEASES))})")
    expected = sha256 or pinned
    target = cached_path(url)
    if target.is_file():
        if verified(target, expected):
            return target
        target.unlink()  # a corrupt or substituted cache entry: never served
    if offline():
        raise FileNotFoundError(f"SSCD model {url} is not cached at {target} and downloads are off "
                                f"(HF_HUB_OFFLINE/FLOWCURATE_OFFLINE=1): {OFFLINE_HINT}")
    write_atomic(target, lambda tmp: _download(url, expected, tmp))
    if expected is not None:
        write_atomic(target.with_name(target.name + ".sha256"), expected.encode())
    return target


def load_sscd(location: str | os.PathLike, device: str | torch.device = "cpu",
              sha256: str | None = None) -> torch.jit.ScriptModule:
    """Load an SSCD TorchScript model (path, URL or release name) in eval mode on `device`."""
    model = torch.jit.load(str(resolve_sscd(location, sha256)), map_location=device)
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
