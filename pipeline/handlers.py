"""The models of the two passes as Beam `ModelHandler`s, and `ModelSlot`, which holds one inside a pass.

Each handler is Beam's interface (`load_model` on the worker, `run_inference` over a batch of
elements), so it also works in `RunInference`. In the passes an element is one *chunk*: a list of
inputs formed inside one file, run as one model batch, so results depend only on the chunk (never on
how a runner groups elements):

    SSCDModelHandler     [(S, S, 3) uint8]                   -> (n, D) float32 descriptors
    ScoreModelHandler    [(H, W, 3) uint8]                   -> [score]          (pipeline/filters.py)
    CaptionModelHandler  [((H, W, 3) uint8, original|None)]  -> [Caption]        (captioning/handler.py)
    EncodeModelHandler   [EncodeInput]                       -> [Encoded]

`ModelSlot` loads a handler's model once per worker process and shares it between the pass's DoFn
instances (Beam's `Shared`, as RunInference does), or once per machine across processes when the
handler asks for it (`share_model`: Beam's multi_process_shared, for 7B VLMs and T5-XXL).
"""

from __future__ import annotations

import hashlib
import pickle
from collections import defaultdict
from typing import NamedTuple

import numpy as np
from apache_beam.ml.inference.base import ModelHandler
from apache_beam.utils import multi_process_shared, shared

from flowcurate.formats.shards import PARTS, VARIANTS


class ModelSlot:
    """One handler's model inside a DoFn: `load()` in `setup`, then `run(chunk)` per chunk."""

    def __init__(self, handler: ModelHandler):
        self.handler = handler
        # one model per distinct handler configuration (the same tag in every DoFn instance)
        self.tag = f"{type(handler).__name__}:{hashlib.sha256(pickle.dumps(handler)).hexdigest()[:16]}"
        self._shared = shared.Shared()
        self.model = None

    def load(self):
        if self.handler.share_model_across_processes():
            self.model = multi_process_shared.MultiProcessShared(
                self.handler.load_model, tag=self.tag, always_proxy=True).acquire()
        else:
            self.model = self._shared.acquire(self.handler.load_model, tag=self.tag)
        return self.model

    def run(self, chunk: list):
        return next(iter(self.handler.run_inference([chunk], self.model)))


class SSCDModelHandler(ModelHandler):
    """Elements: lists of (S, S, 3) uint8 arrays (`SSCDPreprocess.resize`) -> (n, D) float32, L2-normalised.

    location: an SSCD TorchScript path (resolved by the launcher)."""

    def __init__(self, location: str, preprocess, device: str = "auto", sha256: str | None = None):
        super().__init__()
        self.location, self.preprocess, self.device, self.sha256 = str(location), preprocess, device, sha256

    def load_model(self):
        from flowcurate.formats.devices import worker_device
        from flowcurate.models.sscd import load_sscd

        self.device = worker_device(self.device)  # on the worker: "auto" means its own GPU, if any
        return load_sscd(self.location, self.device, self.sha256)

    def run_inference(self, batch, model, inference_args=None):
        import torch

        from flowcurate.models.sscd import embed

        for pixels in batch:
            x = torch.stack([self.preprocess.normalize(p) for p in pixels])
            with torch.inference_mode():
                yield embed(model, x, self.device)

    def get_metrics_namespace(self) -> str:
        return "flowcurate_sscd"


class EncodeInput(NamedTuple):
    image: np.ndarray  # (H, W, 3) uint8 at the training resolution
    orig: str  # the caption variants the shards store
    syn: str
    source: np.ndarray | None = None  # edit triplets: the source image, same size as `image`


class Encoded(NamedTuple):
    latent_mean: np.ndarray  # (C, H/8, W/8) float32
    latent_logvar: np.ndarray
    encodings: dict  # variant -> part -> array without the batch axis, float32
    truncated: bool  # a caption lost tokens to CLIP's 77-token limit
    source_mean: np.ndarray | None = None  # edit triplets: the source image's posterior
    source_logvar: np.ndarray | None = None


class Models:
    """What `EncodeModelHandler.load_model` returns (Beam's Shared needs an object it can weak-reference)."""

    def __init__(self, ae, te):
        self.ae, self.te = ae, te


class EncodeModelHandler(ModelHandler):
    """Elements: lists of `EncodeInput` -> lists of `Encoded`, in order: the autoencoder posterior and
    the three SD3 text encodings of both caption variants (`Autoencoder`, `TextEncoders`: the code that
    equals diffusers' `latent_dist` and `encode_prompt`).

    location: a diffusers SD3 folder or hub id (resolved by the launcher); the AE comes from its `vae`
    subfolder, the encoders from `text_encoder*` / `tokenizer*`."""

    def __init__(self, location: str, *, revision: str | None = None, t5_length: int = 77,
                 ae_dtype: str = "float32", te_dtype: str = "float32", device: str = "auto",
                 share_model: bool = False):
        super().__init__(large_model=share_model)  # Beam then shares one copy per machine
        self.location, self.revision, self.t5_length = str(location), revision, t5_length
        self.ae_dtype, self.te_dtype, self.device = ae_dtype, te_dtype, device

    def load_model(self):
        from flowcurate.formats.devices import worker_device
        from flowcurate.models.autoencoder import Autoencoder
        from flowcurate.models.text_encoders import TextEncoders, quiet_hf_logging

        quiet_hf_logging()
        device = worker_device(self.device)
        ae = Autoencoder.load(self.location, revision=self.revision, dtype=self.ae_dtype, device=device)
        te = TextEncoders.load(self.location, revision=self.revision, t5_length=self.t5_length,
                               dtype=self.te_dtype, device=device)
        return Models(ae, te)

    def run_inference(self, batch, model, inference_args=None):
        import torch

        with torch.inference_mode():
            for inputs in batch:
                yield encode_chunk(model.ae, model.te, inputs)

    def get_metrics_namespace(self) -> str:
        return "flowcurate_encode"


def _posteriors(ae, images: list) -> tuple[list, list]:
    """AE posteriors (mean, logvar) of images (None entries skipped), grouped by resolution in order."""
    means: list = [None] * len(images)
    logvars: list = [None] * len(images)
    by_resolution = defaultdict(list)
    for i, x in enumerate(images):
        if x is not None:
            by_resolution[x.shape[:2]].append(i)
    for res in sorted(by_resolution):
        idx = by_resolution[res]
        m, lv = ae.encode([images[i] for i in idx])
        for j, i in enumerate(idx):
            means[i], logvars[i] = m[j], lv[j]
    return means, logvars


def encode_chunk(ae, te, inputs: list[EncodeInput]) -> list[Encoded]:
    """One chunk: images grouped by resolution (aspect buckets) in chunk order, captions in one batch;
    edit triplets' source images as their own batches after the edited ones."""
    means, logvars = _posteriors(ae, [x.image for x in inputs])
    src_means, src_logvars = _posteriors(ae, [x.source for x in inputs])
    enc = {}
    for v in VARIANTS:
        texts = [getattr(x, v) for x in inputs]
        # equal texts in an equal batch encode equally: without a captioner, syn repeats orig
        same = next((enc[u] for u in enc if texts == [getattr(x, u) for x in inputs]), None)
        enc[v] = same if same is not None else te.encode(texts)
    truncated = enc["orig"]["truncated"] | enc["syn"]["truncated"]
    return [Encoded(means[i], logvars[i], {v: {p: enc[v][p][i] for p in PARTS} for v in VARIANTS},
                    bool(truncated[i]), src_means[i], src_logvars[i])
            for i in range(len(inputs))]
