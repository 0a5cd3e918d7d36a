"""Model-based filters: CLIP image embedding -> a small head -> a score, as SD3 filtered its data
(aesthetic and NSFW scores, SD3 paper section 5.1) with LAION's predictors on user-supplied weights.

    [pipeline] filters = [{name = "aesthetic", clip = "openai/clip-vit-large-patch14",
                           head = "sac+logos+ava1-l14-linearMSE.pth", min = 5.0}]

Filters run in pass 1 (`flowcurate.pipeline.pass1`), in order, on the chunk's training views, before
any dedup: a filtered input never enters dedup, so every `duplicate_of` names a kept key. A rejected
input's row reads `filtered:<name>`; a chunk whose scoring raised reads `failed:filter:<name>`. Size
and aspect are not here: validation rejects them (`too_small`, `bad_aspect`).

The head is LAION's shape (https://github.com/christophschuhmann/improved-aesthetic-predictor):
Linear layers applied in order on the L2-normalised CLIP image embedding, no activations (its Dropouts
are the identity at inference); a single Linear (`weight`, `bias`) is a linear probe.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import NamedTuple

from apache_beam.ml.inference.base import ModelHandler

METRICS_NAMESPACE = "flowcurate_filters"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class Filter(NamedTuple):
    name: str  # the reason suffix: rejected rows read f"filtered:{name}"
    clip: str  # a CLIPModel / CLIPVisionModelWithProjection folder or hub id (+ its image processor)
    head: str  # head weights: .safetensors, or a .pt/.pth state dict
    min: float | None = None  # reject scores below
    max: float | None = None  # reject scores above (e.g. an NSFW score)
    device: str = "auto"  # "auto": the worker's GPU if it has one

    def rejects(self, score: float) -> bool:
        return ((self.min is not None and score < self.min) or (self.max is not None and score > self.max)
                or score != score)  # NaN never passes


def _natural(name: str):
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def load_head(path: str):
    """A state dict of Linear layers -> `torch.nn.Sequential` of them in layer-name order; sizes from the
    weights, so LAION's MLP (layers.0/2/4/6/7: 768->1024->128->64->16->1) and a single probe both load."""
    import torch

    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    weights = sorted((k for k, v in state.items() if k.endswith("weight") and v.ndim == 2), key=_natural)
    if not weights:
        raise ValueError(f"{path}: no Linear weights in the head state dict")
    layers, used = [], set()
    for k in weights:
        w, b = state[k], state.get(k[:-len("weight")] + "bias")
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            layer.weight.copy_(w)
            if b is not None:
                layer.bias.copy_(b)
        layers.append(layer)
        used.update({k, k[:-len("weight")] + "bias"})
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"{path}: not a stack of Linear layers (unexpected {unused[:5]})")
    for a, b in zip(layers, layers[1:]):
        if a.out_features != b.in_features:
            raise ValueError(f"{path}: layer sizes do not chain ({a.out_features} -> {b.in_features})")
    if layers[-1].out_features != 1:
        raise ValueError(f"{path}: the head must output one score, got {layers[-1].out_features}")
    return torch.nn.Sequential(*layers).float().eval()


class Scorer:
    """What `ScoreModelHandler.load_model` returns (Beam's `Shared` needs a weak-referenceable object).
    `error`: why loading failed; every chunk then raises it, so it becomes a dead letter rather than a
    crash of the whole run (RunInference loads in `setup`, outside the dead-letter handling)."""

    def __init__(self, processor=None, clip=None, head=None, error: Exception | None = None):
        self.processor, self.clip, self.head, self.error = processor, clip, head, error


class ScoreModelHandler(ModelHandler):
    """Elements: lists of (H, W, 3) uint8 training views -> lists of scores, in order.
    Score = head(normalise(CLIP image_embeds(image))). Weights load on the worker, in `load_model`."""

    def __init__(self, clip_location: str, head_path: str, device: str = "auto"):
        super().__init__()
        self.clip_location, self.head_path, self.device = str(clip_location), str(head_path), device

    def load_model(self):
        from flowcurate.formats.devices import worker_device

        self.device = worker_device(self.device)  # on the worker: "auto" means its own GPU, if any
        try:
            return self._load()
        except Exception as e:  # noqa: BLE001  (reported per chunk, as failed:filter:<name> rows)
            logging.getLogger(__name__).error("filter model %s + %s failed to load: %r", self.clip_location,
                                              self.head_path, e)
            return Scorer(error=e)

    def _load(self) -> Scorer:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        head = load_head(self.head_path).to(self.device)
        processor = CLIPImageProcessor.from_pretrained(self.clip_location)  # the PIL one without torchvision
        clip = CLIPVisionModelWithProjection.from_pretrained(self.clip_location).float().eval().to(self.device)
        if head[0].in_features != clip.config.projection_dim:
            raise ValueError(f"{self.head_path}: head takes {head[0].in_features} features, "
                             f"{self.clip_location} embeds {clip.config.projection_dim}")
        return Scorer(processor, clip, head)

    def run_inference(self, batch: Sequence[list], model, inference_args=None):
        import torch

        if model.error is not None:
            raise RuntimeError(f"filter model did not load: {model.error!r}") from model.error
        processor, clip, head = model.processor, model.clip, model.head
        for images in batch:
            pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                emb = clip(pixel_values=pixels.to(self.device)).image_embeds.float()
                emb = emb / emb.norm(dim=-1, keepdim=True)  # as LAION's predictors were trained
                yield [float(s) for s in head(emb)[:, 0].cpu().tolist()]

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE


def check_filters(filters: Sequence) -> list[Filter]:
    """The `[pipeline] filters` tables as `Filter`s, checked (names usable in a reason, unique; a bound each)."""
    out = [f if isinstance(f, Filter) else Filter(**f) for f in filters]
    names = [f.name for f in out]
    for f in out:
        if not _NAME.fullmatch(f.name or ""):
            raise ValueError(f"filter name {f.name!r}: use letters, digits, '_', '-', '.'")
        if f.min is None and f.max is None:
            raise ValueError(f"filter {f.name!r} has neither min nor max")
    if len(set(names)) != len(names):
        raise ValueError(f"filter names repeat: {names}")
    return out
