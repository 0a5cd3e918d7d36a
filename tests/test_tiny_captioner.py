"""The tiny captioner loads and generates through the code path real hub VLMs use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from flowcurate.models.tiny.captioner import CAPTION_WORDS, build_captioner
from flowcurate.models.tiny.procedural import random_image

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]


@pytest.fixture(scope="module")
def captioner(tiny_models):
    path = tiny_models / "captioner"
    return AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path).eval()


def _generate(processor, model, images, max_new_tokens=20):
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    assert new.shape[1] <= max_new_tokens
    return processor.batch_decode(new, skip_special_tokens=True)


def test_loads_as_a_chat_vlm(captioner):
    processor, model = captioner
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert prompt.count("<image>") == 1 and "Describe this image." in prompt
    ids = processor(images=[random_image(np.random.default_rng(0), 64)[0]], text=[prompt],
                    return_tensors="pt")["input_ids"][0]
    # the processor expands the one <image> placeholder to one token per vision patch
    assert int((ids == model.config.image_token_id).sum()) > 1


def test_generates_caption_like_text_from_images(captioner):
    processor, model = captioner
    rng = np.random.default_rng(123)
    images = [random_image(rng, int(w), int(h))[0] for w, h in ((64, 64), (150, 90), (80, 200))]
    captions = _generate(processor, model, images)
    assert len(captions) == 3 and all(c.strip() for c in captions)
    words = [w for c in captions for w in c.replace(",", " ").split()]
    # fitted on procedural captions: greedy output speaks their vocabulary (random weights would not)
    assert sum(w in CAPTION_WORDS for w in words) / len(words) >= 0.8, captions
    assert captions == _generate(processor, model, images)  # greedy decoding is deterministic
    assert _generate(processor, model, images[1:2]) == captions[1:2]  # left padding changes nothing


def test_build_is_deterministic_for_a_seed(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_captioner(tmp_path / name, seed=seed, steps=2)
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
