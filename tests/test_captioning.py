"""captioning: caption cleanup (a table), the Captioner on the tiny VLM, and its Beam ModelHandler."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from flowcurate.captioning import CAPTION_FALLBACK, Caption, Captioner, clean_caption
from flowcurate.models.tiny.captioner import CAPTION_WORDS
from flowcurate.models.tiny.procedural import random_image

OPTIONS = {"max_new_tokens": 16, "batch_size": 2}  # the tiny preset's length; 2 so chunks span batches


@pytest.mark.parametrize("raw, clean", [
    # boilerplate openings, any case, then the first letter capitalised
    ("The image shows a red circle on a blue background.", "A red circle on a blue background."),
    ("This image depicts two cats sleeping on a sofa.", "Two cats sleeping on a sofa."),
    ("In this picture, there is a dog on a sofa.", "A dog on a sofa."),
    ("The photo features a bowl of fruit.", "A bowl of fruit."),
    ("This is an image of a lighthouse at dusk.", "A lighthouse at dusk."),
    ("THE IMAGE SHOWS a cat.", "A cat."),
    ("The black-and-white photo shows an old car.", "An old car."),
    ("The image is a close-up of a bee.", "A close-up of a bee."),
    ("In the image, we can see a boat.", "A boat."),
    ("The image shows that the road is wet.", "The road is wet."),
    # chat artefacts
    ("ASSISTANT: The image shows a cat.", "A cat."),
    (": a red square", "A red square"),
    ("USER: <image>\nDescribe this image. ASSISTANT: a blue star", "A blue star"),
    ("Sure! The image shows a cat.", "A cat."),
    # an unfinished last sentence (cut by max_new_tokens) is dropped; without a sentence end, kept
    ("A red car parked on a street. A man walks past the", "A red car parked on a street."),
    ("A tall tree! Next to it a", "A tall tree!"),
    ('A sign that says "Stop." Behind it', 'A sign that says "Stop."'),
    ("a pink circle on a plain purple background", "A pink circle on a plain purple background"),
    ("a green square,", "A green square"),
    ("A sign reading 3.5 km. The road", "A sign reading 3.5 km."),
    ("A portrait of Dr. Smith in a lab", "A portrait of Dr. Smith in a lab"),
    ("1. A red car parked next to a", "1. A red car parked next to a"),  # "1." alone: too short
    # whitespace; what is already a caption stays as it is
    ("  A   cat\n\nsits on   a mat.  ", "A cat sits on a mat."),
    ("iPhone on a wooden table.", "iPhone on a wooden table."),
    ("A photo of a cat.", "A photo of a cat."),
    ("A painting of a ship. The image shows waves.", "A painting of a ship. The image shows waves."),
    # nothing usable
    ("", None), ("   ", None), (None, None), ("a", None), (".", None), ("ASSISTANT:", None),
    ("The image shows", None), ("The image shows.", None), ("In this picture, there is", None),
])
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_importing_captioning_imports_neither_beam_nor_transformers():
    code = "import sys, captioning; print(sorted({'apache_beam', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny VLM's ops are too small for two threads: on a shared 2-core machine a second thread
    made generation 10-50x slower (spin-waiting), so these tests run on one, as the tiny builder does."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def path(tiny_models):
    return str(tiny_models / "captioner")


@pytest.fixture(scope="module")
def captioner(path):
    return Captioner.load(path, **OPTIONS)


def _images(seed: int, n: int) -> list[np.ndarray]:
    """Procedural scenes (what the tiny VLM was fitted on) and uniform noise, at varied sizes."""
    rng = np.random.default_rng(seed)
    return [np.asarray(random_image(rng, int(rng.integers(24, 80)), int(rng.integers(24, 80)))[0]) if i % 2 == 0
            else rng.integers(0, 256, size=(int(rng.integers(8, 64)), int(rng.integers(8, 64)), 3), dtype=np.uint8)
            for i in range(n)]


def test_captions_images_in_order_and_deterministically(captioner):
    images = _images(0, 5)
    captions = captioner.caption(images, ["orig"] * 5)
    assert len(captions) == 5 and all(isinstance(c, Caption) for c in captions)
    assert all(c.text and c.notes == () for c in captions), captions
    words = [w.lower() for c in captions for w in c.text.replace(",", " ").split()]
    assert sum(w in CAPTION_WORDS for w in words) / len(words) >= 0.8, captions  # the VLM's, not "orig"
    assert captioner.caption(images, ["orig"] * 5) == captions
    # mini-batches of batch_size=2 in input order: [0, 1], [2, 3], [4]
    batches = [images[0:2], images[2:4], images[4:5]]
    assert [c for b in batches for c in captioner.caption(b, ["orig"] * len(b))] == captions
    # PIL images and arrays are the same input
    from PIL import Image
    assert captioner.caption([Image.fromarray(images[0])], [None]) == captioner.caption(images[:1], [None])


def test_a_failing_item_falls_back_to_its_original_caption(captioner):
    images = _images(1, 3)
    bad = np.zeros((16, 16), np.uint8)  # not (H, W, 3): the processor call raises for it
    captions = captioner.caption([images[0], bad, images[1], bad], ["a", "orig of bad", "c", None])
    assert captions[1] == Caption("orig of bad", (CAPTION_FALLBACK,))
    assert captions[3] == Caption("", (CAPTION_FALLBACK,))  # no original either: an empty caption
    # the good images of the failed batches were captioned one by one
    assert captions[0] == captioner.caption(images[:1], ["a"])[0] and captions[0].notes == ()
    assert captions[2] == captioner.caption(images[1:2], ["c"])[0] and captions[2].notes == ()


def test_an_unusable_generation_falls_back_to_the_original(captioner):
    one_token = Captioner(captioner.processor, captioner.model, location=captioner.location, max_new_tokens=1)
    assert [len(t.split()) for t in one_token.generate(_images(2, 2))] == [1, 1]  # e.g. "a": too short
    assert one_token.caption(_images(2, 2), ["an original", None]) == [
        Caption("an original", (CAPTION_FALLBACK,)), Caption("", (CAPTION_FALLBACK,))]


def test_record_and_checks(captioner, path):
    record = captioner.record()
    assert record == record | {"location": path, "revision": None, "prompt": "Describe this image in detail.",
                               "max_new_tokens": 16, "greedy": True, "batch_size": 2, "chat_template": True,
                               "model_class": "LlavaForConditionalGeneration", "trust_remote_code": False,
                               "dtype": "float32"}
    assert "Describe this image in detail." in captioner.text and captioner.text.startswith("USER:")
    assert captioner.processor.tokenizer.padding_side == "left"
    with pytest.raises(ValueError, match="original captions"):
        captioner.caption(_images(0, 2), ["x"])
    with pytest.raises(ValueError, match="dtype"):
        Captioner.load(path, dtype="float8")


def test_half_precision_weights_get_half_precision_pixels(path):
    bf16 = Captioner.load(path, dtype="bfloat16", max_new_tokens=6)
    assert bf16.record()["dtype"] == "bfloat16"
    captions = bf16.caption(_images(4, 2), [None, None])
    assert all(c.text and c.notes == () for c in captions), captions


@pytest.mark.gpu
def test_gpu_placement(path, captioner):
    gpu = Captioner.load(path, device="cuda", **OPTIONS)
    assert next(gpu.model.parameters()).device.type == "cuda"
    assert gpu.record()["dtype"] == "float32"  # None on a GPU: the checkpoint's own dtype
    images = _images(0, 5)
    captions = gpu.caption(images, ["orig"] * 5)
    assert all(c.text and c.notes == () for c in captions), captions
    assert gpu.caption(images, ["orig"] * 5) == captions
    # greedy tokens of the float32 tiny VLM do not flip between CPU and GPU rounding
    assert captions == captioner.caption(images, ["orig"] * 5)
    half = Captioner.load(path, device="cuda", dtype="float16", **OPTIONS)
    assert all(c.text and c.notes == () for c in half.caption(images, [None] * 5))


def test_handler_sizes_chunks_without_loading():
    from flowcurate.captioning.handler import CaptionModelHandler

    handler = CaptionModelHandler("/nonexistent/vlm", device="cuda")  # stores options only: nothing loads
    assert handler.share_model_across_processes() is False
    assert CaptionModelHandler("/x", share_model=True).share_model_across_processes() is True
    # Beam's byte counter sees pixels plus caption bytes of every item of every chunk
    chunk = [(np.zeros((4, 5, 3), np.uint8), "abc"), (np.zeros((2, 2, 3), np.uint8), None)]
    assert handler.get_num_bytes([chunk, chunk]) == 2 * (60 + 3 + 12)
    assert handler.get_num_bytes([chunk[:1]]) == 60 + 3


@pytest.mark.parametrize("keyed", [False, True])  # two runs: both must equal the direct captions
def test_run_inference_in_beam_equals_direct_captions(captioner, path, keyed):
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.testing.util import assert_that, equal_to

    from flowcurate.captioning.handler import CaptionModelHandler

    images = _images(3, 6)
    bad = np.zeros((3, 3), np.uint8)
    chunks = [[(images[0], "zero"), (images[1], None), (images[2], "two")],
              [(images[3], "three"), (bad, "bad")],
              [(images[4], None)]]
    expected = [captioner.caption([i for i, _ in chunk], [o for _, o in chunk]) for chunk in chunks]
    assert expected[1][1] == Caption("bad", (CAPTION_FALLBACK,))

    handler = CaptionModelHandler(path, **OPTIONS)
    pipeline = beam.Pipeline()
    if keyed:
        out = (pipeline | beam.Create(list(enumerate(chunks))) | RunInference(KeyedModelHandler(handler)))
        assert_that(out, equal_to(list(enumerate(expected))))
    else:
        out = pipeline | beam.Create(chunks) | RunInference(handler)
        assert_that(out, equal_to(expected))
    result = pipeline.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_namespace("flowcurate_captioning"))["counters"]
    assert [c.committed for c in counters if c.key.metric.name == CAPTION_FALLBACK] == [1]
