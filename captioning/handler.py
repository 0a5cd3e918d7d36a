"""`CaptionModelHandler`: the captioner as a Beam `ModelHandler` for `RunInference`.

Each element is a *chunk*: a sequence of (image (H, W, 3) uint8, original caption or None) pairs that
the pipeline formed deterministically (by key); each chunk is captioned on its own and comes back as
one `list[Caption]` in the chunk's order. Pair chunks with their keys through Beam's
`KeyedModelHandler(CaptionModelHandler(...))`: elements (key, chunk) -> (key, list[Caption]).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from flowcurate.captioning.captioner import CAPTION_FALLBACK, DEFAULT_PROMPT, Caption, Captioner

Chunk = Sequence[tuple[np.ndarray, str | None]]
NAMESPACE = "flowcurate_captioning"


class CaptionModelHandler(ModelHandler[Chunk, list[Caption], Captioner]):
    def __init__(self, location: str, *, revision: str | None = None, prompt: str = DEFAULT_PROMPT,
                 max_new_tokens: int = 77, batch_size: int = 8, trust_remote_code: bool = False,
                 device: str = "cpu", dtype: str | None = None, share_model: bool = False):
        """Options as `Captioner.load` (stored; the model loads in `load_model`, on the worker).

        share_model: one copy of the model per machine, shared by the SDK worker processes (Beam's
        multi_process_shared), instead of one per process: for VLMs too big to hold several times.
        """
        super().__init__(large_model=share_model)  # Beam's share_model_across_processes() follows it
        self._location = location
        self._options = dict(revision=revision, prompt=prompt, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, trust_remote_code=trust_remote_code, device=device,
                             dtype=dtype)

    def load_model(self) -> Captioner:
        from flowcurate.models.text_encoders import quiet_hf_logging

        quiet_hf_logging()
        return Captioner.load(self._location, **self._options)

    def run_inference(self, batch: Sequence[Chunk], model: Captioner,
                      inference_args: dict[str, Any] | None = None) -> Iterable[list[Caption]]:
        fallbacks = Metrics.counter(NAMESPACE, CAPTION_FALLBACK)
        for chunk in batch:
            captions = model.caption([image for image, _ in chunk], [original for _, original in chunk])
            fallbacks.inc(sum(CAPTION_FALLBACK in c.notes for c in captions))
            yield captions

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        # One chunk per call. A chunk already is a full, deterministically formed batch of images;
        # BatchElements groups elements by timing, and merging chunks would change which images share
        # a generate() call (and so float results). run_inference captions each element on its own
        # anyway, so this only keeps chunks from waiting on each other.
        return {"max_batch_size": 1}

    def get_num_bytes(self, batch: Sequence[Chunk]) -> int:
        return sum(np.asarray(image).nbytes + len((original or "").encode()) for chunk in batch
                   for image, original in chunk)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE
