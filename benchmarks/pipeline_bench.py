"""Pipeline model stages against their bare models, and demo-scale `flowcurate run` wall times.

    # per stage: our RunInference handlers vs the bare torch call, real-size architectures, random weights
    OPENBLAS_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/pipeline_bench.py stages --models /tmp/pb/models
    # demo scale: 512 sample images, tiny models, in process vs 2 worker processes vs the bare stages
    OPENBLAS_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/pipeline_bench.py demo --data /tmp/pb/data --work /tmp/pb

`stages` builds (once, into --models; nothing is downloaded) random-weight models in the real on-disk
layouts: a diffusers-style SD3 folder (`vae/` with SD3's VAE config, `text_encoder/` CLIP-L,
`text_encoder_2/` CLIP-G, `text_encoder_3/` T5 at T5-v1.1-XXL width with --t5-layers of its 24 layers,
`tokenizer*/` built offline as `flowcurate.models.tiny.sd3` builds them), the SSCD ResNet-50 TorchScript of
`benchmarks/sscd_throughput_bench.py`, and a LLaVA-style VLM in the tiny captioner's layout at a larger
size (CLIP ViT-B/16 vision tower, a ~220M Llama, 32k vocabulary). Then, per stage, on the same inputs,
interleaved (bare, ours, bare, ours, ...) and reported as medians:

- sscd:    bare `model(x)` on pre-normalised (B, 3, 320, 320)  vs  `SSCDModelHandler.run_inference` on a
           `Chunk` of `Accepted` items carrying 320x320 uint8 `sscd` arrays;
- vae:     bare `vae.encode(x).latent_dist` on a pre-scaled float tensor  vs  `Autoencoder.encode` (uint8);
- text:    bare CLIP-L, CLIP-G (output_hidden_states) and T5 forwards on pre-tokenised ids  vs
           `TextEncoders.encode` (prompts);
- encode:  the whole `EncodeModelHandler.run_inference` on a `Chunk` of `Captioned` (AE + both caption
           variants through the three encoders)  vs  the bare AE + 2 x three encoder forwards;
- caption: bare `model.generate(**inputs)` on processor outputs made beforehand  vs
           `CaptionModelHandler.run_inference` on a chunk of (image, caption) pairs.
Each "ours" output is compared with the bare one (max |diff|, or equal captions).

`demo` times `python -m flowcurate.pipeline --input DATA/raw/*.tar --config tiny` as subprocesses in the modes
given (in process; `--direct_running_mode multi_processing --direct_num_workers 2`; each optionally with
OMP_NUM_THREADS=1), CPU seconds of the whole process tree (sampled from /proc, and the kernel's
RUSAGE_CHILDREN), interleaved with a `bare-tiny` subprocess: the tiny models' bare forwards over the
inputs the stages see in that run (SSCD on the exact-dedup survivors, captioner and AE + encoders on the
kept images, same batch sizes), i.e. the model work any runner has to do.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from common import machine  # benchmarks/ is on sys.path when run as a script

# ---------------------------------------------------------------------------------------------------------
# Real-size configs (random weights)

SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, act_fn="silu",
               sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, mid_block_add_attention=True,
               use_quant_conv=False, use_post_quant_conv=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu")
VLM_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=16, hidden_act="quick_gelu")  # CLIP ViT-B/16
VLM_TEXT = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                tie_word_embeddings=False)  # a ~220M Llama


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def build_models(out: Path, t5_layers: int, log=print) -> dict:
    """Write sd3/, sscd_r50.torchscript.pt and captioner/ into `out` (skipping parts already there)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from flowcurate.models.tiny.sd3 import (
        _write_clip_files,
        clip_bpe,
        clip_tokenizer,
        t5_tokenizer,
        vocabulary_words,
    )

    out.mkdir(parents=True, exist_ok=True)
    info_path = out / "models.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    sd3 = out / "sd3"
    torch.manual_seed(0)
    if not (sd3 / "vae").is_dir():
        from diffusers import AutoencoderKL

        log("[models] SD3 VAE ...")
        vae = AutoencoderKL(**SD3_VAE).eval()
        info["vae"] = {"params": n_params(vae), "encoder_params": n_params(vae.encoder), "config": SD3_VAE}
        vae.save_pretrained(sd3 / "vae")
        del vae
    words = vocabulary_words()
    vocab, merges = clip_bpe(words)
    toks = {"tokenizer": clip_tokenizer(vocab, merges), "tokenizer_2": clip_tokenizer(vocab, merges, pad_token="!"),
            "tokenizer_3": t5_tokenizer(words)}
    for sub, tok in toks.items():
        if not (sd3 / sub).is_dir():
            tok.save_pretrained(sd3 / sub)
            if sub != "tokenizer_3":
                _write_clip_files(sd3 / sub, vocab, merges)
    for sub, spec, tok in (("text_encoder", CLIP_L, toks["tokenizer"]), ("text_encoder_2", CLIP_G, toks["tokenizer_2"])):
        if not (sd3 / sub).is_dir():
            log(f"[models] {sub} ...")
            m = CLIPTextModelWithProjection(CLIPTextConfig(
                **spec, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
            info[sub] = {"params": n_params(m), "config": spec}
            m.save_pretrained(sd3 / sub)
            del m
            gc.collect()
    if not (sd3 / "text_encoder_3").is_dir():
        log(f"[models] text_encoder_3 (T5-XXL width, {t5_layers} of 24 layers) ...")
        tok = toks["tokenizer_3"]
        spec = {**T5_XXL, "num_layers": t5_layers}
        m = T5EncoderModel(T5Config(**spec, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                    decoder_start_token_id=0))
        info["text_encoder_3"] = {"params": n_params(m), "config": spec, "full_xxl_layers": 24}
        m.save_pretrained(sd3 / "text_encoder_3")
        del m
        gc.collect()
    info["tokenizers"] = {"clip_vocab": len(vocab), "t5_vocab": len(toks["tokenizer_3"])}
    sscd = out / "sscd_r50.torchscript.pt"
    if not sscd.is_file():
        from sscd_throughput_bench import SSCDResNet50

        log("[models] SSCD ResNet-50 ...")
        net = SSCDResNet50().eval()
        info["sscd"] = {"params": n_params(net)}
        torch.jit.script(net).save(str(sscd))
        del net
    cap = out / "captioner"
    if not (cap / "config.json").is_file():
        log("[models] captioner (LLaVA: CLIP ViT-B/16 + Llama) ...")
        info["captioner"] = build_vlm(cap)
    info_path.write_text(json.dumps(info, indent=1))
    return info


def build_vlm(out: Path) -> dict:
    """The tiny captioner's layout (LlavaProcessor with a CLIP image processor, a byte-level BPE, LLaVA-1.5's
    chat template; LlavaForConditionalGeneration) at ViT-B/16 + ~220M Llama size. The tokenizer is the tiny
    captioner's BPE, its vocabulary padded with unmergeable dummy tokens to the model's 32,000."""
    from tokenizers import Tokenizer
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    from flowcurate.models.tiny import captioner as tc

    small = tc.build_tokenizer(np.random.default_rng([0, 2]))
    js = json.loads(small.backend_tokenizer.to_str())
    vocab = js["model"]["vocab"]
    i = 0
    while len(vocab) < VLM_TEXT["vocab_size"]:
        s, k = "", i
        for _ in range(4):
            s, k = s + "abcdefghijklmnopqrstuvwxyz"[k % 26], k // 26
        tokstr = "\u0120zz" + s
        if tokstr not in vocab:
            vocab[tokstr] = len(vocab)
        i += 1
    bpe = Tokenizer.from_str(json.dumps(js))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": tc.IMAGE_TOKEN},
                                  padding_side="left", model_max_length=2048)
    image_processor = CLIPImageProcessorPil(size={"height": VLM_VISION["image_size"], "width": VLM_VISION["image_size"]},
                                            do_center_crop=False)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=VLM_VISION["patch_size"],
                               vision_feature_select_strategy="default", chat_template=tc.CHAT_TEMPLATE,
                               image_token=tc.IMAGE_TOKEN, num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VLM_VISION),
        text_config=LlamaConfig(**VLM_TEXT, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids(tc.IMAGE_TOKEN), vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    torch.manual_seed(1)
    model = LlavaForConditionalGeneration(config).eval()
    processor.save_pretrained(out)
    model.save_pretrained(out)
    info = {"params": n_params(model), "vision_params": n_params(model.model.vision_tower),
            "language_params": n_params(model.model.language_model) + n_params(model.lm_head),
            "vision": VLM_VISION, "text": VLM_TEXT, "tokenizer_vocab": len(tok)}
    del model
    gc.collect()
    return info


# ---------------------------------------------------------------------------------------------------------
# Inputs

def load_now() -> float:
    return round(os.getloadavg()[0], 2)


def images(n: int, side: int, seed: int) -> list[np.ndarray]:
    """Procedural RGB images of random size (256-768 px sides), centre-cropped and resized to side x side."""
    from PIL import Image

    from flowcurate.models.tiny import procedural

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(256, 769, 2))
        img, _ = procedural.random_image(rng, w, h)
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        out.append(np.asarray(img.resize((side, side), Image.Resampling.BICUBIC, box=box), dtype=np.uint8))
    return out


EXTRA = ("with soft shadows and a slightly blurred background, photographed from a low angle in warm evening "
         "light, high detail, sharp focus, vivid colors, centered composition").split()


def prompts(n: int, seed: int) -> list[str]:
    """Caption-like prompts of 10-90 words (some beyond CLIP's 77 tokens)."""
    from flowcurate.models.tiny.procedural import caption, random_scene

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = caption(random_scene(rng)).split()
        while len(words) < int(rng.integers(10, 90)):
            words += [EXTRA[int(j)] for j in rng.integers(0, len(EXTRA), 6)]
        out.append(" ".join(words))
    return out


def accepted(key: str, image: np.ndarray, sscd: np.ndarray | None = None, caption: str | None = None):
    from flowcurate.pipeline.stages import Accepted

    h, w = image.shape[:2]
    return Accepted(key, f"bench#{key}", caption, image, w, h, (0, 0, w, h), (h, w), "sha256:" + key, sscd)


# ---------------------------------------------------------------------------------------------------------
# Timing


def interleaved(fns: dict, reps: int, warmup: int = 1, log=print) -> dict:
    """fns: name -> zero-argument callable. Runs each `warmup` times, then `reps` rounds, alternating
    the order (bare, ours, ours, bare, bare, ours, ...). Returns name -> {wall, cpu, load} lists."""
    for _ in range(warmup if reps else 0):
        for fn in fns.values():
            fn()
    res = {name: {"wall": [], "cpu": [], "load": []} for name in fns}
    names = list(fns)
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):  # ABBA: drift hits both sides alike
            fn = fns[name]
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            res[name]["wall"].append(dt)
            res[name]["cpu"].append(dc)
            res[name]["load"].append(load_now())
            log(f"  rep {r} {name}: {dt:.2f} s wall, {dc:.2f} s CPU, load {load_now()}")
    return res


def host_work(fn, n: int = 5) -> float:
    """Median seconds of `fn`: the non-model work an "ours" path adds (the same calls our code makes)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def summarise(stage: str, items: int, unit: str, res: dict, extra: dict) -> dict:
    if not res["bare"]["wall"]:  # --reps 0: the checks and host work only
        return {"stage": stage, "items": items, "unit": unit, "reps": 0, **extra}
    mb, mo = statistics.median(res["bare"]["wall"]), statistics.median(res["ours"]["wall"])
    pair = [b / o for b, o in zip(res["bare"]["wall"], res["ours"]["wall"])]
    loads = res["bare"]["load"] + res["ours"]["load"]
    return {"stage": stage, "items": items, "unit": unit, "bare_s": mb, "ours_s": mo,
            "bare_per_s": items / mb, "ours_per_s": items / mo, "ratio": mb / mo,
            "pair_ratios": [round(p, 3) for p in pair],
            "cpu_ratio": statistics.median(res["bare"]["cpu"]) / statistics.median(res["ours"]["cpu"]),
            "cpu_util_bare": statistics.median(c / w for c, w in zip(res["bare"]["cpu"], res["bare"]["wall"])),
            "cpu_util_ours": statistics.median(c / w for c, w in zip(res["ours"]["cpu"], res["ours"]["wall"])),
            "load_min": min(loads), "load_max": max(loads), "reps": len(res["bare"]["wall"]), **extra,
            "raw": res}


# ---------------------------------------------------------------------------------------------------------
# Stages


def stage_sscd(models: Path, batch: int, reps: int, log) -> dict:
    from flowcurate.models.sscd import SSCDPreprocess
    from flowcurate.pipeline.chunks import Chunk
    from flowcurate.pipeline.neardup import SSCDModelHandler

    pre = SSCDPreprocess()
    handler = SSCDModelHandler(str(models / "sscd_r50.torchscript.pt"), pre, "cpu")
    model = handler.load_model()
    big = images(batch, 256, seed=1)  # the training-resolution image the item also carries
    from PIL import Image

    ss = [pre.resize(Image.fromarray(im).resize((480, 360))) for im in images(batch, 256, seed=2)]
    chunk = Chunk("g", 0, [accepted(f"{i:06d}", big[i], ss[i]) for i in range(batch)])
    x = torch.stack([pre.normalize(s) for s in ss])

    def bare():
        with torch.inference_mode():
            return model(x)

    def ours():
        return handler.run_inference([chunk], model)

    ref = torch.nn.functional.normalize(bare().float(), dim=-1).numpy()
    got = np.stack([e.vector for e in ours()[0]])
    out = bare()

    def host():  # SSCDModelHandler.run_inference and flowcurate.models.sscd.embed around the forward
        torch.stack([pre.normalize(a.sscd) for a in chunk.items])
        v = torch.nn.functional.normalize(out.float(), dim=-1).cpu().numpy()
        [a._replace(sscd=None) for a in chunk.items], [v[i] for i in range(len(v))]

    res = interleaved({"bare": bare, "ours": ours}, reps, log=log)
    return summarise("sscd", batch, "images", res, {"batch": batch, "input": "320x320", "host_s": host_work(host),
                                                    "max_abs_diff": float(np.abs(ref - got).max())})


def load_encoders(models: Path):
    from flowcurate.pipeline.encode import EncodeModelHandler

    handler = EncodeModelHandler(str(models / "sd3"), t5_length=77, device="cpu")
    return handler, handler.load_model()


def stage_vae(m, batch: int, side: int, reps: int, log) -> dict:
    ae = m.ae
    ims = images(batch, side, seed=3)
    x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def bare():
        with torch.inference_mode():
            return ae.vae.encode(x).latent_dist

    def ours():
        return ae.encode(ims)

    d = bare()
    mean, logvar = ours()
    diff = max(float(np.abs(d.mean.numpy() - mean).max()), float(np.abs(d.logvar.numpy() - logvar).max()))
    def host():  # Autoencoder.encode around vae.encode
        xx = torch.from_numpy(np.ascontiguousarray(np.stack(ims)))
        xx.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
        d.mean.float().cpu().numpy(), d.logvar.float().cpu().numpy()

    res = interleaved({"bare": bare, "ours": ours}, reps, log=log)
    return summarise("vae", batch, "images", res, {"batch": batch, "input": f"{side}x{side}", "max_abs_diff": diff,
                                                    "host_s": host_work(host)})


def _bare_text(te, texts: list[str]):
    """Token ids made beforehand, exactly as TextEncoders._ids pads and truncates."""
    from flowcurate.models.text_encoders import CLIP_LENGTH

    ids = {}
    for role in ("clip_l", "clip_g", "t5"):
        length = CLIP_LENGTH if role != "t5" else te.t5_length
        ids[role] = te.tokenizers[role](texts, padding="max_length", max_length=length, truncation=True,
                                        return_tensors="pt").input_ids

    def forward():
        enc = te.encoders
        return (enc["clip_l"](ids["clip_l"], output_hidden_states=True),
                enc["clip_g"](ids["clip_g"], output_hidden_states=True),
                enc["t5"](ids["t5"]))
    return forward


def stage_text(m, batch: int, reps: int, log) -> dict:
    te = m.te
    texts = prompts(batch, seed=4)
    fwd = _bare_text(te, texts)

    def bare():
        with torch.inference_mode():
            return fwd()

    def ours():
        return te.encode(texts)

    cl, cg, t5 = bare()
    got = ours()
    diff = max(float(np.abs(cl.hidden_states[-2].numpy() - got["clip_l"]).max()),
               float(np.abs(cg.text_embeds.numpy() - got["clip_g_pooled"]).max()),
               float(np.abs(t5[0].numpy() - got["t5"]).max()))
    # where the bare time goes (one pass each, for the table's notes)
    parts = {}
    ids = {r: te._ids(r, texts, 77)[0] for r in ("clip_l", "clip_g", "t5")}
    with torch.inference_mode():
        for role in ("clip_l", "clip_g", "t5"):
            t0 = time.perf_counter()
            if role == "t5":
                te.encoders[role](ids[role])
            else:
                te.encoders[role](ids[role], output_hidden_states=True)
            parts[role] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    for role in ("clip_l", "clip_g", "t5"):
        te._ids(role, texts, 77)
    tokenise = time.perf_counter() - t0
    def host():  # TextEncoders.encode around the three forwards: tokenising (twice per role) + numpy copies
        for role in ("clip_l", "clip_g", "t5"):
            te._ids(role, texts, 77)
        cl.hidden_states[-2].float().cpu().numpy(), cl.text_embeds.float().cpu().numpy()
        cg.hidden_states[-2].float().cpu().numpy(), cg.text_embeds.float().cpu().numpy()
        t5[0].float().cpu().numpy()

    res = interleaved({"bare": bare, "ours": ours}, reps, log=log)
    return summarise("text", batch, "prompts", res, {"batch": batch, "input": "77 tokens (T5 77)",
                                                      "max_abs_diff": diff, "bare_parts_s": parts,
                                                      "tokenise_s": round(tokenise, 4), "host_s": host_work(host)})


def stage_encode(m, handler, batch: int, side: int, reps: int, log) -> dict:
    from flowcurate.pipeline.chunks import Chunk
    from flowcurate.pipeline.encode import Captioned, Kept

    ims = images(batch, side, seed=5)
    orig, syn = prompts(batch, seed=6), prompts(batch, seed=7)
    items = [Captioned(Kept(accepted(f"{i:06d}", ims[i], caption=orig[i]), 0, "train-000000.tar"), orig[i], syn[i], ())
             for i in range(batch)]
    chunk = Chunk("train-000000.tar", 0, items)
    x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    f_orig, f_syn = _bare_text(m.te, orig), _bare_text(m.te, syn)

    def bare():
        with torch.inference_mode():
            return m.ae.vae.encode(x).latent_dist, f_orig(), f_syn()

    def ours():
        return handler.run_inference([chunk], m)

    d, (_, _, t5o), _ = bare()
    enc = ours()[0]
    diff = max(float(np.abs(d.mean.numpy() - np.stack([e.latent_mean for e in enc])).max()),
               float(np.abs(t5o[0].numpy() - np.stack([e.encodings["orig"]["t5"] for e in enc])).max()))

    def host():  # encode_chunk around the forwards: AE input conversion, tokenising, numpy copies, Encoded
        xx = torch.from_numpy(np.ascontiguousarray(np.stack(ims)))
        xx.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
        d.mean.float().cpu().numpy(), d.logvar.float().cpu().numpy()
        for texts in (orig, syn):
            for role in ("clip_l", "clip_g", "t5"):
                m.te._ids(role, texts, 77)
        for e in enc:  # the per-item slicing encode_chunk does
            {v: dict(e.encodings[v]) for v in e.encodings}

    res = interleaved({"bare": bare, "ours": ours}, reps, log=log)
    return summarise("encode", batch, "images", res, {"batch": batch, "input": f"{side}x{side} + 2 captions",
                                                       "host_s": host_work(host),
                                                       "max_abs_diff": diff})


def stage_caption(models: Path, batch: int, max_new_tokens: int, side: int, reps: int, log) -> dict:
    from flowcurate.captioning.captioner import _to_pil
    from flowcurate.captioning.cleanup import clean_caption
    from flowcurate.captioning.handler import CaptionModelHandler

    handler = CaptionModelHandler(str(models / "captioner"), max_new_tokens=max_new_tokens, batch_size=batch,
                                  device="cpu")
    cap = handler.load_model()
    ims = images(batch, side, seed=8)
    chunk = [(im, t) for im, t in zip(ims, prompts(batch, seed=9))]
    inputs = cap.processor(images=[_to_pil(im) for im in ims], text=[cap.text] * batch, return_tensors="pt",
                           padding=True)

    def bare():
        return cap.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)

    def ours():
        return list(handler.run_inference([chunk], cap))

    out = bare()
    texts = cap.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    got = ours()[0]
    same = all((clean_caption(t) or o) == g.text for t, o, g in zip(texts, (c for _, c in chunk), got))
    new_tokens = int(out.shape[1] - inputs["input_ids"].shape[1])
    def host():  # Captioner.generate / caption around model.generate
        pil = [_to_pil(im) for im, _ in chunk]
        cap.processor(images=pil, text=[cap.text] * batch, return_tensors="pt", padding=True)
        [clean_caption(t) for t in cap.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                                skip_special_tokens=True)]

    res = interleaved({"bare": bare, "ours": ours}, reps, log=log)
    return summarise("caption", batch, "images", res, {"host_s": host_work(host),
        "batch": batch, "input": f"{side}x{side} -> 224x224, {inputs['input_ids'].shape[1]} prompt tokens",
        "max_new_tokens": max_new_tokens, "generated_tokens": new_tokens, "same_captions": same})


def cmd_stages(args) -> int:
    log = print
    print(f"machine: {machine()}")
    print(f"torch.get_num_threads() = {torch.get_num_threads()}, load {os.getloadavg()}")
    models = Path(args.models) if args.models else Path(tempfile.mkdtemp(prefix="pbench-models-"))
    t0 = time.perf_counter()
    info = build_models(models, args.t5_layers, log=log)
    print(f"models in {models} ({time.perf_counter() - t0:.0f} s): "
          + json.dumps({k: v.get("params") for k, v in info.items() if isinstance(v, dict) and "params" in v}))
    results = []
    wanted = args.stages
    if "sscd" in wanted:
        print(f"== sscd (batch {args.sscd_batch})")
        results.append(stage_sscd(models, args.sscd_batch, args.reps, log))
    if {"vae", "text", "encode"} & set(wanted):
        handler, m = load_encoders(models)
        if "vae" in wanted:
            print(f"== vae (batch {args.vae_batch}, {args.side}x{args.side})")
            results.append(stage_vae(m, args.vae_batch, args.side, args.reps, log))
        if "text" in wanted:
            print(f"== text encoders (batch {args.text_batch})")
            results.append(stage_text(m, args.text_batch, args.text_reps or args.reps, log))
        if "encode" in wanted:
            print(f"== encode handler (chunk {args.encode_batch})")
            results.append(stage_encode(m, handler, args.encode_batch, args.side, args.encode_reps or args.reps, log))
        del handler, m
        gc.collect()
    if "caption" in wanted:
        print(f"== caption (batch {args.caption_batch}, max_new_tokens {args.max_new_tokens})")
        results.append(stage_caption(models, args.caption_batch, args.max_new_tokens, args.side, args.reps, log))
    print()
    print("| stage | batch | input | bare s | ours s | bare items/s | ours items/s | ours / bare | "
          "per-pair ratios | ours / bare (CPU s) | CPU util bare / ours | load (1 min) | host work ms | max diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if not r["reps"]:
            print(f"| {r['stage']} | {r['batch']} | {r['input']} | | | | | | | | | | "
                  f"{r['host_s'] * 1000:.0f} | |")
            continue
        diff = r.get("max_abs_diff", "same" if r.get("same_captions") else "DIFFERENT")
        diff = f"{diff:.1e}" if isinstance(diff, float) else diff
        host = f"{r['host_s'] * 1000:.0f}" if "host_s" in r else "–"
        print(f"| {r['stage']} | {r['batch']} | {r['input']} | {r['bare_s']:.2f} | {r['ours_s']:.2f} | "
              f"{r['bare_per_s']:.2f} | {r['ours_per_s']:.2f} | {r['ratio']:.3f} | "
              f"{', '.join(f'{p:.2f}' for p in r['pair_ratios'])} | {r['cpu_ratio']:.3f} | {r['cpu_util_bare']:.2f} / {r['cpu_util_ours']:.2f} | "
              f"{r['load_min']:.1f}-{r['load_max']:.1f} | {host} | {diff} |")
    for r in results:
        extra = {k: r[k] for k in ("bare_parts_s", "tokenise_s", "generated_tokens", "max_new_tokens") if k in r}
        if extra:
            print(f"* {r['stage']}: {json.dumps(extra)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "threads": torch.get_num_threads(),
                                               "models": info, "results": results}, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------------------
# Demo scale

MODES = {
    "inproc": ([], {}),
    "mp2": (["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"], {}),
    "inproc-omp1": ([], {"OMP_NUM_THREADS": "1"}),
    "mp2-omp1": (["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"], {"OMP_NUM_THREADS": "1"}),
    # not runs: the tiny models' bare forwards over the first run's stage inputs (`bare-tiny`)
    "bare": (None, {}),
    "bare-omp1": (None, {"OMP_NUM_THREADS": "1"}),
}


def _tree_cpu(root: int, seen: dict) -> None:
    """Add the CPU ticks of `root` and its live descendants to `seen` (pid -> latest ticks)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(d), int(f[1])
        children.setdefault(ppid, []).append(pid)
        stats[pid] = int(f[11]) + int(f[12])  # utime + stime (ticks)
    todo = [root]
    while todo:
        p = todo.pop()
        if p in stats:
            seen[p] = max(seen.get(p, 0), stats[p])
        todo += children.get(p, [])


def run_measured(cmd: list[str], env: dict, log_path: Path) -> dict:
    """Run cmd; wall seconds, CPU seconds of the process tree (sampled from /proc every 0.2 s, and
    RUSAGE_CHILDREN: descendants that were waited for), processes seen, load before/after."""
    import resource

    load0 = load_now()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    seen: dict[int, int] = {}
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                _tree_cpu(proc.pid, seen)
                stop.wait(0.2)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        stop.set()
        th.join()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    tick = os.sysconf("SC_CLK_TCK")
    rus = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"rc": rc, "wall_s": wall, "cpu_s_proc": sum(seen.values()) / tick, "cpu_s_rusage": rus,
            "processes": len(seen), "load_before": load0, "load_after": load_now()}


def cmd_demo(args) -> int:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    base_env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    base_env.pop("OMP_NUM_THREADS", None)
    threads = {}
    for omp in (None, "1"):
        env = dict(base_env, **({"OMP_NUM_THREADS": omp} if omp else {}))
        threads[omp or "unset"] = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                                 env=env, capture_output=True, text=True).stdout.strip()
    print(f"torch threads in a fresh process: OMP_NUM_THREADS unset -> {threads['unset']}, =1 -> {threads['1']}")
    pattern = f"{args.data.rstrip('/')}/raw/*.tar"
    runs: dict[str, list] = {m: [] for m in args.modes}
    first_run = next(m for m in args.modes if MODES[m][0] is not None)
    for rep in range(args.reps):
        order = list(args.modes) if rep % 2 == 0 else list(reversed(args.modes))
        if rep == 0:  # a run first: its manifest says which inputs each stage sees
            order.remove(first_run)
            order.insert(0, first_run)
        for mode in order:
            flags, extra_env = MODES[mode]
            if flags is None:
                manifest = work / f"out-{first_run}" / "manifest"
                out_json = work / f"{mode}-{rep}.json"
                m = run_measured([sys.executable, __file__, "bare-tiny", "--data", args.data, "--manifest",
                                  str(manifest), "--json", str(out_json)], dict(base_env, **extra_env),
                                 work / f"{mode}-{rep}.log")
                m["stages"] = json.loads(out_json.read_text()) if m["rc"] == 0 else None
                runs[mode].append(m)
                print(f"rep {rep} {mode}: {json.dumps(m)}", flush=True)
                continue
            out = work / f"out-{mode}"
            cmd = [sys.executable, "-m", "flowcurate.pipeline", "--input", pattern, "--output", str(out), "--config", "tiny",
                   "--overwrite", *flags]
            m = run_measured(cmd, dict(base_env, **extra_env), work / f"{mode}-{rep}.log")
            stats = json.loads((out / "stats.json").read_text()) if m["rc"] == 0 else {}
            m["status"] = stats.get("status")
            runs[mode].append(m)
            print(f"rep {rep} {mode}: {json.dumps(m)}", flush=True)
    print()
    print("| mode | runs | wall s (median) | walls | CPU s (tree, median) | CPU util (CPU / wall) | processes | "
          "load before-after |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, ms in runs.items():
        if not ms:
            continue
        wall = statistics.median(m["wall_s"] for m in ms)
        cpu = statistics.median(max(m["cpu_s_proc"], m["cpu_s_rusage"]) for m in ms)
        loads = ", ".join(f"{m['load_before']:.1f}-{m['load_after']:.1f}" for m in ms)
        walls = ", ".join(f"{m['wall_s']:.1f}" for m in ms)
        print(f"| {mode} | {len(ms)} | {wall:.1f} | {walls} | {cpu:.1f} | "
              f"{cpu / wall:.2f} | {max(m['processes'] for m in ms)} | {loads} |")
    for mode, ms in runs.items():
        bare = [m["stages"] for m in ms if m.get("stages")]
        if bare:
            keys = bare[0]["stages"].keys()
            print(f"{mode} (torch threads {bare[0]['torch_threads']}), stage wall s (median): " + ", ".join(
                f"{k} {statistics.median(b['stages'][k]['wall_s'] for b in bare):.1f}" for k in keys)
                + f"; sum {statistics.median(b['sum_wall_s'] for b in bare):.1f} wall, "
                f"{statistics.median(b['sum_cpu_s'] for b in bare):.1f} CPU; items "
                + ", ".join(f"{k} {bare[0]['stages'][k]['items']}" for k in keys))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "torch_threads": threads, "runs": runs},
                                              indent=1))
    return 0


def cmd_bare_tiny(args) -> int:
    """The tiny models' bare forwards over the inputs each stage of a run saw (from its manifest)."""
    import pyarrow.parquet as pq
    from PIL import Image

    from flowcurate.captioning.captioner import _to_pil
    from flowcurate.formats.config import load_config
    from flowcurate.formats.images import ImageRejected
    from flowcurate.models.sscd import SSCDPreprocess
    from flowcurate.models.text_encoders import CLIP_LENGTH
    from flowcurate.models.tiny import cache_dir, ensure_tiny_models
    from flowcurate.pipeline.read import read_tar
    from flowcurate.pipeline.validate import validate

    if not (cache_dir(0) / "tiny_report.json").is_file():
        raise SystemExit(f"tiny models not built for this code ({cache_dir(0)}); refusing to build them here")
    tiny = ensure_tiny_models(0)
    cfg = load_config("tiny")
    pc, dd = cfg.pipeline, cfg.dedup
    pre = SSCDPreprocess(dd.sscd_size, tuple(dd.mean), tuple(dd.std))
    rows = pq.read_table(args.manifest).to_pylist()
    kept = {r["key"]: r for r in rows if r["status"] == "kept"}
    t_read = time.perf_counter()
    valid = {}
    for tar in sorted(Path(args.data, "raw").glob("*.tar")):
        for item in read_tar(str(tar)):
            if item.reason is not None:
                continue
            try:
                valid[item.key] = validate(item.image, resolution=pc.resolution, min_size=pc.min_size,
                                           max_aspect=pc.max_aspect, max_pixels=pc.max_pixels, sscd=pre)
            except ImageRejected:
                pass
    first: dict[str, str] = {}
    for key in sorted(valid, key=lambda k: (-valid[k].width * valid[k].height, k)):
        first.setdefault(valid[key].pixel_hash, key)
    sscd_keys = sorted(first.values())  # exact-dedup survivors: what the SSCD stage embeds
    kept_keys = sorted(kept)
    read_s = time.perf_counter() - t_read

    def batches(keys, n):
        return [keys[i:i + n] for i in range(0, len(keys), n)]

    stages = {}
    # SSCD
    from flowcurate.models.sscd import load_sscd

    sscd = load_sscd(tiny / "sscd.torchscript.pt")
    xs = [torch.stack([pre.normalize(valid[k].sscd) for k in b]) for b in batches(sscd_keys, pc.batch_size)]
    with torch.inference_mode():
        sscd(xs[0])
        t0, c0 = time.perf_counter(), time.process_time()
        for x in xs:
            sscd(x)
    stages["sscd"] = {"items": len(sscd_keys), "calls": len(xs), "wall_s": time.perf_counter() - t0,
                      "cpu_s": time.process_time() - c0}
    # captioner
    from flowcurate.captioning.captioner import Captioner

    cap = Captioner.load(str(tiny / "captioner"), max_new_tokens=pc.caption_max_new_tokens,
                         batch_size=pc.caption_batch_size)
    ins = [cap.processor(images=[_to_pil(valid[k].image) for k in b], text=[cap.text] * len(b), return_tensors="pt",
                         padding=True) for b in batches(kept_keys, pc.caption_batch_size)]
    cap.model.generate(**ins[0], max_new_tokens=pc.caption_max_new_tokens, do_sample=False, num_beams=1)
    t0, c0 = time.perf_counter(), time.process_time()
    for x in ins:
        cap.model.generate(**x, max_new_tokens=pc.caption_max_new_tokens, do_sample=False, num_beams=1)
    stages["caption"] = {"items": len(kept_keys), "calls": len(ins), "wall_s": time.perf_counter() - t0,
                         "cpu_s": time.process_time() - c0}
    # AE + text encoders (both caption variants)
    from flowcurate.models.autoencoder import Autoencoder
    from flowcurate.models.text_encoders import TextEncoders

    ae = Autoencoder.load(str(tiny / "sd3"))
    te = TextEncoders.load(str(tiny / "sd3"), t5_length=pc.t5_max_length)
    enc_in = []
    for b in batches(kept_keys, pc.batch_size):
        x = torch.from_numpy(np.stack([valid[k].image for k in b])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        ids = []
        for v in ("caption_synthetic", "caption_original"):
            texts = [kept[k][v] or kept[k]["caption_synthetic"] or "" for k in b]
            ids.append({r: te.tokenizers[r](texts, padding="max_length", truncation=True, return_tensors="pt",
                                            max_length=CLIP_LENGTH if r != "t5" else pc.t5_max_length).input_ids
                        for r in ("clip_l", "clip_g", "t5")})
        enc_in.append((x, ids))

    def encode(x, ids):
        _ = ae.vae.encode(x).latent_dist
        for i in ids:
            te.encoders["clip_l"](i["clip_l"], output_hidden_states=True)
            te.encoders["clip_g"](i["clip_g"], output_hidden_states=True)
            te.encoders["t5"](i["t5"])

    with torch.inference_mode():
        encode(*enc_in[0])
        t0, c0 = time.perf_counter(), time.process_time()
        for x, ids in enc_in:
            encode(x, ids)
    stages["encode"] = {"items": len(kept_keys), "calls": len(enc_in), "wall_s": time.perf_counter() - t0,
                        "cpu_s": time.process_time() - c0}
    doc = {"torch_threads": torch.get_num_threads(), "read_validate_s": read_s, "stages": stages,
           "sum_wall_s": sum(s["wall_s"] for s in stages.values()),
           "sum_cpu_s": sum(s["cpu_s"] for s in stages.values())}
    print(json.dumps(doc, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(doc))
    del Image
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stages", help="our model handlers vs the bare models (real-size, random weights)")
    s.add_argument("--models", help="folder for the random-weight models (built once; default: a temp folder)")
    s.add_argument("--stages", nargs="+", default=["sscd", "vae", "text", "encode", "caption"],
                   choices=["sscd", "vae", "text", "encode", "caption"])
    s.add_argument("--reps", type=int, default=5,
                   help="interleaved bare/ours rounds (medians reported); 0: output checks and host work only")
    s.add_argument("--text-reps", type=int, help="rounds for the text stage (default --reps)")
    s.add_argument("--encode-reps", type=int, help="rounds for the encode stage (default --reps)")
    s.add_argument("--t5-layers", type=int, default=2, help="T5-XXL-width layers (the real model has 24)")
    s.add_argument("--sscd-batch", type=int, default=16)
    s.add_argument("--vae-batch", type=int, default=4)
    s.add_argument("--text-batch", type=int, default=16)
    s.add_argument("--encode-batch", type=int, default=8)
    s.add_argument("--caption-batch", type=int, default=4)
    s.add_argument("--max-new-tokens", type=int, default=20)
    s.add_argument("--side", type=int, default=256, help="training resolution (AE input, captioner input)")
    s.add_argument("--json")
    s.set_defaults(fn=cmd_stages)
    d = sub.add_parser("demo", help="flowcurate run at demo scale: local runner modes vs the bare tiny stages")
    d.add_argument("--data", required=True, help="folder written by `flowcurate sample-data` (DATA/raw/*.tar)")
    d.add_argument("--work", required=True, help="folder for outputs and logs")
    d.add_argument("--modes", nargs="+", default=["inproc", "mp2", "bare"], choices=list(MODES),
                   help="runs (inproc, mp2, ...-omp1: OMP_NUM_THREADS=1) and bare-tiny measurements (bare, "
                        "bare-omp1), interleaved, order reversed every other rep")
    d.add_argument("--reps", type=int, default=2)
    d.add_argument("--json")
    d.set_defaults(fn=cmd_demo)
    b = sub.add_parser("bare-tiny", help="the tiny models' bare forwards over a run's stage inputs")
    b.add_argument("--data", required=True)
    b.add_argument("--manifest", required=True, help="OUT/manifest of a run on --data")
    b.add_argument("--json")
    b.set_defaults(fn=cmd_bare_tiny)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
