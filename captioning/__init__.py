"""Synthetic captions from an image-text-to-text VLM (SD3 §5.2.2), see README.md.

Beam-free: `Captioner`, `Caption`, `clean_caption`. The Beam `ModelHandler` lives in
`flowcurate.captioning.handler` (imported on its own so that using the captioner never imports Beam).
"""

import importlib

__all__ = ["CAPTION_FALLBACK", "DEFAULT_PROMPT", "Caption", "Captioner", "clean_caption"]
_HOME = {"clean_caption": "flowcurate.captioning.cleanup"}


def __getattr__(name: str):
    # imported on first use, so `python -m flowcurate.captioning --help` does not wait for torch
    if name in __all__:
        return getattr(importlib.import_module(_HOME.get(name, "flowcurate.captioning.captioner")), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
