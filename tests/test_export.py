"""trainer/export.py: a tiny trained run exported to diffusers' format loads there and computes what our
model computes: the SD3Transformer2DModel folder at 1e-5 on the same inputs, and the whole
StableDiffusion3Pipeline folder gives the latents of our sampler for the same noise and sigmas."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
import torch
from test_train import QUIET, write_config  # tests/ is on sys.path under pytest

from flowcurate.cli.main import main as flowcurate
from flowcurate.trainer import checkpoint as C
from flowcurate.trainer.cli import main as trainer

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def run(fresh_shards, tmp_path_factory):
    """A tiny run of 4 steps on this machine's tiny models; lr and EMA decay high enough that the EMA
    weights differ from both the zero-output initialisation and the raw weights."""
    folder = tmp_path_factory.mktemp("export") / "run"
    cfg = write_config(folder.with_name("c.toml"), max_steps=4, checkpoint_every=4, warmup_steps=1, lr=1e-2,
                       ema_decay=0.5, shift=3.0, cfg_scale=4.0)
    assert trainer(["train", "--shards", str(fresh_shards), "--config", str(cfg), "--output", str(folder),
                    *QUIET]) == 0
    return folder


def _inputs(config, seed=0):
    """(x, t, context, pooled) for our model; a non-square 6x10 latent exercises the position crop."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, config.in_channels, 6, 10, generator=g), torch.tensor([0.3, 0.9]),
            torch.randn(2, 154, config.context_dim, generator=g), torch.randn(2, config.pooled_dim, generator=g))


def _diffusers_out(transformer, x, t, context, pooled):
    return transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=context,
                       pooled_projections=pooled).sample


@torch.no_grad()
def test_transformer_export_equals_our_model(run, tmp_path):
    from diffusers import SD3Transformer2DModel

    from flowcurate.models.mmdit_diffusers import diffusers_config
    from flowcurate.trainer.sample import load_model

    out = tmp_path / "transformer"
    assert flowcurate(["export", str(run), "--output", str(out)]) == 0
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert (out / "diffusion_pytorch_model.safetensors").stat().st_mode & stat.S_IRGRP  # as readable as the run
    step = C.latest(run)
    exported = SD3Transformer2DModel.from_pretrained(out, local_files_only=True).eval()
    for which, folder in (("ema", out), ("model", tmp_path / "raw")):
        if which == "model":
            assert flowcurate(["export", str(step), "--output", str(folder), "--no-ema"]) == 0
            exported = SD3Transformer2DModel.from_pretrained(folder, local_files_only=True).eval()
        ours, state = load_model(step, which)
        # the config is ours exactly (position table, patch, widths, QK-norm, no dual attention) ...
        assert {k: exported.config[k] for k in diffusers_config(ours.config)} == {
            k: list(v) if isinstance(v, tuple) else v for k, v in diffusers_config(ours.config).items()}
        assert exported.config.qk_norm == "rms_norm" and exported.config.dual_attention_layers == []
        # ... and so is the output, on inputs neither side was tuned for
        x, t, context, pooled = _inputs(ours.config)
        expected = ours(x, t, context, pooled)
        assert expected.abs().mean() > 1e-2  # trained: not the zero output of a fresh model
        torch.testing.assert_close(_diffusers_out(exported, x, t, context, pooled), expected, atol=1e-5, rtol=0)
        assert json.loads((folder / "flowcurate_export.json").read_text())["weights"] == which
    ema, raw = C.load_weights(step, "ema"), C.load_weights(step, "model")
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # the two exports really differ


@torch.no_grad()
def test_pipeline_export_samples_what_our_sampler_samples(run, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from flowcurate.formats import shards as S
    from flowcurate.models.conditioning import folder_hash
    from flowcurate.trainer import sample
    from flowcurate.trainer.flow import euler_sample

    out = tmp_path / "pipeline"
    assert flowcurate(["export", str(run), "--output", str(out), "--pipeline"]) == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(out, local_files_only=True)
    assert pipe.scheduler.config.shift == 3.0  # the run's, not the source folder's
    step, record, ours, state = sample.load_run(run, "ema", "cpu")
    # the AE and encoders are the record's, byte for byte (the content hashes the run was checked against)
    for role, folder in (("autoencoder", "vae"), ("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"),
                         ("t5", "text_encoder_3")):
        assert folder_hash(str(out), folder) == sample.record_entry(record, role)["content_hash"]

    # our sampler and the pipeline from the same noise over the pipeline's sigma table (diffusers spaces
    # its steps otherwise than flow.sigmas: flow.py), guidance with the encoded "" on both sides
    steps, cfg, size = 3, 4.0, tuple(state["sample_size"])
    paths = sample.model_paths(record)
    te = sample.load_text_encoders(record, paths)
    context, pooled = S.assemble(sample.to_parts(te.encode([PROMPT]), "cpu"))
    uncond = S.assemble(sample.to_parts(te.encode([""]), "cpu"))
    noise = torch.randn(1, 16, size[0] // 8, size[1] // 8, generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(steps)
    ts = pipe.scheduler.sigmas.clone()
    expected = euler_sample(ours, noise, context, pooled, uncond=uncond, cfg_scale=cfg, ts=ts)
    call = dict(prompt=PROMPT, num_inference_steps=steps, guidance_scale=cfg, height=size[0], width=size[1],
                max_sequence_length=record.json["context"]["t5_length"])
    latents = pipe(**call, latents=noise.clone(), output_type="latent").images
    assert (expected - noise).abs().mean() > 1e-2  # the model moved the sample
    # measured 7e-7 (the transformer alone: 2e-7): both sides in float32, the same Euler update
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=0)

    # and a decoded image: the pipeline's equals our autoencoder's decoding within one uint8 step (measured: equal)
    image = pipe(**call, latents=noise.clone(), output_type="np").images
    assert image.shape == (1, *size, 3)
    ae = sample.load_autoencoder(record, paths["autoencoder"])
    assert np.abs(np.round(image * 255).astype(int) - ae.decode(expected).astype(int)).max() <= 1


def test_export_refuses_what_it_cannot_export(run, tmp_path, capsys):
    # a path that is not there, and one that is not a run: exit 2 with a message, nothing written
    assert flowcurate(["export", str(tmp_path / "nope"), "--output", str(tmp_path / "a")]) == 2
    assert "no such run or checkpoint folder" in capsys.readouterr().err
    assert flowcurate(["export", str(tmp_path), "--output", str(tmp_path / "a")]) == 2
    assert "nor a run with checkpoints" in capsys.readouterr().err
    # an output folder with something in it is not mixed with
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    assert flowcurate(["export", str(run), "--output", str(tmp_path / "b")]) == 2
    assert "pass a new --output" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no half export, no temporary folder left


def test_export_help_names_the_default_weights_and_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        flowcurate(["export", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "EMA weights by default" in out and "flowcurate export run/ --output" in out
