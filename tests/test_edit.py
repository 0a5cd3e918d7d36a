"""Instruction editing: the widened MM-DiT equals the text-to-image one at the start, the
two-scale guidance is InstructPix2Pix's formula on velocities, the editing shard format and its
refusals, the procedural triplets' known answers, and `train --edit` / `flowcurate edit` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowcurate.cli.main import main as flowcurate
from flowcurate.formats import edit_shards as E
from flowcurate.formats import shards as S
from flowcurate.formats.config import load_config
from flowcurate.models.edit import edit_config, widen_input
from flowcurate.models.mmdit import MMDiT, MMDiTConfig, mmdit_config
from flowcurate.models.mmdit_diffusers import to_diffusers
from flowcurate.models.tiny import edit_triplets as T
from flowcurate.trainer import checkpoint as C
from flowcurate.trainer.data import read_samples, resolve_shards
from flowcurate.trainer.edit import edit_forward, edit_sample, initial_models, ip2p_guidance
from flowcurate.trainer.train import TrainLaunch

TINY = mmdit_config("tiny")


def random_model(seed: int = 0) -> MMDiT:
    """A tiny MM-DiT with every weight random (a fresh one predicts exactly zero: nothing to compare)."""
    torch.manual_seed(seed)
    model = MMDiT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def inputs(b: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 16, 8, 8, generator=g), torch.randn(b, 16, 8, 8, generator=g), torch.rand(b, generator=g),
            torch.randn(b, 20, TINY.context_dim, generator=g), torch.randn(b, TINY.pooled_dim, generator=g))


def test_widened_model_first_forward_equals_the_text_to_image_model_exactly():
    model = random_model()
    wide = widen_input(model)
    assert (wide.config.in_channels, wide.config.output_channels) == (32, 16) and wide.config == edit_config(TINY)
    x, source, t, context, pooled = inputs()
    with torch.no_grad():
        assert torch.equal(edit_forward(wide, x, source, t, context, pooled), model(x, t, context, pooled))
    # only the new input weights are new, and they are zero
    new = wide.x_embedder.proj.weight
    assert torch.equal(new[:, :16], model.x_embedder.proj.weight) and not new[:, 16:].any()
    # the source matters once those weights move
    with torch.no_grad():
        new[:, 16:].normal_(0, 0.1)
        assert not torch.equal(edit_forward(wide, x, source, t, context, pooled), model(x, t, context, pooled))


def test_editing_model_exports_to_diffusers_with_32_in_16_out():
    wide = widen_input(random_model())
    theirs = to_diffusers(wide)
    assert (theirs.config.in_channels, theirs.config.out_channels) == (32, 16)
    x, source, t, context, pooled = inputs()
    with torch.no_grad():
        ours = edit_forward(wide, x, source, t, context, pooled)
        out = theirs(hidden_states=torch.cat([x, source], 1), timestep=t * 1000, encoder_hidden_states=context,
                     pooled_projections=pooled).sample
    torch.testing.assert_close(out, ours, atol=1e-5, rtol=1e-5)


def test_two_scale_guidance_is_instructpix2pix_formula_on_velocities():
    g = torch.Generator().manual_seed(0)
    v_full, v_image, v_none = (torch.randn(4, 16, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    s_i, s_t = 1.5, 7.5
    # InstructPix2Pix eq. 3 term by term (its eps form; the velocity form is the same linear combination)
    want = v_none + s_i * (v_image - v_none) + s_t * (v_full - v_image)
    assert torch.equal(ip2p_guidance(v_full, v_image, v_none, s_i, s_t), want)
    # expanded: (1 - s_i) v_none + (s_i - s_t) v_image + s_t v_full
    torch.testing.assert_close(ip2p_guidance(v_full, v_image, v_none, s_i, s_t),
                               (1 - s_i) * v_none + (s_i - s_t) * v_image + s_t * v_full)
    # s_I = s_T = 1: the fully conditional prediction, within float rounding (float32 here)
    f32 = [v.float() for v in (v_full, v_image, v_none)]
    torch.testing.assert_close(ip2p_guidance(*f32, 1.0, 1.0), f32[0], atol=1e-6, rtol=0)
    # s_T = 1: image guidance only; s_I = 0 ignores the image entirely: v(0,0) + s_T (v(I,T) - v(I,0))
    torch.testing.assert_close(ip2p_guidance(v_full, v_image, v_none, 0.0, 1.0), v_none + v_full - v_image)


def test_edit_sampler_step_uses_the_three_predictions():
    """One Euler step of `edit_sample` (one batched forward on [(I,T); (I,0); (0,0)]) equals the step
    computed from three separate forwards of the same model."""
    wide = widen_input(random_model())
    with torch.no_grad():
        wide.x_embedder.proj.weight[:, 16:].normal_(0, 0.1)  # an editing model that uses its source
    noise, source, _, context, pooled = inputs(2, seed=3)
    t = torch.ones(2)
    zc, zp, zs = torch.zeros_like(context), torch.zeros_like(pooled), torch.zeros_like(source)
    with torch.no_grad():
        v_full = edit_forward(wide, noise, source, t, context, pooled)
        v_image = edit_forward(wide, noise, source, t, zc, zp)
        v_none = edit_forward(wide, noise, zs, t, zc, zp)
        got = edit_sample(wide, noise, source, context, pooled, steps=1, image_scale=1.5, text_scale=7.5)
        plain = edit_sample(wide, noise, source, context, pooled, steps=1, image_scale=1.0, text_scale=1.0)
    torch.testing.assert_close(got, noise - ip2p_guidance(v_full, v_image, v_none, 1.5, 7.5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, noise - v_full, atol=1e-6, rtol=0)


def test_triplets_have_known_answers():
    items = T.triplets(60, 7)
    assert {t.kind for t in items} == set(T.EDIT_KINDS)
    for t in items:
        src, edited = t.images(48)
        assert T.score_edit(t, edited)["closer_to_edit"] and not T.score_edit(t, src)["closer_to_edit"]
        shape = t.source.shapes[t.target]
        assert shape.kind in t.instruction and [s.kind for s in t.source.shapes].count(shape.kind) == 1
        if t.kind == "recolor":
            assert t.instruction == f"make the {shape.kind} {t.answer['to']}"
            assert T.score_edit(t, edited)["hue_toward_target"] and not T.score_edit(t, src)["hue_toward_target"]
        elif t.kind == "move":
            moved = t.edited.shapes[t.target]
            dx, dy = T.DIRECTIONS[t.answer["direction"]]
            assert (moved.cx - shape.cx, moved.cy - shape.cy) == pytest.approx((T.MOVE * dx, T.MOVE * dy))
        else:
            assert len(t.edited.shapes) == len(t.source.shapes) - 1
    assert T.triplets(5, 7) == items[:5]  # a pure function of the seed


@pytest.fixture(scope="module")
def edit_shards(tiny_models, tmp_path_factory):
    """Editing shards of 12 procedural triplets at 64 px (T5 length 8), through the real tiny AE and
    text encoders."""
    out = tmp_path_factory.mktemp("edit") / "out"
    T.write_edit_shards(out, T.triplets(12, 0), str(tiny_models / "sd3"), 64, label="tiny://sd3",
                        shard_size=8, val_fraction=0.25, t5_length=8)
    return out


def test_editing_shard_format(edit_shards):
    index = E.read_edit_index(edit_shards / "shards")
    assert index["task"] == "edit" and sum(s["samples"] for s in index["shards"]) == 12
    record = S.read_record(edit_shards, task="edit")
    assert record.json["task"] == "edit"
    url = str(edit_shards / "shards" / index["shards"][0]["name"])
    raw = next(read_samples(url))[0]
    doc = E.check_edit_sample(raw, record)
    members = sorted(k for k in raw if not k.startswith("__") and k != "json")
    assert members == E.edit_array_members() and not any(m.startswith("syn.") for m in members)
    assert doc["task"] == "edit" and doc["instruction"].split()[0] in ("make", "move", "remove")
    assert S.load_npy(raw["source_latent_mean.npy"]).shape == (16, 8, 8)
    # the source latents are the source image's posterior, not the edited one's
    assert not np.array_equal(S.load_npy(raw["source_latent_mean.npy"]), S.load_npy(raw["latent_mean.npy"]))


def test_each_trainer_refuses_the_other_tasks_shards(edit_shards, golden, tmp_path, capsys):
    with pytest.raises(S.ShardFormatError, match="flowcurate train --edit"):
        resolve_shards(str(edit_shards))
    with pytest.raises(S.ShardFormatError, match="instruction-editing"):
        S.read_record(edit_shards)
    raw = next(read_samples(str(edit_shards / "shards" / "train-000000.tar")))[0]
    with pytest.raises(S.ShardFormatError, match="instruction-editing"):
        S.check_sample(raw, S.read_record(edit_shards, task="edit"))
    args = ["--config", "tiny", "--max-steps", "1", "--sample-every", "0"]
    assert flowcurate(["train", "--shards", str(edit_shards), "--output", str(tmp_path / "a"), *args]) == 2
    assert "train it with `flowcurate train --edit`" in capsys.readouterr().err
    assert flowcurate(["train", "--edit", "--shards", str(golden), "--output", str(tmp_path / "b"), *args]) == 2
    assert "the editing trainer needs editing shards" in capsys.readouterr().err


def write_config(path: Path, steps: int) -> Path:
    path.write_text(f"""[train]
model = "tiny"
batch_size = 4
lr = 2e-3
warmup_steps = 2
max_steps = {steps}
ema_decay = 0.9
shift = 1.0
sample_steps = 3
checkpoint_every = 2
sample_every = 0
log_every = 1
shuffle_buffer = 4
mixed_precision = false
seed = 0
""")
    return path


@pytest.fixture(scope="module")
def t2i_run(fresh_shards, tmp_path_factory):
    """A text-to-image run (one step) to start editing runs from."""
    folder = tmp_path_factory.mktemp("t2i")
    assert flowcurate(["train", "--shards", str(fresh_shards), "--config", str(write_config(folder / "t.toml", 1)),
                       "--output", str(folder / "run")]) == 0
    return folder / "run"


def test_editing_run_starts_as_exactly_its_text_to_image_run(edit_shards, t2i_run, tmp_path):
    record = S.read_record(edit_shards, task="edit")
    launch = TrainLaunch(load_config("tiny"), str(edit_shards), str(tmp_path / "x"), init_from=str(t2i_run))
    model, ema = initial_models(launch, record, (64, 64), "cpu")
    step = C.latest(t2i_run)
    x, source, t, _, _ = inputs(2, seed=5)
    context, pooled = torch.randn(2, 77 + 8, TINY.context_dim), torch.randn(2, TINY.pooled_dim)
    for which, wide in (("model", model), ("ema", ema)):
        t2i_model = MMDiT(MMDiTConfig(**C.read_state(step)["model_config"]))
        t2i_model.load_state_dict(C.load_weights(step, which))
        with torch.no_grad():
            out = edit_forward(wide.eval(), x, source, t, context, pooled)
            assert out.abs().sum() > 0  # after a step of training: a non-trivial output
            assert torch.equal(out, t2i_model.eval()(x, t, context, pooled))
    # from a diffusers SD3Transformer2DModel folder (the t2i run's EMA, converted): widened, equal again
    to_diffusers(t2i_model).save_pretrained(tmp_path / "diffusers")
    launch = TrainLaunch(load_config("tiny"), str(edit_shards), str(tmp_path / "y"), init_from=str(tmp_path / "diffusers"))
    model, ema = initial_models(launch, record, (64, 64), "cpu")
    assert model.config.in_channels == 32 and model is not ema
    with torch.no_grad():
        torch.testing.assert_close(edit_forward(model.eval(), x, source, t, context, pooled),
                                   t2i_model(x, t, context, pooled), atol=1e-6, rtol=0)


def test_editing_run_resumes_exactly_and_edits(edit_shards, t2i_run, tmp_path):
    # 2 editing steps straight, and 1 + 1 with a resume: bit-identical
    cfg = write_config(tmp_path / "e.toml", 2)
    common = ["train", "--edit", "--shards", str(edit_shards), "--config", str(cfg), "--init-from", str(t2i_run),
              "--checkpoint-every", "1"]
    assert flowcurate([*common, "--output", str(tmp_path / "a")]) == 0
    assert flowcurate([*common, "--output", str(tmp_path / "b"), "--max-steps", "1"]) == 0
    assert flowcurate([*common, "--output", str(tmp_path / "b")]) == 0
    a, b = C.latest(tmp_path / "a"), C.latest(tmp_path / "b")
    assert a.name == b.name == "step-000002"
    for part in ("model", "ema", "optimizer"):
        wa, wb = load_file(a / f"{part}.safetensors"), load_file(b / f"{part}.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    state = C.read_state(a)
    assert state["task"] == "edit" and state["edit"]["image_drop_prob"] == 0.1
    assert (state["model_config"]["in_channels"], state["model_config"]["out_channels"]) == (32, 16)
    assert any("val_loss" in json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines())

    # flowcurate edit: one image, then a grid of seeds x scales; a text-to-image run is refused
    from PIL import Image

    Image.fromarray(T.triplets(1, 99)[0].images(80)[0]).save(tmp_path / "in.png")
    edit = ["edit", "--checkpoint", str(tmp_path / "a"), "--image", str(tmp_path / "in.png"),
            "--instruction", "make the circle red", "--steps", "1"]
    assert flowcurate([*edit, "--output", str(tmp_path / "one.png")]) == 0
    assert Image.open(tmp_path / "one.png").size == (64, 64)
    assert flowcurate([*edit, "--output", str(tmp_path / "grid.png"), "--seeds", "2", "--image-guidance", "1", "1.5",
                       "--text-guidance", "3"]) == 0
    assert Image.open(tmp_path / "grid.png").size == (3 * 64 + 2 * 2, 2 * 64 + 2)  # input + 2 seeds, 2 rows
    meta = json.loads((tmp_path / "grid.json").read_text())
    assert [(r["image_guidance"], r["text_guidance"]) for r in meta["rows"]] == [(1.0, 3.0), (1.5, 3.0)]
    assert flowcurate([*edit[:2], str(t2i_run), *edit[3:], "--output", str(tmp_path / "no.png")]) == 2
