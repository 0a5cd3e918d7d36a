"""Encoding stage: autoencoder posteriors and the three SD3 text encodings of both caption variants.

`EncodeModelHandler` is a RunInference handler over `flowcurate.pipeline.chunks.Chunk`s of `Captioned` items:
it loads `flowcurate.models.autoencoder.Autoencoder` and `flowcurate.models.text_encoders.TextEncoders` (the code that
equals `AutoencoderKL.encode(...).latent_dist` and `StableDiffusion3Pipeline.encode_prompt`) once per
worker, and encodes each chunk on its own (images grouped by resolution inside it, in key order), so
results depend only on the chunk, never on how Beam groups elements.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from flowcurate.formats.shards import PARTS, VARIANTS
from flowcurate.pipeline.stages import Accepted


class Kept(NamedTuple):
    """An image that survived dedup, on its way to captioning, encoding and its shard."""

    item: Accepted
    cluster: int | None
    shard: str  # e.g. "train-000003.tar"


class Captioned(NamedTuple):
    kept: Kept
    orig: str  # the original caption, or the synthetic one when there was none (note orig_caption_missing)
    syn: str
    notes: tuple[str, ...]


class Encoded(NamedTuple):
    captioned: Captioned
    latent_mean: np.ndarray  # (C, H/8, W/8) float32
    latent_logvar: np.ndarray
    encodings: dict  # variant -> part -> array without the batch axis, float32
    truncated: bool  # a caption lost tokens to CLIP's 77-token limit


class Models:
    """What `EncodeModelHandler.load_model` returns (Beam's Shared needs an object it can weak-reference)."""

    def __init__(self, ae, te):
        self.ae, self.te = ae, te


class EncodeModelHandler(ModelHandler):
    """Elements: Chunks of `Captioned`; each yields a list of `Encoded`, in chunk order.

    location: a diffusers SD3 folder or hub id (resolved by the launcher); the AE comes from its `vae`
    subfolder, the encoders from `text_encoder*` / `tokenizer*`."""

    def __init__(self, location: str, *, revision: str | None = None, t5_length: int = 77,
                 ae_dtype: str = "float32", te_dtype: str = "float32", device: str = "auto",
                 share_model: bool = False):
        super().__init__(large_model=share_model)  # Beam then shares one copy per machine
        self.location, self.revision, self.t5_length = str(location), revision, t5_length
        self.ae_dtype, self.te_dtype, self.device = ae_dtype, te_dtype, device

    def load_model(self):
        from flowcurate.formats.config import resolve_device
        from flowcurate.models.autoencoder import Autoencoder
        from flowcurate.models.text_encoders import TextEncoders, quiet_hf_logging

        quiet_hf_logging()
        device = resolve_device(self.device)
        ae = Autoencoder.load(self.location, revision=self.revision, dtype=self.ae_dtype, device=device)
        te = TextEncoders.load(self.location, revision=self.revision, t5_length=self.t5_length,
                               dtype=self.te_dtype, device=device)
        return Models(ae, te)

    def run_inference(self, batch, model, inference_args=None):
        import torch

        ae, te = model.ae, model.te
        out = []
        with torch.inference_mode():
            for chunk in batch:
                out.append(encode_chunk(ae, te, chunk.items))
        return out

    def batch_elements_kwargs(self):
        return {"max_batch_size": 1}  # a chunk is already the batch (flowcurate.pipeline.chunks)

    def get_metrics_namespace(self) -> str:
        return "flowcurate_encode"


def encode_chunk(ae, te, items: list[Captioned]) -> list[Encoded]:
    means: list = [None] * len(items)
    logvars: list = [None] * len(items)
    by_resolution = defaultdict(list)
    for i, c in enumerate(items):
        by_resolution[tuple(c.kept.item.resolution)].append(i)
    for res in sorted(by_resolution):
        idx = by_resolution[res]
        m, lv = ae.encode([items[i].kept.item.image for i in idx])
        for j, i in enumerate(idx):
            means[i], logvars[i] = m[j], lv[j]
    enc = {v: te.encode([getattr(c, v) for c in items]) for v in VARIANTS}
    truncated = enc["orig"]["truncated"] | enc["syn"]["truncated"]
    return [Encoded(c, means[i], logvars[i], {v: {p: enc[v][p][i] for p in PARTS} for v in VARIANTS},
                    bool(truncated[i]))
            for i, c in enumerate(items)]
