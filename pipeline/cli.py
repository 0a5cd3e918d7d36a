"""`flowcurate run` / `python -m flowcurate.pipeline`: help without loading the graph or any model,
the launch (whose checks stop a bad command line at once, exit status 2), progress lines while it runs,
and a closing table of what each stage did.

Exit status: 0 done; 1 every input was rejected (the reasons are printed); 2 a launch error (an input
that matches nothing, an unknown option or runner, models that cannot be had).
"""

from __future__ import annotations

import argparse
import logging
import sys

DESCRIPTION = """\
Curate raw image shards into training shards: two passes over the raw files, with the global
decisions between them on small records only.

  pass 1  per input file: read, validate, [filters], pixel hash, SSCD descriptor
  decide  repeated keys, exact duplicates, near duplicates (k-means cells, SD3 Algorithm 1)
  pass 2  per input file with kept images: re-read, caption, encode, write shard parts

Every input ends as one manifest row (kept, duplicate, or rejected with a reason)."""

EPILOG = """\
examples:
  flowcurate run --input 'raw/*.tar' --output out/                  # the sd3 preset: real models
  flowcurate run --input 'raw/*.tar' --output out/ --config tiny    # offline tiny models
  flowcurate run --task edit --input 'ip2p/*.parquet' --output edits/ # InstructPix2Pix triplets -> editing shards
  flowcurate run --input raw/ --output out/ --config tiny --direct_running_mode multi_processing \\
      --direct_num_workers 2
  flowcurate run --input 'gs://B/raw/*.tar' --output gs://B/out --config sd3 --runner DataflowRunner \\
      --project P --region us-central1 --temp_location gs://B/tmp --sdk_container_image IMAGE
  flowcurate run --input 'hdfs://raw/*.tar' --output hdfs://out --config my.toml --runner SparkRunner \\
      --spark_master_url spark://HOST:7077

Every Apache Beam pipeline option passes through (docs/deploy.md); an option neither flowcurate nor
Beam knows stops the launch. Outputs: OUT/shards/ (train/val tars + index.json), OUT/conditioning.json,
OUT/manifest/, OUT/embeddings/, OUT/crop_embeddings/, OUT/stats.json (docs/architecture.md).
exit status: 0 done, 1 every input rejected, 2 launch error.
"""


def help_text() -> str:
    from apache_beam.options.pipeline_options import DirectOptions

    from flowcurate.pipeline.options import FlowcurateOptions

    parser = argparse.ArgumentParser(prog="flowcurate run", add_help=False)
    FlowcurateOptions._add_argparse_args(parser)
    DirectOptions._add_argparse_args(parser.add_argument_group("local runner (in process, or N worker processes)"))
    return (f"usage: flowcurate run --input SPEC --output OUT [--config NAME|FILE] [beam options]\n\n"
            f"{DESCRIPTION}\n\n{parser.format_help()}\n{EPILOG}")


def show_progress() -> None:
    """Progress lines (flowcurate.progress, INFO) on stderr while the run goes on."""
    log = logging.getLogger("flowcurate")
    if not any(isinstance(h, logging.StreamHandler) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def closing_table(stats: dict) -> str:
    """Per-stage counts and seconds, then the outcome per status and reason."""
    lines = []
    stages = stats.get("stages") or {}
    busy = sum(v.get("busy_ms", 0) for v in stages.values()) / 1000
    for name, counts in sorted(stages.items()):
        seconds = counts.get("busy_ms", 0) / 1000
        what = ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "busy_ms")
        lines.append(f"  {name:<8} {seconds:8.1f} s  {what}")
    if stages and "wall_s" in stats:
        lines.append(f"  {'other':<8} {max(stats['wall_s'] - busy, 0.0):8.1f} s  (decisions, writing, runner)")
    s = stats["status"]
    lines.append(f"inputs {stats['inputs']:,}: kept {s['kept']:,}, duplicate {s['duplicate']:,}, "
                 f"rejected {s['rejected']:,}" + (f" in {stats['wall_s']:.1f} s" if "wall_s" in stats else ""))
    lines += [f"  rejected {reason}: {n:,}" for reason, n in stats["reasons"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text())
        return 0
    from flowcurate.pipeline.options import OptionsError

    show_progress()
    try:
        from flowcurate.pipeline.run import run

        stats = run(argv)
    except OptionsError as e:
        print(f"flowcurate run: error: {e}", file=sys.stderr)
        return 2
    if stats is None:  # a remote runner: its own UI has the counts
        return 0
    print(closing_table(stats))
    if stats["inputs"] and stats["status"]["rejected"] == stats["inputs"]:
        print(f"flowcurate run: every input was rejected ({stats['inputs']:,}); see the reasons above",
              file=sys.stderr)
        return 1
    return 0
