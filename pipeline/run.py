"""`flowcurate run`: raw image shards -> curated training shards, one Beam graph for every runner.

    input files -> pass 1 (per file: read, validate, filters, pixel hash, SSCD) -> small records
                -> decide (repeated keys, exact and near duplicates, keep rule) -> kept records
                -> pass 2 (per file with kept items: re-read, caption, encode, write shard parts)

Shuffles carry keys, ids, sizes, hashes and descriptors, never pixels, so memory and shuffle volume do
not grow with the images' resolution. Every input ends as exactly one manifest row (kept, duplicate or
rejected with a reason). Model batches are chunks formed inside one file, so reruns give
byte-identical shards and the worker count changes nothing.
"""

from __future__ import annotations

import json
import posixpath
import sys
import time
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from flowcurate.captioning.handler import CaptionModelHandler
from flowcurate.formats.config import to_dict
from flowcurate.formats.manifest import EMBEDDINGS_SCHEMA, FAILED_PREFIX, MANIFEST_SCHEMA
from flowcurate.formats.shards import RECORD_JSON
from flowcurate.formats.tars import sanitize_key
from flowcurate.models.sscd import SSCDPreprocess
from flowcurate.pipeline.decide import Decide
from flowcurate.pipeline.filters import check_filters
from flowcurate.pipeline.handlers import EncodeModelHandler, SSCDModelHandler
from flowcurate.pipeline.options import Launch, OptionsError, launch_options
from flowcurate.pipeline.pass1 import Pass1, Pass1Settings
from flowcurate.pipeline.pass2 import CROPS, PARTS, Pass2, Pass2Settings
from flowcurate.pipeline.progress import NAMESPACE as PROGRESS_NAMESPACE
from flowcurate.pipeline.progress import Progress
from flowcurate.pipeline.read import ListInputs
from flowcurate.pipeline.records import ORDINAL_BITS, Item, file_index_of, item_id
from flowcurate.pipeline.shuffles import shuffle_bytes
from flowcurate.pipeline.validate import aspect_buckets
from flowcurate.pipeline.write import (
    CROP_EMBEDDINGS,
    STATS_JSON,
    count_row,
    delete_tree,
    embedding_record,
    join,
    make_conditioning,
    read_file,
    shard_offsets,
    write_index,
    write_shard,
    write_stats,
)

AsSingleton = beam.pvalue.AsSingleton
def _file_failed(dead) -> Item:
    """Pass 1 raised on a whole file (a bug, not bad input): one rejected row says which file."""
    (file_index, path, _), _error = dead[0], dead[1]
    stem = sanitize_key(posixpath.basename(path))
    return Item(item_id(file_index, (1 << ORDINAL_BITS) - 1), f"{stem}#failed", path, f"{FAILED_PREFIX}pass1")


def build(p: beam.Pipeline, launch: Launch) -> dict[str, Any]:
    """Add the whole curation graph to `p`; returns the main PCollections (for tests)."""
    cfg, o = launch.config, launch.ours
    pc, dd, m = cfg.pipeline, cfg.dedup, cfg.models
    out = o.output.rstrip("/")

    def hinted(transform):  # a GPU hint on a whole pass: never splits what the pass fuses
        return transform.with_resource_hints(accelerator=o.model_accelerator) if o.model_accelerator else transform

    pre = SSCDPreprocess(dd.sscd_size, tuple(dd.mean), tuple(dd.std))
    buckets = tuple(aspect_buckets(pc.resolution, pc.max_aspect)) if pc.aspect_buckets else None
    columns = (o.key_column, o.image_column, o.caption_column)
    filters = tuple(check_filters([{"device": pc.device, **f} for f in pc.filters]))
    validation = dict(resolution=pc.resolution, min_size=pc.min_size, max_aspect=pc.max_aspect,
                      max_pixels=pc.max_pixels, buckets=buckets)

    files = p | "ListInputs" >> ListInputs(o.input)
    indexed = (files
               | "Enumerate" >> beam.FlatMap(lambda fs: [(i, path, root) for i, (path, root) in enumerate(fs)])
               | "Spread" >> beam.Reshuffle())
    pass1 = (indexed | "Pass1" >> hinted(beam.ParDo(Pass1(Pass1Settings(
        **validation, sscd_location=m.sscd, sscd_preprocess=pre, sscd_sha256=m.sscd_sha256, chunk=pc.batch_size, device=pc.device,
        filters=filters, columns=columns))).with_exception_handling()))
    items = ((pass1.good, pass1.bad | "FileFailed" >> beam.Map(_file_failed)) | "Items" >> beam.Flatten())

    decided = items | "Decide" >> Decide(dd, pc.val_fraction)
    kept = decided["kept"]
    offsets = (kept
               | "FileSplit" >> beam.Map(lambda k: ((file_index_of(k.id), k.split), 1))
               | "KeptPerFile" >> beam.CombinePerKey(sum)
               | "KeptCounts" >> beam.combiners.ToList()
               | "Offsets" >> beam.Map(shard_offsets, pc.shard_size))
    conditioning = (p | "RecordSeed" >> beam.Create([None])
                    | "Conditioning" >> beam.Map(make_conditioning, cfg, launch.sd3_label, out))

    captioner = CaptionModelHandler(
        m.captioner, revision=m.captioner_revision, prompt=pc.caption_prompt,
        max_new_tokens=pc.caption_max_new_tokens, batch_size=pc.caption_batch_size,
        trust_remote_code=m.trust_remote_code, device=pc.device, share_model=pc.share_models)
    encoder = EncodeModelHandler(m.sd3, revision=m.sd3_revision, t5_length=pc.t5_max_length, ae_dtype=pc.ae_dtype,
                                 te_dtype=pc.text_encoder_dtype, device=pc.device, share_model=pc.share_models)
    settings2 = Pass2Settings(out=out, **validation, chunk=pc.batch_size, shard_size=pc.shard_size,
                              store_dtype=pc.store_dtype, captioner=captioner, encoder=encoder,
                              sscd=SSCDModelHandler(m.sscd, pre, pc.device, m.sscd_sha256), columns=columns)
    written = (kept
               | "ByFile" >> beam.Map(lambda k: (file_index_of(k.id), k))
               | "GroupByFile" >> beam.GroupByKey()
               | "Pass2" >> hinted(beam.ParDo(Pass2(settings2), AsSingleton(files), AsSingleton(offsets),
                                              AsSingleton(conditioning))
                                   .with_output_types(Any).with_outputs(PARTS, CROPS, main="rows")))
    shards = (written[PARTS] | "PartsByShard" >> beam.GroupByKey()
              | "WriteShards" >> beam.Map(write_shard, out))
    index = (shards | "ShardCounts" >> beam.combiners.ToList()
             | "WriteIndex" >> beam.Map(write_index, out, AsSingleton(conditioning)))

    rows = ((decided["rows"], written.rows) | "AllRows" >> beam.Flatten() | "Count" >> beam.Map(count_row))
    rows | "WriteManifest" >> beam.io.WriteToParquet(
        join(out, "manifest", "part"), MANIFEST_SCHEMA, file_name_suffix=".parquet")
    (decided["embedded"] | "EmbeddingRecords" >> beam.Map(embedding_record)
     | "WriteEmbeddings" >> beam.io.WriteToParquet(join(out, "embeddings", "part"), EMBEDDINGS_SCHEMA,
                                                    file_name_suffix=".parquet"))

    written[CROPS] | "WriteCropEmbeddings" >> beam.io.WriteToParquet(
        join(out, CROP_EMBEDDINGS, "part"), EMBEDDINGS_SCHEMA, file_name_suffix=".parquet")

    info = {"config": to_dict(cfg), "inputs_spec": list(o.input), "runner": launch.runner,
            "sscd": {"location": m.sscd, "preprocess": pre.record()},
            "captioner": {"location": m.captioner, "revision": m.captioner_revision, "prompt": pc.caption_prompt,
                          "max_new_tokens": pc.caption_max_new_tokens, "greedy": True}}
    stats = (rows | "StatusReason" >> beam.Map(lambda r: (r["status"], r["reason"] or ""))
             | "CountStatus" >> beam.combiners.Count.PerElement()
             | "StatusList" >> beam.combiners.ToList()
             | "WriteStats" >> beam.Map(write_stats, out, info))
    return {"rows": rows, "stats": stats, "index": index, "conditioning": conditioning, "items": items}


def prepare_output(out: str, overwrite: bool) -> None:
    """Refuse to mix runs: an OUT holding shards or a manifest needs --overwrite (which clears them)."""
    from apache_beam.io.filesystems import FileSystems

    old = [join(out, d) for d in ("shards", "manifest", "embeddings", CROP_EMBEDDINGS, STATS_JSON, RECORD_JSON)]
    present = [d for d in old if FileSystems.exists(d)]
    if present and not overwrite:
        raise OptionsError(f"{out} already holds a curated run ({', '.join(present)}); "
                           "pass --overwrite to replace it, or choose another --output")
    for d in present:
        delete_tree(d)


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None, log=print) -> dict | None:
    """Parse argv (Beam flags pass through), resolve models, run the graph; returns stats.json's
    contents when OUT is readable from here (local runs), else None."""
    launch = launch_options(argv, log=lambda msg: log(msg, file=sys.stderr) if log is print else log(msg))
    out = launch.ours.output.rstrip("/")
    check_inputs(launch.ours.input)
    prepare_output(out, launch.ours.overwrite)
    Progress.reset()
    t0 = time.perf_counter()
    p = test_pipeline or beam.Pipeline(options=launch.beam)
    build(p, launch)
    result = p.run()
    result.wait_until_finish()
    try:
        stats = json.loads(read_file(join(out, STATS_JSON)))
    except Exception:  # a remote runner still writing, or OUT not readable from here
        return None
    stats["wall_s"] = round(time.perf_counter() - t0, 1)
    try:  # the in-process runner's sampled sizes; other runners show theirs in their own UI
        stats["shuffle_bytes"] = shuffle_bytes(p, result)
    except Exception:  # noqa: BLE001  (no monitoring infos on this runner)
        stats["shuffle_bytes"] = None
    stats["stages"] = stage_metrics(result)
    return stats


def check_inputs(specs: list[str]) -> None:
    """Every --input must match at least one input file (a tar, an image or a Parquet file)."""
    from flowcurate.pipeline.read import input_patterns, is_input

    for spec in specs:
        pattern, _ = input_patterns(spec)
        try:
            found = FileSystems.match([pattern])[0].metadata_list
        except Exception as e:  # noqa: BLE001  (a filesystem that cannot list it says why)
            raise OptionsError(f"--input {spec!r}: cannot list it ({e})") from None
        if not found:
            raise OptionsError(f"--input {spec!r} matches nothing")
        if not any(is_input(m.path) for m in found):
            raise OptionsError(f"--input {spec!r} matches {len(found)} file(s) but no inputs "
                               "(.tar, image files, .parquet)")


def stage_metrics(result) -> dict[str, dict[str, int]]:
    """{stage: {what: count, "busy_ms": ...}} from the runner's counters (namespace flowcurate)."""
    from apache_beam.metrics.metric import MetricsFilter

    out: dict[str, dict[str, int]] = {}
    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(PROGRESS_NAMESPACE))["counters"]
    except Exception:  # noqa: BLE001  (a runner without metrics)
        return out
    for c in counters:
        stage, _, what = c.key.metric.name.partition("/")
        if what:
            out.setdefault(stage, {})[what] = int(c.committed if c.committed is not None else c.attempted)
    return out
