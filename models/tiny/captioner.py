"""A tiny LLaVA-style captioner in the layout real image-text-to-text VLMs use on the hub.

`AutoProcessor.from_pretrained(DIR)` gives a `LlavaProcessor` (PIL CLIP image processor, a byte-level
BPE tokenizer built offline, a LLaVA-1.5-style chat template) and
`AutoModelForImageTextToText.from_pretrained(DIR)` a `LlavaForConditionalGeneration` (a CLIP vision
tower and a Llama language model, two layers of width 64 each). So the captioning stage runs the code
it runs for real VLMs: `apply_chat_template` -> `processor(images=, text=)` -> `generate` -> decode.

`build_captioner` fits it for a fixed number of steps on procedural (image, caption) pairs, so greedy
output reads like a caption of the procedural vocabulary ("a red circle on a plain blue background")
rather than random tokens. It is a stand-in, not a good captioner.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from flowcurate.models.tiny.procedural import BACKGROUNDS, COLORS, SHAPES, caption, random_image, random_scene

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
IMAGE_SIZE = 32  # the vision tower sees 32x32 (squashed, not cropped: captions describe the whole image)
PATCH = 8  # -> 16 image tokens per image
WIDTH = 64
PROMPT = "Describe this image."

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT: ..."); BOS comes from the tokenizer.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: {% elif m['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Words beyond the procedural captions, so prompts and ordinary captions tokenise into few pieces.
COMMON_WORDS = (
    "USER: ASSISTANT: Describe describe this the image picture photo photograph in detail of a an and "
    "with on in at is are there shows showing depicts small large big shape shapes colorful color "
    "background left right top bottom center middle above below next to some two three one several "
    "what do you see caption Write short . , : ? !"
)
# Every word `flowcurate.models.tiny.procedural.caption` can write (what a fitted captioner's output should consist of).
CAPTION_WORDS = frozenset([*COLORS, *SHAPES, *BACKGROUNDS, "background", "a", "an", "and", "on", "to",
                           "above", "below", "the", "left", "right", "of"])
STEPS = 200
BATCH = 16
LR = 3e-3
TRAIN_IMAGES = 512


@contextmanager
def _torch_threads(n: int):
    """Ops this small run fastest on one thread, and one thread keeps the result independent of the
    machine's core count; the caller's setting comes back afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _corpus(rng: np.random.Generator, n: int = 400) -> list[str]:
    words = " ".join([*COLORS, *SHAPES, *BACKGROUNDS])
    captions = [caption(random_scene(rng)) for _ in range(n)]
    prompts = ["USER: \nDescribe this image. ASSISTANT:", "USER: \nDescribe this image in detail. ASSISTANT:"]
    return captions + [COMMON_WORDS, words, *prompts] * 20


def build_tokenizer(rng: np.random.Generator):
    """A byte-level BPE (any text encodes) whose merges make every caption word one or two tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(rng), trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN},
                                   padding_side="left", model_max_length=256)


VISION = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=PATCH)
TEXT = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def build_processor(tokenizer, vision: dict = VISION):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(size={"height": vision["image_size"], "width": vision["image_size"]},
                                            do_center_crop=False)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision["patch_size"],
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=1)


def build_model(tokenizer, vision: dict = VISION, text: dict = TEXT):
    """The LLaVA model at the tiny size, or at another (`vision`: CLIPVisionConfig, `text`: LlamaConfig
    fields; the real-size one in benchmarks/pipeline_bench.py)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**{"vocab_size": len(tokenizer), **text}, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config)


def encode_pairs(processor, images, captions) -> dict[str, torch.Tensor]:
    """Training tensors for (image, caption) pairs: prompt + caption + EOS, labels only on the caption
    and EOS (LLaVA's recipe). Every prompt has the same length, so captions are right-padded."""
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True)
    tok = processor.tokenizer
    enc = processor(images=images, text=[prompt] * len(images), return_tensors="pt")
    n_prompt = enc["input_ids"].shape[1]
    answers = [tok(" " + c + tok.eos_token, add_special_tokens=False)["input_ids"] for c in captions]
    width = max(len(a) for a in answers)
    ans = torch.full((len(answers), width), tok.pad_token_id)
    labels = torch.full((len(answers), n_prompt + width), -100)
    mask = torch.zeros(len(answers), width, dtype=enc["attention_mask"].dtype)
    for i, a in enumerate(answers):
        ans[i, :len(a)] = torch.tensor(a)
        labels[i, n_prompt:n_prompt + len(a)] = torch.tensor(a)
        mask[i, :len(a)] = 1
    return {"input_ids": torch.cat([enc["input_ids"], ans], 1),
            "attention_mask": torch.cat([enc["attention_mask"], mask], 1),
            "pixel_values": enc["pixel_values"], "labels": labels}


def train(model, processor, rng: np.random.Generator, steps: int = STEPS, log=None) -> float:
    """Fit captions of TRAIN_IMAGES procedural images (rendered small: the tower sees 32x32 anyway)."""
    pairs = [random_image(rng, int(w), int(h)) for w, h in rng.integers(32, 97, size=(TRAIN_IMAGES, 2))]
    data = encode_pairs(processor, [img for img, _ in pairs], [cap for _, cap in pairs])
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        idx = torch.from_numpy(rng.choice(len(pairs), size=BATCH, replace=False))
        loss = model(**{k: v[idx] for k, v in data.items()}).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(f"[tiny-captioner] step {step} loss {loss.item():.3f}")
    model.eval()
    return float(loss.item())


@torch.no_grad()
def sample_captions(model, processor, images, max_new_tokens: int = 24) -> list[str]:
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True)
    enc = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return [s.strip() for s in processor.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]


def build_captioner(out_dir: Path, seed: int = 0, steps: int | None = None, log=None) -> dict:
    """Build, fit and `save_pretrained` the captioner into `out_dir`; returns the report.
    `steps=0` skips fitting (random weights)."""
    t0, c0 = time.perf_counter(), time.process_time()
    rng = np.random.default_rng([seed, 2])
    tokenizer = build_tokenizer(rng)
    processor = build_processor(tokenizer)
    with torch.random.fork_rng(devices=[]), _torch_threads(1):
        torch.manual_seed(seed)
        model = build_model(tokenizer)
        steps = STEPS if steps is None else steps
        final_loss = train(model, processor, rng, steps=steps, log=log) if steps else None
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    with _torch_threads(1):
        held_out = [random_image(np.random.default_rng([seed, 3, i]), 64, 48) for i in range(8)]
        generated = sample_captions(model, processor, [img for img, _ in held_out])
    words = [w for g in generated for w in g.replace(",", " ").split()]
    return {
        "steps": steps,
        "final_loss": None if final_loss is None else round(final_loss, 3),
        "vocab": len(tokenizer),
        "params": sum(p.numel() for p in model.parameters()),
        "bytes": sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file()),
        # share of generated words (held-out images, greedy) that procedural captions use
        "caption_word_fraction": round(sum(w in CAPTION_WORDS for w in words) / max(1, len(words)), 3),
        "sample": {"truth": held_out[0][1], "generated": generated[0]},
        "cpu_seconds": round(time.process_time() - c0, 1),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
