"""captioning: caption cleanup (a table)."""

from __future__ import annotations

import pytest

from captioning.cleanup import clean_caption


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
