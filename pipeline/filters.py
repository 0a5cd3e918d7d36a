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
are the identity at inference); a single Linear (`weight`, `bias`) is a linear probe (`flowcurate
filters fit` trains one).

`kind = "clip_score"` is built in and needs no head: the cosine of a full CLIP's (text tower included)
image and caption embeddings. In pass 1 it scores the original caption and may filter (an input
without a caption is not scored and passes); in pass 2 it scores the synthetic caption and is only
recorded. Every score lands in the manifest, kept rows included (`score_<name>`, `score_<name>_syn`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import NamedTuple

from apache_beam.ml.inference.base import ModelHandler

from flowcurate.formats.manifest import score_column

METRICS_NAMESPACE = "flowcurate_filters"
CLIP_SCORE = "clip_score"
KINDS = ("head", CLIP_SCORE)
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class Filter(NamedTuple):
    name: str  # the reason suffix: rejected rows read f"filtered:{name}"
    clip: str  # a CLIPModel / CLIPVisionModelWithProjection folder or hub id (+ its image processor)
    head: str = ""  # head weights: .safetensors, or a .pt/.pth state dict ("" for clip_score)
    min: float | None = None  # reject scores below
    max: float | None = None  # reject scores above (e.g. an NSFW score)
    device: str = "auto"  # "auto": the worker's GPU if it has one
    kind: str = "head"  # "head": head(CLIP image embedding); "clip_score": image-caption cosine (full CLIP)

    def rejects(self, score: float | None) -> bool:
        if score is None:  # not scored (clip_score of an input without a caption): nothing to judge
            return False
        return ((self.min is not None and score < self.min) or (self.max is not None and score > self.max)
                or score != score)  # NaN never passes

    def handler(self) -> ModelHandler:
        return (ClipScoreModelHandler(self.clip, self.device) if self.kind == CLIP_SCORE
                else ScoreModelHandler(self.clip, self.head, self.device))


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


def load_image_clip(location: str, device: str = "cpu"):
    """(image processor, CLIPVisionModelWithProjection) of a CLIP folder or hub id (a full CLIPModel's
    folder too: its vision tower and projection load alone)."""
    from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

    from flowcurate.models.text_encoders import quiet_hf_logging

    quiet_hf_logging()  # a full CLIP's text tower is "unexpected" here: no load report for it
    processor = CLIPImageProcessor.from_pretrained(location)  # the PIL one without torchvision
    config = AutoConfig.from_pretrained(location)
    if config.model_type == "clip":  # a full CLIP: its vision config does not always carry the projection's width
        config = config.vision_config
        config.projection_dim = AutoConfig.from_pretrained(location).projection_dim
    clip = CLIPVisionModelWithProjection.from_pretrained(location, config=config)
    return processor, clip.float().eval().to(device)


def embed_images(processor, clip, images, device: str = "cpu"):
    """(H, W, 3) uint8 views -> (n, D) float32 L2-normalised CLIP image embeddings (on `device`): what
    every head scores, as LAION's predictors were trained, and what `flowcurate filters fit` fits on."""
    import torch

    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        emb = clip(pixel_values=pixels.to(device)).image_embeds.float()
        return emb / emb.norm(dim=-1, keepdim=True)


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
        head = load_head(self.head_path).to(self.device)
        processor, clip = load_image_clip(self.clip_location, self.device)
        if head[0].in_features != clip.config.projection_dim:
            raise ValueError(f"{self.head_path}: head takes {head[0].in_features} features, "
                             f"{self.clip_location} embeds {clip.config.projection_dim}")
        return Scorer(processor, clip, head)

    def run_inference(self, batch: Sequence[list], model, inference_args=None):
        import torch

        if model.error is not None:
            raise RuntimeError(f"filter model did not load: {model.error!r}") from model.error
        for images in batch:
            emb = embed_images(model.processor, model.clip, images, self.device)
            with torch.inference_mode():
                yield [float(s) for s in model.head(emb)[:, 0].cpu().tolist()]

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE


class ClipScoreModelHandler(ModelHandler):
    """Elements: lists of ((H, W, 3) uint8 view, caption or None) -> lists of cosines (None where there is
    no caption), in order: cos(CLIP image_embeds, CLIP text_embeds), the caption cut at CLIP's 77 tokens
    and padded to them (so a score does not depend on the other captions of its chunk)."""

    def __init__(self, clip_location: str, device: str = "auto"):
        super().__init__()
        self.clip_location, self.device = str(clip_location), device

    def load_model(self):
        from flowcurate.formats.devices import worker_device

        self.device = worker_device(self.device)
        try:
            from transformers import CLIPModel, CLIPProcessor

            processor = CLIPProcessor.from_pretrained(self.clip_location)
            clip = CLIPModel.from_pretrained(self.clip_location).float().eval().to(self.device)
            return Scorer(processor, clip)
        except Exception as e:  # noqa: BLE001  (reported per chunk, as failed:filter:<name> rows)
            logging.getLogger(__name__).error("clip_score model %s failed to load: %r", self.clip_location, e)
            return Scorer(error=e)

    def run_inference(self, batch: Sequence[list], model, inference_args=None):
        import torch

        if model.error is not None:
            raise RuntimeError(f"clip_score model did not load: {model.error!r}") from model.error
        for pairs in batch:
            scores: list[float | None] = [None] * len(pairs)
            idx = [i for i, (_, text) in enumerate(pairs) if text]
            if idx:
                length = min(77, model.processor.tokenizer.model_max_length)
                x = model.processor(text=[pairs[i][1] for i in idx], images=[pairs[i][0] for i in idx],
                                    return_tensors="pt", padding="max_length", truncation=True, max_length=length)
                with torch.inference_mode():
                    out = model.clip(**{k: v.to(self.device) for k, v in x.items()})
                    img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
                    txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
                    for i, s in zip(idx, (img * txt).sum(-1).cpu().tolist()):
                        scores[i] = float(s)
            yield scores

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE


def check_filters(filters: Sequence) -> list[Filter]:
    """The `[pipeline] filters` tables as `Filter`s, checked (names usable in a reason and a column,
    unique; a head filter needs a head and a bound, a clip_score may only record)."""
    out = [f if isinstance(f, Filter) else Filter(**f) for f in filters]
    names = [f.name for f in out]
    for f in out:
        if not _NAME.fullmatch(f.name or ""):
            raise ValueError(f"filter name {f.name!r}: use letters, digits, '_', '-', '.'")
        if f.kind not in KINDS:
            raise ValueError(f"filter {f.name!r}: kind {f.kind!r} is not one of {list(KINDS)}")
        if f.kind == "head" and not f.head:
            raise ValueError(f"filter {f.name!r} has no head (or set kind = \"{CLIP_SCORE}\")")
        if f.kind == "head" and f.min is None and f.max is None:
            raise ValueError(f"filter {f.name!r} has neither min nor max")
    if len(set(names)) != len(names):
        raise ValueError(f"filter names repeat: {names}")
    columns = [score_column(f.name) for f in out] + [score_column(f.name, True) for f in out if f.kind == CLIP_SCORE]
    if len(set(columns)) != len(columns):
        raise ValueError(f"filter names give one manifest column twice: {sorted(columns)}")
    return out


def score_columns(filters: Sequence[Filter]) -> tuple[str, ...]:
    """The manifest's score columns of these filters: pass 1's, then the synthetic captions' clip_scores."""
    return (*(score_column(f.name) for f in filters),
            *(score_column(f.name, True) for f in filters if f.kind == CLIP_SCORE))
