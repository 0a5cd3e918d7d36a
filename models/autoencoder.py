"""The SD3 autoencoder: images -> posterior (mean, logvar) for the shards, model-space latents -> images.

Loaded with `diffusers.AutoencoderKL` from the `vae` subfolder of an SD3 folder or hub id (the tiny one
has the same layout). Shards store the *unscaled* posterior; the trainer samples
`z = mean + exp(logvar / 2) * eps` and feeds the MM-DiT `(z - shift_factor) * scaling_factor`
(SD3: 16 channels, scaling 1.5305, shift 0.0609, read from the VAE's config).
"""

from __future__ import annotations

import numpy as np
import torch


def to_model_space(z: torch.Tensor, scaling_factor: float, shift_factor: float) -> torch.Tensor:
    return (z - shift_factor) * scaling_factor


def from_model_space(x: torch.Tensor, scaling_factor: float, shift_factor: float) -> torch.Tensor:
    return x / scaling_factor + shift_factor


class Autoencoder:
    def __init__(self, vae, device: str = "cpu"):
        self.vae = vae.to(device).eval()
        self.device = device
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @classmethod
    def load(cls, source: str, *, revision: str | None = None, subfolder: str = "vae", dtype: str = "float32",
             device: str = "cpu") -> Autoencoder:
        from diffusers import AutoencoderKL

        from flowcurate.models.text_encoders import torch_dtype

        vae = AutoencoderKL.from_pretrained(source, subfolder=subfolder, revision=revision,
                                            torch_dtype=torch_dtype(dtype))
        return cls(vae, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @torch.no_grad()
    def encode(self, images: np.ndarray | list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (B, H, W, 3) of one size, H and W multiples of the downsampling factor ->
        posterior mean and logvar, float32 (B, C, H/8, W/8)."""
        x = torch.from_numpy(np.ascontiguousarray(np.stack(images))).to(self.device)
        x = x.permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0
        dist = self.vae.encode(x).latent_dist
        return dist.mean.float().cpu().numpy(), dist.logvar.float().cpu().numpy()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Model-space latents (B, C, h, w) -> uint8 images (B, 8h, 8w, 3)."""
        z = from_model_space(latents.to(self.device, self.dtype), self.scaling_factor, self.shift_factor)
        x = self.vae.decode(z).sample.float().clamp(-1, 1)
        return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
