"""The three SD3 text encoders (CLIP-L, CLIP-G, T5), loaded from a diffusers SD3 folder or hub id, and
the per-encoder outputs the curated shards store.

`encode` computes exactly what `StableDiffusion3Pipeline.encode_prompt` computes before it stacks
the parts (tests compare the two): CLIP prompts padded to 77 tokens and truncated, the *penultimate*
hidden state of each CLIP (no final layer norm), each CLIP's projected pooled output
(`text_embeds`), and T5's last hidden state at `t5_length` tokens (77 in the SD3 paper, 256 in
diffusers' pipeline). The parts are kept separate because the trainer drops each encoder
independently; `flowcurate.formats.shards.assemble` stacks them the way the reference does.

The real models: the SD3 repo's `text_encoder` (CLIP-L), `text_encoder_2` (CLIP-G), `text_encoder_3`
(T5-XXL) with `tokenizer`, `tokenizer_2`, `tokenizer_3`. The tiny ones (`models/tiny/`) use the same
layout and load through this same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CLIP_LENGTH = 77  # CLIP's context; SD3 always pads CLIP prompts to it
# (role, model subfolder, tokenizer subfolder)
ROLES = (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2"),
         ("t5", "text_encoder_3", "tokenizer_3"))


def quiet_hf_logging() -> None:
    """Silence transformers' and diffusers' per-load progress bars and advice (workers load models in
    every process; the bars flood a pipeline's log without telling anything)."""
    import diffusers
    import transformers

    for lib in (transformers, diffusers):
        lib.utils.logging.disable_progress_bar()
        lib.utils.logging.set_verbosity_error()


def torch_dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: float32, float16 or bfloat16") from None


@dataclass
class TextEncoders:
    """Tokenizers and encoders for the three roles; `encode(prompts)` -> dict of float32 numpy arrays."""

    tokenizers: dict
    encoders: dict
    t5_length: int = 77
    device: str = "cpu"

    @classmethod
    def load(cls, source: str, *, revision: str | None = None, t5_length: int = 77, dtype: str = "float32",
             device: str = "cpu") -> TextEncoders:
        """Load from a diffusers SD3 folder or hub id (`HF_HUB_OFFLINE=1` keeps it to local caches)."""
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        tokenizers, encoders = {}, {}
        for role, sub, tok_sub in ROLES:
            model_cls = T5EncoderModel if role == "t5" else CLIPTextModelWithProjection
            tokenizers[role] = AutoTokenizer.from_pretrained(source, subfolder=tok_sub, revision=revision)
            encoders[role] = model_cls.from_pretrained(source, subfolder=sub, revision=revision,
                                                       dtype=torch_dtype(dtype)).to(device).eval()
        return cls(tokenizers, encoders, t5_length, device)

    def widths(self) -> dict[str, int]:
        """Wl, Wl', Wg, Wg', Wt (docs/architecture.md, "Shards"), read from the encoders' configs."""
        cl, cg, t5 = (self.encoders[r].config for r in ("clip_l", "clip_g", "t5"))
        return {"clip_l": cl.hidden_size, "clip_l_pooled": cl.projection_dim, "clip_g": cg.hidden_size,
                "clip_g_pooled": cg.projection_dim, "t5": t5.d_model}

    def _ids(self, role: str, prompts: list[str], length: int) -> tuple[torch.Tensor, np.ndarray]:
        tok = self.tokenizers[role]
        ids = tok(prompts, padding="max_length", max_length=length, truncation=True,
                  return_tensors="pt").input_ids
        truncated = np.array([len(t) > length for t in tok(prompts, verbose=False).input_ids], bool)
        return ids.to(self.device), truncated

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """Per-encoder arrays for a batch of prompts (float32):
        clip_l (B, 77, Wl), clip_l_pooled (B, Wl'), clip_g (B, 77, Wg), clip_g_pooled (B, Wg'),
        t5 (B, L, Wt); plus `truncated` (B,) bool: the prompt lost tokens to CLIP's 77-token limit."""
        out: dict[str, np.ndarray] = {}
        truncated = np.zeros(len(prompts), bool)
        for role in ("clip_l", "clip_g"):
            ids, cut = self._ids(role, prompts, CLIP_LENGTH)
            truncated |= cut
            res = self.encoders[role](ids, output_hidden_states=True)
            out[role] = res.hidden_states[-2].float().cpu().numpy()  # penultimate layer (clip_skip=None)
            out[f"{role}_pooled"] = res.text_embeds.float().cpu().numpy()  # projected pooled output
        ids, _ = self._ids("t5", prompts, self.t5_length)
        out["t5"] = self.encoders["t5"](ids)[0].float().cpu().numpy()
        out["truncated"] = truncated
        return out
