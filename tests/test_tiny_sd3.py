"""The tiny SD3 pipeline folder: loads through diffusers offline, conditions like the reference, decodes
recognisably, tokenises caption words whole, and is deterministic for a seed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from flowcurate.models.tiny import procedural
from flowcurate.models.tiny.sd3 import (
    CLIP_G,
    CLIP_L,
    RESOLUTION,
    WIDTHS,
    build_sd3,
    check_widths,
    images_to_tensor,
    psnr_db,
    reconstruct,
    vocabulary_words,
)

# The build measures about 20 dB on its own held-out images. 18 dB is far above anything that keeps only
# colour (each image's mean colour: 15.1 dB on these images) and leaves room for another image sample;
# 8x8 block means, bilinearly upsampled (the most a 16-channel 8x8 latent gives for free), reach 20.5 dB.
MIN_PSNR_DB = 18.0


@pytest.fixture(scope="module")
def sd3(tiny_models):
    return tiny_models / "sd3"


@pytest.fixture(scope="module")
def pipe(sd3):
    from diffusers import StableDiffusion3Pipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return StableDiffusion3Pipeline.from_pretrained(sd3)


def test_widths_fit_the_reference_conditioning():
    check_widths()
    assert WIDTHS["clip_l"] + WIDTHS["clip_g"] < WIDTHS["t5"]  # strictly: the zero-pad really happens
    assert WIDTHS["clip_l"] != WIDTHS["clip_g"]  # so a swapped concatenation order shows
    with pytest.raises(ValueError, match="crop"):
        check_widths({**WIDTHS, "t5": 64, "joint_attention_dim": 64})
    with pytest.raises(ValueError, match="pooled"):
        check_widths({**WIDTHS, "pooled_projection_dim": 96})
    with pytest.raises(ValueError, match="joint_attention_dim"):
        check_widths({**WIDTHS, "joint_attention_dim": 128})


def test_folder_layout(sd3):
    index = json.loads((sd3 / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder"] == index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    for sub in ("tokenizer", "tokenizer_2"):  # the layout of real CLIP repos, plus tokenizer.json
        assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in (sd3 / sub).iterdir()}
    weights = list(sd3.rglob("*.safetensors"))
    assert len(weights) == 5 and not list(sd3.rglob("*.bin"))
    assert sum(p.stat().st_size for p in sd3.rglob("*") if p.is_file()) < 25 * 2**20
    scheduler = json.loads((sd3 / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0


def test_vae_config_is_sd3s(pipe):
    cfg = pipe.vae.config
    assert (cfg.latent_channels, cfg.scaling_factor, cfg.shift_factor) == (16, 1.5305, 0.0609)
    assert pipe.vae_scale_factor == 8
    with torch.no_grad():
        z = pipe.vae.encode(torch.zeros(1, 3, RESOLUTION, RESOLUTION)).latent_dist.mean
    assert z.shape == (1, 16, RESOLUTION // 8, RESOLUTION // 8)


def test_text_encoders_are_in_sd3_order(pipe):
    for enc, spec in ((pipe.text_encoder, CLIP_L), (pipe.text_encoder_2, CLIP_G)):
        assert enc.config.hidden_size == spec["hidden_size"]
        assert enc.config.projection_dim == spec["projection_dim"]
        assert enc.config.hidden_act == spec["hidden_act"]
    assert pipe.text_encoder_3.config.d_model == pipe.transformer.config.joint_attention_dim == WIDTHS["t5"]


@pytest.mark.parametrize("t5_length", [77, 20])
def test_encode_prompt_shapes_and_zero_pad(pipe, t5_length):
    prompts = ["a red circle above a blue square on a plain gray background", "an unseen zebra!"]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=t5_length)
    wl, wg, wt = WIDTHS["clip_l"], WIDTHS["clip_g"], WIDTHS["t5"]
    assert embeds.shape == (2, 77 + t5_length, wt)
    assert pooled.shape == (2, WIDTHS["pooled_projection_dim"])
    clip = embeds[:, :77]
    assert torch.all(clip[:, :, wl + wg:] == 0)  # zero-padded from 80 to 96 channels
    assert clip[:, :, : wl + wg].abs().amin(-1).gt(0).float().mean() > 0.5  # and not zero elsewhere
    # CLIP-L then CLIP-G, penultimate hidden states; pooled = their projected outputs, same order
    pairs = ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))
    with torch.no_grad():
        outs = [enc(tok(prompts, padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids, output_hidden_states=True) for enc, tok in pairs]
    torch.testing.assert_close(clip[:, :, :wl], outs[0].hidden_states[-2])
    torch.testing.assert_close(clip[:, :, wl:wl + wg], outs[1].hidden_states[-2])
    torch.testing.assert_close(pooled, torch.cat([outs[0].text_embeds, outs[1].text_embeds], -1))
    assert embeds[:, 77:].abs().sum() > 0


def test_generates_an_image(pipe):
    out = pipe("a red circle above a blue square", height=RESOLUTION, width=RESOLUTION, num_inference_steps=2,
               guidance_scale=3.0, max_sequence_length=77, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, RESOLUTION, RESOLUTION, 3)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_autoencoder_reconstructs_held_out_images(pipe):
    # a seed no build uses for training images
    images = procedural.image_batch(np.random.default_rng(20240611), 48, RESOLUTION)
    x = images_to_tensor(images)
    assert psnr_db(reconstruct(pipe.vae, x), x) >= MIN_PSNR_DB


def test_clip_tokenizers_keep_caption_words_whole(pipe):
    rng = np.random.default_rng(7)
    captions = [procedural.caption(procedural.random_scene(rng)) for _ in range(200)]
    words = sorted({w for c in captions for w in re.findall(r"[a-z]+", c)} | set(vocabulary_words()))
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        for w in words:
            assert tok.tokenize(w) == [w + "</w>"], w
        unknown = tok("Xylophone Quokka 42%", add_special_tokens=False).input_ids
        assert len(unknown) > 4 and tok.unk_token_id not in unknown  # spelled out byte-level, not <unk>
        assert tok.model_max_length == 77 and tok.eos_token_id == len(tok) - 1
    # SD3's CLIP-L pads with EOS, its CLIP-G with "!" (id 0)
    assert pipe.tokenizer.pad_token_id == pipe.tokenizer.eos_token_id
    assert (pipe.tokenizer_2.pad_token, pipe.tokenizer_2.pad_token_id) == ("!", 0)


def test_clip_vocab_files_match_tokenizer_json(sd3, tmp_path):
    from transformers import CLIPTokenizer

    slow = tmp_path / "tokenizer"
    shutil.copytree(sd3 / "tokenizer", slow)
    (slow / "tokenizer.json").unlink()  # only vocab.json + merges.txt left, as older repos ship
    text = ["a red circle above a blue square", "The zebra, quite unseen: 3 stripes!"]
    assert (CLIPTokenizer.from_pretrained(slow)(text).input_ids
            == CLIPTokenizer.from_pretrained(sd3 / "tokenizer")(text).input_ids)


def test_t5_tokenizer_keeps_caption_words_whole(pipe):
    tok = pipe.tokenizer_3
    for w in vocabulary_words():
        assert tok.tokenize(w) == ["\u2581" + w], w
        assert tok.tokenize(w.capitalize()) == ["\u2581" + w.capitalize()], w
    ids = tok("A zebra: 42!").input_ids
    assert tok.unk_token_id not in ids and ids[-1] == tok.eos_token_id
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)


def _digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_build_is_deterministic_for_a_seed(tmp_path):
    a = build_sd3(tmp_path / "a", seed=3, ae_steps=3)
    b = build_sd3(tmp_path / "b", seed=3, ae_steps=3)
    c = build_sd3(tmp_path / "c", seed=4, ae_steps=3)
    da, db, dc = _digests(tmp_path / "a"), _digests(tmp_path / "b"), _digests(tmp_path / "c")
    assert da == db
    assert a["ae_psnr_db"] == b["ae_psnr_db"] and a["params"] == b["params"]
    weights = [k for k in da if k.endswith(".safetensors")]
    assert len(weights) == 5 and all(da[k] != dc[k] for k in weights)  # the seed reaches every model
    assert c["params"] == a["params"]
