"""A tiny Stable Diffusion 3 pipeline folder, in exactly the diffusers layout of the real one.

    DIR/model_index.json   written by StableDiffusion3Pipeline.save_pretrained
    DIR/vae/               AutoencoderKL: 16 latent channels, 8x downsampling, scaling 1.5305, shift 0.0609,
                           briefly fitted on procedural images (flowcurate.models.tiny.procedural) so reconstructions are
                           recognisable
    DIR/text_encoder/      CLIPTextModelWithProjection, the CLIP-L stand-in (hidden 32, quick_gelu)
    DIR/text_encoder_2/    CLIPTextModelWithProjection, the CLIP-G stand-in (hidden 48, gelu)
    DIR/text_encoder_3/    T5EncoderModel (d_model 96, gated-gelu)
    DIR/tokenizer{,_2}/    CLIP byte-level BPE (vocab.json + merges.txt + tokenizer.json), trained offline on
                           the procedural caption words plus common caption words; tokenizer_2 pads with "!"
                           (id 0) like SD3's CLIP-G tokenizer, tokenizer pads with <|endoftext|> like CLIP-L's
    DIR/tokenizer_3/       T5 unigram tokenizer built in memory (whole-word pieces + single characters)
    DIR/transformer/       SD3Transformer2DModel (MM-DiT), random weights
    DIR/scheduler/         FlowMatchEulerDiscreteScheduler, shift 3.0

Widths are chosen so the reference's conditioning assembly (SD3 App. B.2) is exercised, not skipped:
CLIP-L hidden + CLIP-G hidden = 80 < T5 width = joint_attention_dim = 96, so the CLIP context is really
zero-padded by 16 channels, and the unequal CLIP widths (32 vs 48) catch a swapped concatenation order.
Pooled = 32 + 48 = 80 = pooled_projection_dim.

Everything is a pure function of `seed`: weights come from seeded torch RNGs inside `fork_rng` (the
caller's RNG state is left alone), training uses fixed step counts and seeded generators, and the
tokenizers depend on no seed at all. Two builds with one seed write identical safetensors.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from flowcurate.models.tiny.procedural import BACKGROUNDS, COLORS, SHAPES, image_batch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

# ---------------------------------------------------------------------------------------------------------
# Sizes. SD3's real widths: CLIP-L 768, CLIP-G 1280, T5 4096, pooled 2048.

CLIP_L = dict(hidden_size=32, projection_dim=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=48, projection_dim=48, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu")
T5 = dict(d_model=96, d_kv=24, d_ff=192, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
          relative_attention_max_distance=128, feed_forward_proj="gated-gelu")
TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                   attention_head_dim=32, num_attention_heads=2, joint_attention_dim=96,
                   caption_projection_dim=64, pooled_projection_dim=80, pos_embed_max_size=16)
VAE = dict(in_channels=3, out_channels=3, latent_channels=16,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           # 4 blocks -> 2**3 = 8x downsampling (diffusers derives vae_scale_factor from the block count).
           # Narrow at 64x64, wider at 8x8: the full-resolution convolutions dominate the CPU cost.
           block_out_channels=(16, 32, 64, 64), layers_per_block=1,
           # 4 groups keep 4-16 channels per group; with one channel per group the final GroupNorm acts as
           # an instance norm and strips each image's mean colour, which the decoder then cannot restore.
           norm_num_groups=4, act_fn="silu", sample_size=64, mid_block_add_attention=False,
           scaling_factor=1.5305, shift_factor=0.0609,  # SD3's constants
           use_quant_conv=False, use_post_quant_conv=False)  # as in SD3's converted VAE
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
CLIP_MAX_LENGTH = 77
RESOLUTION = 64  # pixels; = TRANSFORMER["sample_size"] * 8

# The widths the conditioning contract depends on (docs/architecture.md "Shards": Wl, Wl', Wg, Wg', Wt).
WIDTHS = {
    "clip_l": CLIP_L["hidden_size"], "clip_l_pooled": CLIP_L["projection_dim"],
    "clip_g": CLIP_G["hidden_size"], "clip_g_pooled": CLIP_G["projection_dim"],
    "t5": T5["d_model"], "joint_attention_dim": TRANSFORMER["joint_attention_dim"],
    "pooled_projection_dim": TRANSFORMER["pooled_projection_dim"],
    "latent_channels": VAE["latent_channels"],
}


def check_widths(w: dict[str, int] = WIDTHS) -> None:
    """Raise ValueError unless the widths fit the reference's conditioning assembly.

    diffusers pads CLIP-L|CLIP-G (77, Wl + Wg) to (77, Wt) with `F.pad(x, (0, Wt - Wl - Wg))`; a negative
    pad silently crops channels instead of failing, so Wl + Wg <= Wt must be checked here."""
    if w["clip_l"] + w["clip_g"] > w["t5"]:
        raise ValueError(f"CLIP-L + CLIP-G hidden = {w['clip_l'] + w['clip_g']} > T5 width {w['t5']}: "
                         "the zero-pad to the T5 width would crop the CLIP context")
    if w["t5"] != w["joint_attention_dim"]:
        raise ValueError(f"T5 width {w['t5']} != joint_attention_dim {w['joint_attention_dim']}")
    if w["clip_l_pooled"] + w["clip_g_pooled"] != w["pooled_projection_dim"]:
        raise ValueError(f"pooled CLIP-L + CLIP-G = {w['clip_l_pooled'] + w['clip_g_pooled']} "
                         f"!= pooled_projection_dim {w['pooled_projection_dim']}")
    if w["latent_channels"] != TRANSFORMER["in_channels"]:
        raise ValueError("the transformer must take the AE's latent channels")


check_widths()
_MMDIT_WIDTH = TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"]
if TRANSFORMER["caption_projection_dim"] != _MMDIT_WIDTH:
    raise ValueError("caption_projection_dim must equal the MM-DiT width (heads * head_dim)")
if TRANSFORMER["sample_size"] * 2 ** (len(VAE["block_out_channels"]) - 1) != RESOLUTION:
    raise ValueError("transformer sample_size * AE downsampling must give RESOLUTION")

# ---------------------------------------------------------------------------------------------------------
# Tokenizer vocabulary: every word procedural captions use (so they encode as whole tokens) and a few
# hundred common caption words, so that VLM captions tokenise sensibly. Anything else still tokenises:
# into byte-level pieces (CLIP) or single characters (T5).

PROCEDURAL_WORDS = (*COLORS, *SHAPES, *BACKGROUNDS, "background", "a", "an", "and", "on", "to", "the",
                    "of", "left", "right", "above", "below")
COMMON_WORDS = tuple("""
image picture photo photograph illustration drawing painting sketch graphic render rendering scene view
close up shot artwork design pattern texture logo icon symbol sign text letter letters word words number
shows show showing depicts depicting features featuring contains containing displays displaying there here
this that these those it its is are was were be been being has have had with without in into onto at
by for from as or but not no nor so very also only just than then too more most some any each every all
both either other another such same different various several many few one two three four five six seven
eight nine ten first second third single double pair group set lot part half whole full empty blank
top bottom middle center centre centered side sides corner corners edge edges upper lower front back
behind beside between near next inside outside over under around across along against toward towards
through within up down out off far close together apart each
large small big little tiny huge medium long short tall wide narrow thick thin round rounded flat
smooth rough sharp soft bright dark light pale deep vivid solid simple plain abstract geometric colorful
colourful colored coloured multicolored striped checkered dotted spotted patterned shaded textured
transparent shiny glossy matte clean old new young beautiful pretty nice cute modern vintage
grey golden gold silver beige navy teal violet magenta maroon turquoise lime olive tan cream
shape shapes circles squares triangles diamonds stars rings rectangle rectangles oval ovals square
line lines stripe stripes dot dots grid checkerboard gradient border frame outline fill filled outlined
hexagon polygon heart cross arrow spiral wave waves curve curved straight diagonal horizontal vertical
object objects item items thing things figure figures form forms element elements area areas space
color colors colour colours tone tones shade shades hue
person people man men woman women boy girl child children baby face hand hands head hair eyes
dog dogs cat cats bird birds horse fish animal animals flower flowers tree trees plant plants leaf leaves
grass field forest mountain mountains hill river lake sea ocean beach sand water sky cloud clouds sun
moon snow rain road street city building buildings house houses room wall walls floor window door
table chair bed car cars bus train boat plane bike food plate cup bowl bottle book paper box ball toy
shirt dress hat
sitting standing lying walking running holding wearing looking smiling playing flying floating
placed positioned arranged located set surrounded covered made drawn painted printed rendered
appears appear seems seem looks look sits sit stands stand lies lie rests rest
what which who where when how why can could may might will would should
""".split())
SPECIAL_T5 = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: T5's pad / eos / unk


def vocabulary_words() -> list[str]:
    """Sorted, de-duplicated words both tokenizers hold as whole tokens."""
    return sorted(set(PROCEDURAL_WORDS) | set(COMMON_WORDS))


def clip_bpe(words: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """A CLIP byte-level BPE vocabulary and merge list, trained on `words` until each is one token.

    Layout as in OpenAI CLIP's vocab.json: the 256 byte characters (so "!" is id 0, the pad id of SD3's
    CLIP-G tokenizer), the same with "</w>", one entry per merge in merge order, then <|startoftext|>,
    <|endoftext|> (so EOS has the largest id, which CLIP's legacy argmax pooling relies on).

    Trained here rather than with `tokenizers`' BpeTrainer, which breaks frequency ties in hash-map
    order and so gives different merges from run to run; ties here go to the lexicographically smallest
    pair."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    base = chars + [c + "</w>" for c in chars]
    # Split with CLIPTokenizer's own normalizer and pre-tokenizer, so training words are what it sees.
    clip = CLIPTokenizer(vocab={t: i for i, t in enumerate(base)}, merges=[]).backend_tokenizer
    pieces = sorted({p for w in words
                     for p, _ in clip.pre_tokenizer.pre_tokenize_str(clip.normalizer.normalize_str(w))})
    seqs = [[*p[:-1], p[-1] + "</w>"] for p in pieces]
    merges: list[tuple[str, str]] = []
    while True:  # until no pair is left: every training word is then a single token
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        a, b = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append((a, b))
        for k, seq in enumerate(seqs):
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[k] = out
        seqs = [seq for seq in seqs if len(seq) > 1]
    vocab = base + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    if len(set(vocab)) != len(vocab):
        raise RuntimeError("BPE merges produced a duplicate token")
    return vocab, merges


def clip_tokenizer(vocab: list[str], merges: list[tuple[str, str]], pad_token: str = "<|endoftext|>"):
    """CLIPTokenizer over `vocab`/`merges`, 77 tokens; SD3's CLIP-L pads with EOS, its CLIP-G with "!"."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, pad_token=pad_token,
                         model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer(words: list[str]):
    """T5 unigram tokenizer: whole-word pieces (lower-case and capitalised: T5 does not lower-case) win
    over spelling a word out, and printable ASCII characters cover any other word."""
    from transformers import T5Tokenizer

    forms = sorted({f for w in words for f in (w, w.capitalize())})
    chars = [chr(c) for c in range(33, 127)]
    pieces = ([(s, 0.0) for s in SPECIAL_T5] + [("\u2581" + w, -4.0) for w in forms]
              + [("\u2581", -10.0)] + [(c, -10.0) for c in chars])
    # model_max_length as SD3's tokenizer_3; the pipeline pads / truncates to max_sequence_length anyway.
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _write_clip_files(folder: Path, vocab: list[str], merges: list[tuple[str, str]]) -> None:
    # save_pretrained (transformers v5) writes only tokenizer.json; real CLIP repos also carry
    # vocab.json + merges.txt, which other loaders (and older transformers) read.
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


# ---------------------------------------------------------------------------------------------------------
# The autoencoder: briefly fitted on procedural images.

AE_STEPS = 500  # fixed, never a time budget: the build is deterministic for a seed
# 32: no slower per step than 16 on two threads, and it fits better (BENCHMARKS.md, "Tiny models")
AE_BATCH = 32
AE_CROP = 32  # training crops (pixels, a multiple of 8): 4x cheaper per sample than whole 64x64 images
# rates of 1e-3 and above make this GroupNorm network oscillate (BENCHMARKS.md, "Tiny models")
AE_LR = 4e-4
AE_WARMUP = 20
AE_POOL = 2048  # images rendered once; flips, 90-degree turns and crops make the rest
AE_HELDOUT = 64
AE_KL_WEIGHT = 1e-6
AE_MOMENT_WEIGHT = 1e-2  # pulls latent means to mean shift_factor, std 1 / scaling_factor


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def psnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over images of PSNR (dB) between x, y: (N, 3, H, W) in [-1, 1]."""
    mse = ((x.clamp(-1, 1) - y) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """decode(encode(x).latent_dist.mode()) for x: (N, 3, H, W) in [-1, 1]."""
    return torch.cat([vae.decode(vae.encode(x[i:i + batch]).latent_dist.mode()).sample
                      for i in range(0, len(x), batch)])


def _augment(x: torch.Tensor, g: torch.Generator, crop: int) -> torch.Tensor:
    """A random dihedral turn of the batch and one random 8-aligned crop per image: (B, 3, crop, crop)."""
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(3)
    x = torch.rot90(x, int(torch.randint(0, 4, (), generator=g)), (2, 3))
    n = (x.shape[-1] - crop) // 8 + 1  # crops aligned to the latent grid
    offs = (torch.randint(0, n, (len(x), 2), generator=g) * 8).tolist()
    return torch.stack([im[:, i:i + crop, j:j + crop] for im, (i, j) in zip(x, offs)])


def _fold_latent_scale(vae, mean_std: torch.Tensor) -> None:
    """Rescale latent channel c by a_c = (1 / scaling_factor) / std_c, exactly: the encoder's mean output is
    multiplied by a_c (its log-variance shifted by 2 ln a_c) and the decoder's first convolution divided by
    a_c, so reconstructions do not change. mean_std: (C,) std of posterior means over data."""
    c = vae.config.latent_channels
    a = (1.0 / vae.config.scaling_factor) / mean_std.clamp_min(1e-6)
    enc, dec = vae.encoder.conv_out, vae.decoder.conv_in
    with torch.no_grad():
        enc.weight[:c] *= a[:, None, None, None]
        enc.bias[:c] *= a
        enc.bias[c:] += 2 * torch.log(a)
        dec.weight /= a[None, :, None, None]


def fit_autoencoder(seed: int, steps: int = AE_STEPS, log=None) -> tuple[AutoencoderKL, dict]:
    """A tiny SD3-style AutoencoderKL fitted on procedural images for `steps` Adam steps.

    Loss: MSE on decode(posterior sample) + a tiny KL + a small pull of the latent moments towards SD3's
    shift / scale, so `(z - shift_factor) * scaling_factor` is roughly standard normal, as downstream code
    assumes. Returns the model (eval mode) and a report with the held-out PSNR of
    decode(encode(x).latent_dist.mode()) on 64x64 images the AE never saw."""
    from diffusers import AutoencoderKL
    from diffusers.models.resnet import ResnetBlock2D

    streams = np.random.SeedSequence([seed, 0x5D3A]).spawn(2)  # training pool / held-out images
    # never render more images than training can draw (quick builds in tests use a few steps)
    n_pool = min(AE_POOL, max(64, steps * AE_BATCH))
    pool = images_to_tensor(image_batch(np.random.default_rng(streams[0]), n_pool, RESOLUTION))
    held = images_to_tensor(image_batch(np.random.default_rng(streams[1]), AE_HELDOUT, RESOLUTION))
    vae = AutoencoderKL(**VAE)
    c = VAE["latent_channels"]
    with torch.no_grad():
        # Zero the second convolution of every residual block: each starts as an identity, so the network
        # starts shallow, which suits a few hundred steps (the zero-init of Goyal et al. 2017).
        for m in vae.modules():
            if isinstance(m, ResnetBlock2D):
                m.conv2.weight.zero_()
                m.conv2.bias.zero_()
        # Start with a small posterior std (exp(-3) ~ 0.05): sampled latents are informative from step 0.
        vae.encoder.conv_out.bias[c:] = -6.0
    opt = torch.optim.Adam(vae.parameters(), lr=AE_LR)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / AE_WARMUP) * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    g = torch.Generator().manual_seed(seed)
    shift, std_target = vae.config.shift_factor, 1.0 / vae.config.scaling_factor
    t0, cpu0 = time.perf_counter(), time.process_time()
    vae.train()
    for step in range(steps):
        x = _augment(pool[torch.randint(0, len(pool), (AE_BATCH,), generator=g)], g, AE_CROP)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        mu = post.mean.transpose(0, 1).flatten(1)  # (C, B*h*w)
        moments = (mu.mean(1) - shift).pow(2).mean() + (mu.std(1) - std_target).pow(2).mean()
        loss = (rec - x).pow(2).mean() + AE_KL_WEIGHT * post.kl().mean() + AE_MOMENT_WEIGHT * moments
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % 100 == 0:
            log(f"[tiny-sd3] ae step {step + 1}/{steps} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        calib = pool[:512]
        means = torch.cat([vae.encode(calib[i:i + 64]).latent_dist.mean for i in range(0, len(calib), 64)])
        _fold_latent_scale(vae, means.transpose(0, 1).flatten(1).std(1))
        lat = torch.cat([vae.encode(held[i:i + 32]).latent_dist.mean for i in range(0, len(held), 32)])
        scaled = (lat - shift) * vae.config.scaling_factor
    report = {
        "ae_psnr_db": round(psnr_db(reconstruct(vae, held), held), 2),
        "ae_steps": steps,
        "ae_train_s": round(time.perf_counter() - t0, 1),
        "ae_train_cpu_s": round(time.process_time() - cpu0, 1),
        # statistics of (z - shift) * scale on held-out images: ~0 / ~1 is what the MM-DiT expects
        "latent_scaled_mean": round(float(scaled.mean()), 3),
        "latent_scaled_std": round(float(scaled.std()), 3),
    }
    return vae, report


# ---------------------------------------------------------------------------------------------------------
# Assembly


def _seeded(seed: int, part: int) -> None:
    # One independent stream per component, so adding a component does not change the others' weights.
    torch.manual_seed(int(np.random.SeedSequence([seed, part]).generate_state(1)[0]))


def tokenizers():
    """(vocab, merges, (CLIP-L, CLIP-G, T5 tokenizer)): CLIP-L pads with <|endoftext|>, CLIP-G with "!"
    (id 0) as SD3's; no seed involved."""
    words = vocabulary_words()
    vocab, merges = clip_bpe(words)
    return vocab, merges, (clip_tokenizer(vocab, merges), clip_tokenizer(vocab, merges, pad_token="!"),
                           t5_tokenizer(words))


def text_encoder(part: int, tok, seed: int = 0, spec: dict | None = None):
    """CLIP-L (part 0), CLIP-G (1) or T5 (2) for tokenizer `tok`, seeded per part; `spec` gives another
    size (the real widths in benchmarks/pipeline_bench.py; its vocab_size, if any, wins over len(tok))."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    spec = {"vocab_size": len(tok), **(spec or (CLIP_L, CLIP_G, T5)[part])}
    _seeded(seed, part)
    if part == 2:
        return T5EncoderModel(T5Config(**spec, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                       decoder_start_token_id=0)).eval()
    return CLIPTextModelWithProjection(CLIPTextConfig(**spec, bos_token_id=tok.bos_token_id,
                                                      eos_token_id=tok.eos_token_id,
                                                      pad_token_id=tok.pad_token_id)).eval()


def build_sd3(out_dir: Path, seed: int = 0, ae_steps: int | None = None, log=None) -> dict:
    """Write a complete StableDiffusion3Pipeline folder into `out_dir` (which must not exist yet).

    ae_steps: AE training steps (default AE_STEPS; fewer for quick tests). Returns a JSON-able report:
    AE PSNR (dB, held-out 64x64 procedural images), training steps and times, parameter counts, MB."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; build_sd3 writes a fresh folder")
    steps = AE_STEPS if ae_steps is None else ae_steps
    vocab, merges, (tok_l, tok_g, tok_t5) = tokenizers()

    with torch.random.fork_rng(devices=[]):
        encoders = [text_encoder(part, tok, seed) for part, tok in enumerate((tok_l, tok_g))]
        t5 = text_encoder(2, tok_t5, seed)
        _seeded(seed, 3)
        transformer = SD3Transformer2DModel(**TRANSFORMER).eval()
        _seeded(seed, 4)
        vae, ae_report = fit_autoencoder(seed, steps, log=log)

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
        text_encoder=encoders[0], tokenizer=tok_l, text_encoder_2=encoders[1], tokenizer_2=tok_g,
        text_encoder_3=t5, tokenizer_3=tok_t5)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        _write_clip_files(out_dir / sub, vocab, merges)

    def n_params(m) -> int:
        return sum(p.numel() for p in m.parameters())

    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    return {
        **ae_report,
        "params": {"vae": n_params(vae), "transformer": n_params(transformer),
                   "clip_l": n_params(encoders[0]), "clip_g": n_params(encoders[1]), "t5": n_params(t5)},
        "clip_vocab": len(vocab), "t5_vocab": len(tok_t5),
        "mb": round(size / 2**20, 2),
    }
