"""Pipeline model stages against their bare models, and demo-scale `flowcurate run` wall times.

    # per stage: our RunInference handlers vs the bare torch call, real-size architectures, random weights
    OPENBLAS_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/pipeline_bench.py stages --models /tmp/pb/models
    # demo scale: 512 sample images, tiny models, in process vs 2 worker processes vs the bare stages
    OPENBLAS_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/pipeline_bench.py demo --data /tmp/pb/data --work /tmp/pb

`stages` builds (once, into --models; nothing is downloaded) random-weight models in the real on-disk
layouts with models/tiny's builders at real sizes: a diffusers-style SD3 folder (`vae/` with SD3's VAE
config, `text_encoder/` CLIP-L, `text_encoder_2/` CLIP-G, `text_encoder_3/` T5 at T5-v1.1-XXL width with
--t5-layers of its 24 layers, the tiny `tokenizer*/`), the SSCD ResNet-50 TorchScript of
`benchmarks/sscd_throughput_bench.py`, and the tiny captioner's LLaVA layout at CLIP ViT-B/16 + a ~220M
Llama (32k vocabulary). Then, per stage, on the same inputs, interleaved (bare, ours, ours, bare, ...),
medians reported:

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

`demo` times `python -m flowcurate.pipeline --input DATA/raw/*.tar --config tiny` as subprocesses in the
modes given (in process; `--direct_running_mode multi_processing --direct_num_workers 2`; -omp1:
OMP_NUM_THREADS=1), CPU seconds of the whole process tree (sampled from /proc, and RUSAGE_CHILDREN),
interleaved with `bare-tiny` subprocesses: the tiny models' bare forwards over the inputs the stages saw
in the first run (SSCD on the exact-dedup survivors, captioner and AE + encoders on the kept images, same
batch sizes), i.e. the model work any runner has to do.
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
import time
from pathlib import Path

import numpy as np
import torch
from common import load_now, machine, run_measured  # benchmarks/ is on sys.path when run as a script

from flowcurate.models.tiny import sd3 as tiny_sd3

# ---------------------------------------------------------------------------------------------------------
# Real sizes (random weights)

SD3_VAE = {**tiny_sd3.VAE, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
           "norm_num_groups": 32, "sample_size": 1024, "mid_block_add_attention": True}
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
    from diffusers import AutoencoderKL

    out.mkdir(parents=True, exist_ok=True)
    info_path, sd3 = out / "models.json", out / "sd3"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    vocab, merges, toks = tiny_sd3.tokenizers()
    info["tokenizers"] = {"clip_vocab": len(vocab), "t5_vocab": len(toks[2])}
    for i, sub in enumerate(("tokenizer", "tokenizer_2", "tokenizer_3")):
        if not (sd3 / sub).is_dir():
            toks[i].save_pretrained(sd3 / sub)
            if i < 2:
                tiny_sd3._write_clip_files(sd3 / sub, vocab, merges)
    specs = {"vae": SD3_VAE, "text_encoder": CLIP_L, "text_encoder_2": CLIP_G,
             "text_encoder_3": {**T5_XXL, "num_layers": t5_layers}}  # the real T5-XXL has 24 layers
    for i, (sub, spec) in enumerate(specs.items()):
        if not (sd3 / sub).is_dir():
            log(f"[models] {sub} ...")
            torch.manual_seed(0)
            m = AutoencoderKL(**spec) if sub == "vae" else tiny_sd3.text_encoder(i - 1, toks[i - 1], spec=spec)
            info[sub] = {"params": n_params(m), "config": spec}
            m.save_pretrained(sd3 / sub)
            del m
            gc.collect()
    if not (sscd := out / "sscd_r50.torchscript.pt").is_file():
        from sscd_throughput_bench import SSCDResNet50

        log("[models] SSCD ResNet-50 ...")
        net = SSCDResNet50().eval()
        info["sscd"] = {"params": n_params(net)}
        torch.jit.script(net).save(str(sscd))
    if not (out / "captioner" / "config.json").is_file():
        log("[models] captioner (LLaVA: CLIP ViT-B/16 + Llama) ...")
        info["captioner"] = build_vlm(out / "captioner")
    info_path.write_text(json.dumps(info, indent=1))
    return info


def build_vlm(out: Path) -> dict:
    """The tiny captioner (models/tiny/captioner.py) at VLM_VISION + VLM_TEXT size; its byte-level BPE's
    vocabulary is padded with unmergeable dummy tokens to the model's 32,000 (text tokenises the same)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from flowcurate.models.tiny import captioner as tc

    js = json.loads(tc.build_tokenizer(np.random.default_rng([0, 2])).backend_tokenizer.to_str())
    vocab, i = js["model"]["vocab"], 0
    while len(vocab) < VLM_TEXT["vocab_size"]:
        vocab.setdefault("\u0120zz" + "".join(chr(97 + i // 26**j % 26) for j in range(4)), len(vocab))
        i += 1
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(js)), bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>", pad_token="<pad>", padding_side="left",
                                  extra_special_tokens={"image_token": tc.IMAGE_TOKEN}, model_max_length=2048)
    torch.manual_seed(1)
    model = tc.build_model(tok, VLM_VISION, VLM_TEXT).eval()
    tc.build_processor(tok, VLM_VISION).save_pretrained(out)
    model.save_pretrained(out)
    info = {"params": n_params(model), "vision_params": n_params(model.model.vision_tower),
            "language_params": n_params(model.model.language_model) + n_params(model.lm_head),
            "vision": VLM_VISION, "text": VLM_TEXT, "tokenizer_vocab": len(tok)}
    del model
    gc.collect()
    return info


# ---------------------------------------------------------------------------------------------------------
# Inputs

def images(n: int, side: int, seed: int) -> list[np.ndarray]:
    """Procedural RGB images of random size (256-768 px sides), centre-cropped and resized to side x side."""
    from PIL import Image

    from flowcurate.models.tiny import procedural

    rng, out = np.random.default_rng(seed), []
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

    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        words = caption(random_scene(rng)).split()
        while len(words) < int(rng.integers(10, 90)):
            words += [EXTRA[int(j)] for j in rng.integers(0, len(EXTRA), 6)]
        out.append(" ".join(words))
    return out


def pixels(ims: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------------
# Timing


def compare(stage: str, items: int, unit: str, bare, ours, host, reps: int, **extra) -> dict:
    """bare() and ours() once each to warm up, then `reps` rounds alternating their order (bare, ours, ours,
    bare, ...: drift hits both alike), medians; host(): the non-model work an "ours" path adds (the same
    calls our code makes), median of 5. reps 0: the checks and host work only."""
    fns = {"bare": bare, "ours": ours}
    res = {name: {"wall": [], "cpu": [], "load": []} for name in fns}
    for fn in fns.values() if reps else ():
        fn()
    for r in range(reps):
        for name in (("bare", "ours") if r % 2 == 0 else ("ours", "bare")):
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            for k, v in (("wall", dt), ("cpu", dc), ("load", load_now())):
                res[name][k].append(v)
            print(f"  rep {r} {name}: {dt:.2f} s wall, {dc:.2f} s CPU, load {load_now()}")
    host_s = []
    for _ in range(5):
        t0 = time.perf_counter()
        host()
        host_s.append(time.perf_counter() - t0)
    out = {"stage": stage, "items": items, "unit": unit, "reps": reps, "host_s": statistics.median(host_s), **extra}
    if not reps:
        return out
    (bw, bc), (ow, oc) = ((res[n]["wall"], res[n]["cpu"]) for n in fns)
    mb, mo, loads = statistics.median(bw), statistics.median(ow), res["bare"]["load"] + res["ours"]["load"]
    return {**out, "bare_s": mb, "ours_s": mo, "bare_per_s": items / mb, "ours_per_s": items / mo, "ratio": mb / mo,
            "pair_ratios": [round(b / o, 3) for b, o in zip(bw, ow)],
            "cpu_ratio": statistics.median(bc) / statistics.median(oc),
            "cpu_util_bare": statistics.median(c / w for c, w in zip(bc, bw)),
            "cpu_util_ours": statistics.median(c / w for c, w in zip(oc, ow)),
            "load_min": min(loads), "load_max": max(loads), "raw": res}


# ---------------------------------------------------------------------------------------------------------
# Stages: each (args, models folder, (EncodeModelHandler, its loaded models) or None, reps) -> compare()

STAGES = ["sscd", "vae", "text", "encode", "caption"]


def stage_sscd(args, models: Path, enc, reps: int) -> dict:
    from PIL import Image

    from flowcurate.models.sscd import SSCDPreprocess
    from flowcurate.pipeline.handlers import SSCDModelHandler

    n, pre = args.sscd_batch, SSCDPreprocess()
    handler = SSCDModelHandler(str(models / "sscd_r50.torchscript.pt"), pre, "cpu")
    model = handler.load_model()
    ss = [pre.resize(Image.fromarray(im).resize((480, 360))) for im in images(n, 256, seed=2)]
    x = torch.stack([pre.normalize(s) for s in ss])

    def bare():
        with torch.inference_mode():
            return model(x)

    def ours():
        return next(handler.run_inference([ss], model))

    out = bare()
    diff = float(np.abs(torch.nn.functional.normalize(out.float(), dim=-1).numpy() - ours()).max())

    def host():  # SSCDModelHandler.run_inference and flowcurate.models.sscd.embed around the forward
        torch.stack([pre.normalize(p) for p in ss])
        torch.nn.functional.normalize(out.float(), dim=-1).cpu().numpy()

    return compare("sscd", n, "images", bare, ours, host, reps, batch=n, input="320x320", max_abs_diff=diff)


def stage_vae(args, models: Path, enc, reps: int) -> dict:
    n, ae = args.vae_batch, enc[1].ae
    ims = images(n, args.side, seed=3)
    x = pixels(ims)

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

    return compare("vae", n, "images", bare, ours, host, reps, batch=n, input=f"{args.side}x{args.side}",
                   max_abs_diff=diff)


def _bare_text(te, texts: list[str]):
    """The three encoder forwards on token ids made beforehand, exactly as TextEncoders._ids pads and truncates."""
    from flowcurate.models.text_encoders import CLIP_LENGTH

    ids = {r: te.tokenizers[r](texts, padding="max_length", max_length=te.t5_length if r == "t5" else CLIP_LENGTH,
                               truncation=True, return_tensors="pt").input_ids for r in ("clip_l", "clip_g", "t5")}

    def forward():
        e = te.encoders
        return (e["clip_l"](ids["clip_l"], output_hidden_states=True),
                e["clip_g"](ids["clip_g"], output_hidden_states=True), e["t5"](ids["t5"]))
    return forward


def stage_text(args, models: Path, enc, reps: int) -> dict:
    n, te = args.text_batch, enc[1].te
    texts = prompts(n, seed=4)
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

    def host():  # TextEncoders.encode around the three forwards: tokenising (twice per role) + numpy copies
        for role in ("clip_l", "clip_g", "t5"):
            te._ids(role, texts, 77)
        cl.hidden_states[-2].float().cpu().numpy(), cl.text_embeds.float().cpu().numpy()
        cg.hidden_states[-2].float().cpu().numpy(), cg.text_embeds.float().cpu().numpy()
        t5[0].float().cpu().numpy()

    return compare("text", n, "prompts", bare, ours, host, reps, batch=n, input="77 tokens (T5 77)",
                   max_abs_diff=diff)


def stage_encode(args, models: Path, enc, reps: int) -> dict:
    from flowcurate.pipeline.handlers import EncodeInput

    (handler, m), n = enc, args.encode_batch
    ims = images(n, args.side, seed=5)
    orig, syn = prompts(n, seed=6), prompts(n, seed=7)
    chunk = [EncodeInput(ims[i], orig[i], syn[i]) for i in range(n)]
    x = pixels(ims)
    f_orig, f_syn = _bare_text(m.te, orig), _bare_text(m.te, syn)

    def bare():
        with torch.inference_mode():
            return m.ae.vae.encode(x).latent_dist, f_orig(), f_syn()

    def ours():
        return next(handler.run_inference([chunk], m))

    d, (_, _, t5o), _ = bare()
    got = ours()
    diff = max(float(np.abs(d.mean.numpy() - np.stack([e.latent_mean for e in got])).max()),
               float(np.abs(t5o[0].numpy() - np.stack([e.encodings["orig"]["t5"] for e in got])).max()))

    def host():  # encode_chunk around the forwards: AE input conversion, tokenising, numpy copies, Encoded
        xx = torch.from_numpy(np.ascontiguousarray(np.stack(ims)))
        xx.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
        d.mean.float().cpu().numpy(), d.logvar.float().cpu().numpy()
        for texts in (orig, syn):
            for role in ("clip_l", "clip_g", "t5"):
                m.te._ids(role, texts, 77)
        for e in got:  # the per-item slicing encode_chunk does
            {v: dict(e.encodings[v]) for v in e.encodings}

    return compare("encode", n, "images", bare, ours, host, reps, batch=n, input=f"{args.side}x{args.side} + 2 captions",
                   max_abs_diff=diff)


def stage_caption(args, models: Path, enc, reps: int) -> dict:
    from flowcurate.captioning.captioner import _to_pil
    from flowcurate.captioning.cleanup import clean_caption
    from flowcurate.captioning.handler import CaptionModelHandler

    n, new = args.caption_batch, args.max_new_tokens
    handler = CaptionModelHandler(str(models / "captioner"), max_new_tokens=new, batch_size=n, device="cpu")
    cap = handler.load_model()
    ims = images(n, args.side, seed=8)
    chunk = list(zip(ims, prompts(n, seed=9)))
    inputs = cap.processor(images=[_to_pil(im) for im in ims], text=[cap.text] * n, return_tensors="pt", padding=True)
    n_prompt = inputs["input_ids"].shape[1]

    def bare():
        return cap.model.generate(**inputs, max_new_tokens=new, do_sample=False, num_beams=1)

    def ours():
        return next(handler.run_inference([chunk], cap))

    out = bare()
    texts = cap.processor.batch_decode(out[:, n_prompt:], skip_special_tokens=True)
    same = all((clean_caption(t) or o) == g.text for t, (_, o), g in zip(texts, chunk, ours()))

    def host():  # Captioner.generate / caption around model.generate
        cap.processor(images=[_to_pil(im) for im, _ in chunk], text=[cap.text] * n, return_tensors="pt", padding=True)
        [clean_caption(t) for t in cap.processor.batch_decode(out[:, n_prompt:], skip_special_tokens=True)]

    return compare("caption", n, "images", bare, ours, host, reps, batch=n, max_new_tokens=new, same_captions=same,
                   input=f"{args.side}x{args.side} -> 224x224, {n_prompt} prompt tokens",
                   generated_tokens=int(out.shape[1] - n_prompt))


def cmd_stages(args) -> int:
    from flowcurate.pipeline.handlers import EncodeModelHandler

    print(f"machine: {machine()}")
    print(f"torch.get_num_threads() = {torch.get_num_threads()}, load {os.getloadavg()}")
    models = Path(args.models) if args.models else Path(tempfile.mkdtemp(prefix="pbench-models-"))
    t0 = time.perf_counter()
    info = build_models(models, args.t5_layers)
    print(f"models in {models} ({time.perf_counter() - t0:.0f} s): "
          + json.dumps({k: v.get("params") for k, v in info.items() if isinstance(v, dict) and "params" in v}))
    enc, results = None, []
    if {"vae", "text", "encode"} & set(args.stages):
        handler = EncodeModelHandler(str(models / "sd3"), t5_length=77, device="cpu")
        enc = handler, handler.load_model()
    for name in (s for s in STAGES if s in args.stages):
        if name == "caption":  # the encoders go before the captioner comes
            enc = None
            gc.collect()
        print(f"== {name} (batch {getattr(args, name + '_batch')})")
        reps = getattr(args, f"{name}_reps", None) or args.reps
        results.append(globals()[f"stage_{name}"](args, models, enc, reps))
    print("\n| stage | batch | input | bare s | ours s | bare items/s | ours items/s | ours / bare | per-pair ratios | "
          "ours / bare (CPU s) | CPU util bare / ours | load (1 min) | host work ms | max diff |\n" + "|---" * 14 + "|")
    for r in results:
        host = f"{r['host_s'] * 1000:.0f}"
        if not r["reps"]:
            print(f"| {r['stage']} | {r['batch']} | {r['input']} | | | | | | | | | | {host} | |")
            continue
        diff = r.get("max_abs_diff", "same" if r.get("same_captions") else "DIFFERENT")
        diff = f"{diff:.1e}" if isinstance(diff, float) else diff
        print(f"| {r['stage']} | {r['batch']} | {r['input']} | {r['bare_s']:.2f} | {r['ours_s']:.2f} | "
              f"{r['bare_per_s']:.2f} | {r['ours_per_s']:.2f} | {r['ratio']:.3f} | "
              f"{', '.join(f'{p:.2f}' for p in r['pair_ratios'])} | {r['cpu_ratio']:.3f} | "
              f"{r['cpu_util_bare']:.2f} / {r['cpu_util_ours']:.2f} | {r['load_min']:.1f}-{r['load_max']:.1f} | "
              f"{host} | {diff} |")
    for r in (r for r in results if "generated_tokens" in r):
        print(f"* {r['stage']}: {json.dumps({k: r[k] for k in ('generated_tokens', 'max_new_tokens')})}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "threads": torch.get_num_threads(),
                                               "models": info, "results": results}, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------------------
# Demo scale

MODES = {"inproc": [], "mp2": ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"],
         "bare": None}  # bare: not a run, the tiny models' bare forwards over the first run's inputs (bare-tiny)
MODES.update({f"{mode}-omp1": flags for mode, flags in list(MODES.items())})  # the same, OMP_NUM_THREADS=1


def cmd_demo(args) -> int:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    base_env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    base_env.pop("OMP_NUM_THREADS", None)
    threads = {omp: subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                   env={**base_env, **({"OMP_NUM_THREADS": "1"} if omp == "1" else {})},
                                   capture_output=True, text=True).stdout.strip() for omp in ("unset", "1")}
    print(f"torch threads in a fresh process: OMP_NUM_THREADS unset -> {threads['unset']}, =1 -> {threads['1']}")
    runs: dict[str, list] = {m: [] for m in args.modes}
    first_run = next(m for m in args.modes if MODES[m] is not None)
    for rep in range(args.reps):
        order = list(args.modes) if rep % 2 == 0 else list(reversed(args.modes))
        if rep == 0:  # a run first: its manifest says which inputs each stage sees
            order.remove(first_run)
            order.insert(0, first_run)
        for mode in order:
            flags, out = MODES[mode], work / f"out-{mode}"
            if flags is None:
                out = work / f"{mode}-{rep}.json"
                cmd = [sys.executable, __file__, "bare-tiny", "--data", args.data, "--manifest",
                       str(work / f"out-{first_run}" / "manifest"), "--json", str(out)]
            else:
                cmd = [sys.executable, "-m", "flowcurate.pipeline", "--input", f"{args.data.rstrip('/')}/raw/*.tar",
                       "--output", str(out), "--config", "tiny", "--overwrite", *flags]
            env = {**base_env, **({"OMP_NUM_THREADS": "1"} if mode.endswith("-omp1") else {})}
            m = run_measured(cmd, env, work / f"{mode}-{rep}.log")
            if flags is None:
                m["stages"] = json.loads(out.read_text()) if m["rc"] == 0 else None
            else:
                m["status"] = json.loads((out / "stats.json").read_text()).get("status") if m["rc"] == 0 else None
            runs[mode].append(m)
            print(f"rep {rep} {mode}: {json.dumps(m)}", flush=True)
    print("\n| mode | runs | wall s (median) | walls | CPU s (tree, median) | CPU util (CPU / wall) | processes | "
          "load before-after |\n|---|---|---|---|---|---|---|---|")
    for mode, ms in runs.items():
        if not ms:
            continue
        wall = statistics.median(m["wall_s"] for m in ms)
        cpu = statistics.median(max(m["cpu_s_proc"], m["cpu_s_rusage"]) for m in ms)
        loads = ", ".join(f"{m['load_before']:.1f}-{m['load_after']:.1f}" for m in ms)
        walls = ", ".join(f"{m['wall_s']:.1f}" for m in ms)
        print(f"| {mode} | {len(ms)} | {wall:.1f} | {walls} | {cpu:.1f} | {cpu / wall:.2f} | "
              f"{max(m['processes'] for m in ms)} | {loads} |")
    for mode, ms in runs.items():
        if bare := [m["stages"] for m in ms if m.get("stages")]:
            med = {k: statistics.median(b["stages"][k]["wall_s"] for b in bare) for k in bare[0]["stages"]}
            print(f"{mode} (torch threads {bare[0]['torch_threads']}), stage wall s (median): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in med.items())
                  + f"; sum {statistics.median(b['sum_wall_s'] for b in bare):.1f} wall, "
                  f"{statistics.median(b['sum_cpu_s'] for b in bare):.1f} CPU; items "
                  + ", ".join(f"{k} {bare[0]['stages'][k]['items']}" for k in med))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "torch_threads": threads, "runs": runs}, indent=1))
    return 0


def cmd_bare_tiny(args) -> int:
    """The tiny models' bare forwards over the inputs each stage of a run saw (from its manifest)."""
    import pyarrow.parquet as pq

    from flowcurate.captioning.captioner import Captioner, _to_pil
    from flowcurate.formats.config import load_config
    from flowcurate.formats.images import ImageRejected
    from flowcurate.models.autoencoder import Autoencoder
    from flowcurate.models.sscd import SSCDPreprocess, load_sscd
    from flowcurate.models.text_encoders import CLIP_LENGTH, TextEncoders
    from flowcurate.models.tiny import cache_dir, ensure_tiny_models
    from flowcurate.pipeline.read import read_tar
    from flowcurate.pipeline.validate import validate

    if not (cache_dir(0) / "tiny_report.json").is_file():
        raise SystemExit(f"tiny models not built for this code ({cache_dir(0)}); refusing to build them here")
    tiny = ensure_tiny_models(0)
    cfg = load_config("tiny")
    pc, dd = cfg.pipeline, cfg.dedup
    pre = SSCDPreprocess(dd.sscd_size, tuple(dd.mean), tuple(dd.std))
    kept = {r["key"]: r for r in pq.read_table(args.manifest).to_pylist() if r["status"] == "kept"}
    t_read = time.perf_counter()
    valid = {}
    for tar in sorted(Path(args.data, "raw").glob("*.tar")):
        for item in read_tar(str(tar)):
            try:
                if item.reason is None:
                    valid[item.key] = validate(item.image, resolution=pc.resolution, min_size=pc.min_size,
                                               max_aspect=pc.max_aspect, max_pixels=pc.max_pixels, sscd=pre)
            except ImageRejected:
                pass
    first: dict[str, str] = {}
    for key in sorted(valid, key=lambda k: (-valid[k].width * valid[k].height, k)):
        first.setdefault(valid[key].pixel_hash, key)
    sscd_keys, kept_keys = sorted(first.values()), sorted(kept)  # SSCD embeds the exact-dedup survivors
    read_s = time.perf_counter() - t_read
    stages = {}

    def batches(keys, n):
        return [keys[i:i + n] for i in range(0, len(keys), n)]

    def timed(name, fn, inputs, items):
        with torch.inference_mode():
            fn(inputs[0])  # warm-up
            t0, c0 = time.perf_counter(), time.process_time()
            for x in inputs:
                fn(x)
        stages[name] = {"items": items, "calls": len(inputs), "wall_s": time.perf_counter() - t0,
                        "cpu_s": time.process_time() - c0}

    sscd = load_sscd(tiny / "sscd.torchscript.pt")
    timed("sscd", sscd, [torch.stack([pre.normalize(valid[k].sscd) for k in b])
                         for b in batches(sscd_keys, pc.batch_size)], len(sscd_keys))
    cap = Captioner.load(str(tiny / "captioner"), max_new_tokens=pc.caption_max_new_tokens,
                         batch_size=pc.caption_batch_size)
    timed("caption", lambda x: cap.model.generate(**x, max_new_tokens=pc.caption_max_new_tokens, do_sample=False,
                                                  num_beams=1),
          [cap.processor(images=[_to_pil(valid[k].image) for k in b], text=[cap.text] * len(b), return_tensors="pt",
                         padding=True) for b in batches(kept_keys, pc.caption_batch_size)], len(kept_keys))
    ae = Autoencoder.load(str(tiny / "sd3"))
    te = TextEncoders.load(str(tiny / "sd3"), t5_length=pc.t5_max_length)
    enc_in = []  # AE + text encoders, both caption variants
    for b in batches(kept_keys, pc.batch_size):
        x = torch.from_numpy(np.stack([valid[k].image for k in b])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        ids = []
        for v in ("caption_synthetic", "caption_original"):
            texts = [kept[k][v] or kept[k]["caption_synthetic"] or "" for k in b]
            ids.append({r: te.tokenizers[r](texts, padding="max_length", truncation=True, return_tensors="pt",
                                            max_length=CLIP_LENGTH if r != "t5" else pc.t5_max_length).input_ids
                        for r in ("clip_l", "clip_g", "t5")})
        enc_in.append((x, ids))

    def encode(inputs):
        x, ids = inputs
        _ = ae.vae.encode(x).latent_dist
        for i in ids:
            te.encoders["clip_l"](i["clip_l"], output_hidden_states=True)
            te.encoders["clip_g"](i["clip_g"], output_hidden_states=True)
            te.encoders["t5"](i["t5"])

    timed("encode", encode, enc_in, len(kept_keys))
    doc = {"torch_threads": torch.get_num_threads(), "read_validate_s": read_s, "stages": stages,
           "sum_wall_s": sum(s["wall_s"] for s in stages.values()),
           "sum_cpu_s": sum(s["cpu_s"] for s in stages.values())}
    print(json.dumps(doc, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(doc))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stages", help="our model handlers vs the bare models (real-size, random weights)")
    s.add_argument("--models", help="folder for the random-weight models (built once; default: a temp folder)")
    s.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    s.add_argument("--reps", type=int, default=5,
                   help="interleaved bare/ours rounds (medians reported); 0: output checks and host work only")
    s.add_argument("--text-reps", type=int, help="rounds for the text stage (default --reps)")
    s.add_argument("--encode-reps", type=int, help="rounds for the encode stage (default --reps)")
    s.add_argument("--t5-layers", type=int, default=2, help="T5-XXL-width layers (the real model has 24)")
    for stage, batch in (("sscd", 16), ("vae", 4), ("text", 16), ("encode", 8), ("caption", 4)):
        s.add_argument(f"--{stage}-batch", type=int, default=batch)
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
