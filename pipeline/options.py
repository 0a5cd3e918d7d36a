"""`flowcurate run` options: our flags as a Beam `PipelineOptions` view, plus the TOML config.

Every Beam option passes through unchanged, so the same command line runs locally or elsewhere:

    flowcurate run --input 'raw/*.tar' --output out/ --config tiny                      # local runner
    flowcurate run ... --runner DataflowRunner --project P --region R \\
        --temp_location gs://B/tmp --sdk_container_image IMAGE                           # Dataflow
    flowcurate run ... --runner SparkRunner --spark_master_url spark://HOST:7077           # Spark
    flowcurate run ... --runner PortableRunner --job_endpoint HOST:8099                   # any job server

`launch_options` resolves the config and every model location (building the tiny models once for
`tiny://` locations) on the launching machine, so workers receive absolute paths and never build.
"""

from __future__ import annotations

from dataclasses import dataclass

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from flowcurate.formats.config import Config, load_config, override

LOCAL_RUNNER = "FnApiRunner"
MODEL_ROLES = ("sd3", "sscd", "captioner")  # what `flowcurate run` may load


def resolve_filter_models(cfg: Config, log=print) -> Config:
    """`[pipeline] filters` CLIP locations given as `tiny://clip` -> the cached tiny CLIP's path."""
    from flowcurate.models.tiny.clip import resolve_clip

    filters = tuple({**f, "clip": resolve_clip(f["clip"], log=log)} if isinstance(f.get("clip"), str) else f
                    for f in cfg.pipeline.filters)
    return override(cfg, "pipeline", filters=filters) if filters != cfg.pipeline.filters else cfg


def model_roles(cfg: Config) -> tuple[str, ...]:
    """The models a run loads: SSCD always, the captioner unless `[models] captioner = ""` or the run
    curates edit triplets, the SD3
    autoencoder and text encoders only for the "sd3" output."""
    return tuple(r for r in MODEL_ROLES if (r != "captioner" or (cfg.models.captioner and cfg.pipeline.task != "edit"))
                 and (r != "sd3" or "sd3" in cfg.pipeline.outputs))


class FlowcurateOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--input", action="append", default=None,
                            help="raw input: tar glob, image folder or glob, Parquet with image bytes; "
                                 "any path Beam's FileSystems read (repeatable)")
        parser.add_argument("--output", default=None, help="output folder OUT (local path or gs://, s3://, ...)")
        parser.add_argument("--config", default="sd3",
                            help="preset name (sd3: the paper's real models, the default; tiny: offline tiny "
                                 "models) or TOML path")
        parser.add_argument("--image_column", default=None,
                            help="Parquet input: the image column, binary or a {bytes, path} struct (default: "
                                 "found per file: jpg, png, webp, image, img, then any {bytes, path} struct)")
        parser.add_argument("--caption_column", default=None,
                            help="Parquet input: the caption column (default: found per file: caption, text, "
                                 "txt, prompt)")
        parser.add_argument("--key_column", default="key", help="Parquet input: the key column")
        parser.add_argument("--previous", action="append", default=None, metavar="OUT",
                            help="curate against an earlier output (repeatable): new inputs that duplicate one of "
                                 "its kept items become duplicate rows naming it (column previous); its kept items "
                                 "stay kept and are not re-read; new shards are numbered after its shards")
        parser.add_argument("--reference", action="append", default=None,
                            help="decontaminate: embeddings (Parquet: key, embedding, as flowcurate dedup writes "
                                 "them) of an evaluation set; inputs above the dedup threshold to any of them are "
                                 "rejected as filtered:reference, as in flowcurate dedup --reference (repeatable)")
        parser.add_argument("--task", choices=("t2i", "edit"), default=None,
                            help="override [pipeline] task: t2i (image-caption pairs, the default) or edit "
                                 "(InstructPix2Pix triplets -> editing shards for `flowcurate train --edit`)")
        parser.add_argument("--resolution", type=int, default=None, help="override [pipeline] resolution")
        parser.add_argument("--val_fraction", type=float, default=None, help="override [pipeline] val_fraction")
        parser.add_argument("--dedup_threshold", type=float, default=None, help="override [dedup] threshold")
        parser.add_argument("--model_accelerator", default=None,
                            help="Beam accelerator resource hint for the two passes (read, validate, filters, "
                                 "SSCD; re-read, caption, encode, write), not the dedup decisions between them, "
                                 "e.g. 'type:nvidia-l4;count:1;install-nvidia-driver' (Dataflow)")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace another run in --output (its outputs are deleted; pass-1 records "
                                 "made with the same pass-1 settings are kept and reused)")
        parser.add_argument("--resume", action="store_true",
                            help="insist on resuming: the same command again resumes by default (pass-1 "
                                 "records of finished input files and the files pass 2 finished are reused; final outputs are "
                                 "rewritten); "
                                 "with --resume, a folder holding no such run is an error")


@dataclass(frozen=True)
class Launch:
    beam: PipelineOptions  # everything, Beam's options included, for beam.Pipeline(options=...)
    ours: FlowcurateOptions
    config: Config  # model locations resolved to absolute paths
    runner: str
    sd3_label: str | None = None  # the SD3 location as written when it is a tiny:// one (the record names it)


class OptionsError(ValueError):
    pass


def _option_classes() -> list[type]:
    """Every PipelineOptions view known in this process (Beam's, ours, a runner's once imported)."""
    seen, todo = {}, list(PipelineOptions.__subclasses__())
    while todo:
        cls = todo.pop()
        seen.setdefault(f"{cls.__module__}.{cls.__qualname__}", cls)
        todo.extend(cls.__subclasses__())
    return list(seen.values())


def known_runners() -> list[str]:
    return sorted(path.rsplit(".", 1)[-1] for path in StandardOptions.ALL_KNOWN_RUNNERS)


def check_runner(name: str) -> None:
    """Beam's runner names (case-insensitive, 'Runner' optional) or an importable `module.Class`;
    anything else is an OptionsError listing the runners. Importing a runner registers its options."""
    import importlib

    short = {r.lower(): r for r in known_runners()}
    if name.lower() in short or f"{name.lower()}runner" in short:
        return
    if "." in name:
        module, _, cls = name.rpartition(".")
        try:
            getattr(importlib.import_module(module), cls)
            return
        except (ImportError, AttributeError) as e:
            raise OptionsError(f"--runner {name}: cannot import it ({e})") from None
    raise OptionsError(f"--runner {name}: unknown runner; known: {', '.join(known_runners())}, "
                       "or a module.Class path (e.g. flowcurate.pipeline.dask_runner.CorrectedDaskRunner)")


def check_options(argv: list[str]) -> None:
    """Refuse an option that neither flowcurate nor any Beam options view knows (Beam itself only
    warns and runs with the default), naming the closest known option."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    from flowcurate.formats.args import suggestion

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in _option_classes():
        cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(argv)
    options = [o for a in parser._actions for o in a.option_strings]
    bad = [f"{a}{suggestion(a, options)}" for a in unknown if a.startswith("-")]
    if bad:
        raise OptionsError(f"unknown option(s): {'; '.join(bad)}")


def launch_options(argv: list[str] | None = None, *, resolve_models: bool = True, log=print) -> Launch:
    """Parse argv (Beam flags pass through), load and override the config, resolve model paths."""
    argv = list(argv or [])
    if not any(a == "--runner" or a.startswith("--runner=") for a in argv):
        # Beam's DirectRunner first tries to download and start Prism; the in-process FnApiRunner is
        # the local runner that works offline (and the one the --direct_* options configure)
        argv = [*argv, "--runner", LOCAL_RUNNER]
    beam = PipelineOptions(argv)
    check_runner(beam.view_as(StandardOptions).runner)
    check_options(argv)
    ours = beam.view_as(FlowcurateOptions)
    if not ours.input:
        raise OptionsError("--input is required (a tar glob, an image folder or glob, or Parquet files)")
    if not ours.output:
        raise OptionsError("--output is required")
    cfg = load_config(ours.config)
    cfg = override(cfg, "pipeline", resolution=ours.resolution, val_fraction=ours.val_fraction, task=ours.task)
    if cfg.pipeline.task == "edit" and any(f.get("kind") == "clip_score" for f in cfg.pipeline.filters):
        raise OptionsError("a clip_score filter compares an image with its caption; edit triplets have an "
                           "instruction instead: remove it from [pipeline] filters for task = \"edit\"")
    cfg = override(cfg, "dedup", threshold=ours.dedup_threshold)
    sd3 = cfg.models.sd3
    if resolve_models:
        from flowcurate.models.locations import ModelUnavailable, check_available
        from flowcurate.models.tiny import resolve_models as resolve

        try:
            check_available(cfg, model_roles(cfg))  # before building tiny models or starting any work
        except ModelUnavailable as e:
            raise OptionsError(str(e)) from None
        cfg = resolve(cfg, model_roles(cfg), log=log)
        cfg = resolve_filter_models(cfg, log=log)
    runner = beam.view_as(StandardOptions).runner
    return Launch(beam, ours, cfg, runner, sd3 if sd3.startswith("tiny://") else None)
