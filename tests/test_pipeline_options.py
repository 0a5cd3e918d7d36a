"""pipeline/options.py: our flags and the TOML config, with every Beam option passed through unchanged
(Dataflow, Spark and portable job servers cannot run here: their option plumbing is what is tested)."""

from __future__ import annotations

import pytest

from flowcurate.pipeline.options import FlowcurateOptions, OptionsError, launch_options

BASE = ["--input", "raw/*.tar", "--output", "out/", "--config", "tiny"]


@pytest.mark.parametrize("extra, expected", [
    (["--runner", "DataflowRunner", "--project", "p", "--region", "europe-west4", "--temp_location", "gs://b/tmp",
      "--sdk_container_image", "eu.gcr.io/p/flowcurate:1"],
     {"runner": "DataflowRunner", "project": "p", "region": "europe-west4", "temp_location": "gs://b/tmp",
      "sdk_container_image": "eu.gcr.io/p/flowcurate:1"}),
    (["--runner", "SparkRunner", "--spark_master_url", "spark://h:7077"],
     {"runner": "SparkRunner", "spark_master_url": "spark://h:7077"}),
    (["--runner", "PortableRunner", "--job_endpoint", "h:8099", "--environment_type", "DOCKER"],
     {"runner": "PortableRunner", "job_endpoint": "h:8099", "environment_type": "DOCKER"}),
])
def test_beam_options_pass_through(extra, expected):
    launch = launch_options(BASE + extra, resolve_models=False)
    everything = launch.beam.get_all_options()
    assert {k: everything[k] for k in expected} == expected
    assert launch.runner == expected["runner"]
    assert launch.ours.input == ["raw/*.tar"] and launch.ours.output == "out/"


def test_config_overrides_and_defaults():
    launch = launch_options(BASE + ["--resolution", "128", "--dedup_threshold", "0.6", "--input", "more/"],
                            resolve_models=False)
    assert launch.config.pipeline.resolution == 128 and launch.config.dedup.threshold == 0.6
    assert launch.ours.input == ["raw/*.tar", "more/"] and launch.runner == "FnApiRunner"  # the offline local default
    assert launch.config.models.sd3 == "tiny://sd3"  # unresolved on request


def test_models_resolve_to_absolute_paths_before_submitting(tiny_models):
    launch = launch_options(BASE, log=lambda *a: None)
    assert launch.config.models.sd3 == str(tiny_models / "sd3")
    assert launch.sd3_label == "tiny://sd3"  # what the conditioning record names, not this machine's path
    assert launch.config.models.sscd.endswith("sscd.torchscript.pt") and "://" not in launch.config.models.sscd


def test_missing_required_flags_are_clear():
    with pytest.raises(OptionsError, match="--input"):
        launch_options(["--output", "o"], resolve_models=False)
    with pytest.raises(OptionsError, match="--output"):
        launch_options(["--input", "i"], resolve_models=False)
    assert FlowcurateOptions([]).config == "sd3"  # the paper's models unless told otherwise
