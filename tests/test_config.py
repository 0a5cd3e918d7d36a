import dataclasses

import pytest

from flowcurate.formats.config import ConfigError, load_config, override, preset_names, to_dict


def test_presets_load_into_frozen_dataclasses():
    assert {"tiny", "sd3"} <= set(preset_names())
    tiny, sd3 = load_config("tiny"), load_config("sd3")
    assert tiny.models.sd3 == "tiny://sd3" and tiny.source == "preset:tiny"
    assert sd3.models.sd3 == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert sd3.train.text_drop_prob == pytest.approx(0.464) and sd3.train.adam_eps == 1e-15
    assert sd3.dedup.threshold == 0.5 and sd3.dedup.mean == (0.485, 0.456, 0.406)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.dedup.threshold = 0.9


def test_toml_path_and_errors(tmp_path):
    p = tmp_path / "my.toml"
    p.write_text('[dedup]\nthreshold = 0.75\n[train]\nlr = 1\n')
    cfg = load_config(p)
    assert cfg.dedup.threshold == 0.75 and cfg.train.lr == 1.0 and cfg.pipeline.resolution == 256
    p.write_text("[dedup]\nthreshhold = 0.75\n")
    with pytest.raises(ConfigError, match="threshhold"):
        load_config(p)
    p.write_text("[dedupe]\n")
    with pytest.raises(ConfigError, match="dedupe"):
        load_config(p)
    p.write_text('[dedup]\nthreshold = "high"\n')
    with pytest.raises(ConfigError, match="threshold"):
        load_config(p)
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config("no-such-preset")


def test_override_replaces_only_given_fields():
    cfg = load_config("tiny")
    new = override(cfg, "dedup", threshold=0.8, assign=None)
    assert new.dedup.threshold == 0.8 and new.dedup.assign == cfg.dedup.assign
    assert cfg.dedup.threshold == 0.75
    assert to_dict(new)["dedup"]["threshold"] == 0.8
