"""The VLM captioner: any transformers image-text-to-text model, greedy, in deterministic mini-batches.

    captioner = Captioner.load("llava-hf/llava-1.5-7b-hf")      # or a local folder: the same code
    captioner.caption(images, originals) -> [Caption(text, notes), ...]   # one per image, in order

A hub id and a local folder load through the same `AutoProcessor` + `AutoModelForImageTextToText`
calls (offline in tests). No Beam here: `flowcurate.captioning.handler` wraps this for `RunInference`.

Fallback (SD3 §5.2.2 trains on 50 % original captions anyway, so a missing synthetic one costs
little): when a mini-batch raises, its items are retried one by one; an item that still raises, or
whose cleaned text is empty (`clean_caption` -> None), gets its original caption and the note
`caption_fallback`. With no original either, the text is "" (an empty prompt: the sample still
trains, as an unconditional example) and the notes are the same; the pipeline notes
`orig_caption_missing` on such samples itself, so the pair of notes says both captions are empty.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from flowcurate.captioning.cleanup import clean_caption
from flowcurate.formats.devices import worker_device

log = logging.getLogger(__name__)

CAPTION_FALLBACK = "caption_fallback"
DEFAULT_PROMPT = "Describe this image in detail."
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Caption:
    text: str  # the cleaned synthetic caption, or the fallback (original caption, or "")
    notes: tuple[str, ...] = ()  # manifest notes: () or (CAPTION_FALLBACK,)


class Captioner:
    """A loaded VLM plus how it is asked. Build with `Captioner.load`."""

    def __init__(self, processor, model, *, location: str, revision: str | None = None,
                 prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 77, batch_size: int = 8,
                 device: str | torch.device = "cpu", trust_remote_code: bool = False):
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
        self.processor, self.model = processor, model.eval()
        self.location, self.revision, self.prompt = location, revision, prompt
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.device, self.trust_remote_code = torch.device(device), trust_remote_code
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        tokenizer = processor.tokenizer
        if not self.encoder_decoder:
            # Decoder-only models continue the prompt: with right padding, pad tokens would sit
            # between the prompt and the generated text of the shorter prompts.
            tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:  # batching needs one; EOS is the usual stand-in
            tokenizer.pad_token = tokenizer.eos_token
        # The text every image is asked with: the processor's chat template when it has one (so the
        # model sees its own conversation format), else the raw prompt, which must then contain
        # whatever image placeholder that processor expects.
        self.chat_template = getattr(processor, "chat_template", None) is not None
        if self.chat_template:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            self.text = processor.apply_chat_template(messages, add_generation_prompt=True)
        else:
            self.text = prompt

    @classmethod
    def load(cls, location: str, *, revision: str | None = None, prompt: str = DEFAULT_PROMPT,
             max_new_tokens: int = 77, batch_size: int = 8, trust_remote_code: bool = False,
             device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> Captioner:
        """Load processor + model from a hub id or a local folder.

        `revision`: git revision for hub ids (None: the default branch). `trust_remote_code` runs the
        repository's Python (off unless asked). `dtype`: a torch dtype or its name; None means float32 on
        CPU (half precision is slow or unsupported there) and the checkpoint's own dtype elsewhere.
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        kwargs = {"trust_remote_code": trust_remote_code}
        if revision is not None:
            kwargs["revision"] = revision
        device = torch.device(worker_device(device))  # "auto": where the model loads (a worker's own GPU)
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else "auto"
        elif isinstance(dtype, str) and dtype != "auto":
            if dtype not in _DTYPES:
                raise ValueError(f"dtype {dtype!r}: expected one of {sorted(_DTYPES)} or 'auto'")
            dtype = _DTYPES[dtype]
        processor = AutoProcessor.from_pretrained(location, **kwargs)
        model = AutoModelForImageTextToText.from_pretrained(location, dtype=dtype, **kwargs).to(device)
        return cls(processor, model, location=location, revision=revision, prompt=prompt,
                   max_new_tokens=max_new_tokens, batch_size=batch_size, device=device,
                   trust_remote_code=trust_remote_code)

    def caption(self, images: Sequence[np.ndarray | Image.Image], originals: Sequence[str | None]) -> list[Caption]:
        """One Caption per image, in input order.

        images: (H, W, 3) uint8 arrays or PIL images; originals: the original captions (None: none).
        Mini-batches of `batch_size` in input order, so the same inputs give the same captions.
        """
        if len(images) != len(originals):
            raise ValueError(f"{len(images)} images but {len(originals)} original captions")
        texts: list[str | None] = []
        for start in range(0, len(images), self.batch_size):
            texts += self._generate_or_retry(images[start:start + self.batch_size])
        out = []
        for text, original in zip(texts, originals):
            cleaned = clean_caption(text)
            if cleaned is None:
                out.append(Caption("" if original is None else original, (CAPTION_FALLBACK,)))
            else:
                out.append(Caption(cleaned))
        return out

    @torch.inference_mode()
    def generate(self, images: Sequence[np.ndarray | Image.Image]) -> list[str]:
        """Raw decoded text for one batch (greedy, at most `max_new_tokens`); raises on bad input."""
        pil = [_to_pil(image) for image in images]
        inputs = self.processor(images=pil, text=[self.text] * len(pil), return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:  # the vision tower runs in the model's dtype
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        if not self.encoder_decoder:  # decoder-only output repeats the prompt
            out = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(out, skip_special_tokens=True)

    def _generate_or_retry(self, images) -> list[str | None]:
        try:
            return self.generate(images)
        except Exception as batch_error:  # noqa: BLE001 - any failure (bad image, OOM) falls back per item
            if len(images) == 1:
                log.warning("captioning failed, falling back to the original caption: %r", batch_error)
                return [None]
            log.warning("captioning a batch of %d failed (%r); retrying one by one", len(images), batch_error)
        return [text for image in images for text in self._generate_or_retry([image])]

    def record(self) -> dict:
        """What produced the captions, for the pipeline's stats.json."""
        return {
            "location": self.location,
            "revision": self.revision,
            "commit": getattr(self.model.config, "_commit_hash", None),  # hub snapshot; None for folders
            "model_class": type(self.model).__name__,
            "image_processor": type(getattr(self.processor, "image_processor", None)).__name__,
            "prompt": self.prompt,
            "chat_template": self.chat_template,
            "max_new_tokens": self.max_new_tokens,
            "greedy": True,
            "batch_size": self.batch_size,  # batch composition changes float results
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "trust_remote_code": self.trust_remote_code,
        }


def _to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    """(H, W, 3) uint8 -> RGB PIL image (unambiguous for the image processor, even at 3x3 pixels)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    return Image.fromarray(np.ascontiguousarray(image))
