"""Synthetic captions from an image-text-to-text VLM (SD3 §5.2.2), see README.md.

Beam-free: `Captioner`, `Caption`, `clean_caption`. The Beam `ModelHandler` lives in
`flowcurate.captioning.handler` (imported on its own so that using the captioner never imports Beam).
"""

from flowcurate.captioning.captioner import CAPTION_FALLBACK, DEFAULT_PROMPT, Caption, Captioner
from flowcurate.captioning.cleanup import clean_caption

__all__ = ["CAPTION_FALLBACK", "DEFAULT_PROMPT", "Caption", "Captioner", "clean_caption"]
