"""`flowcurate run`: raw image shards -> curated training shards, one Beam graph for every runner.

    read -> validate -> exact dedup -> [filters] -> SSCD embed -> near-dup dedup -> caption -> encode -> write

Stage order and contracts: docs/architecture.md. Every input ends as exactly one manifest row (kept, duplicate
or rejected with a reason); expensive stages run only on survivors; model stages see deterministic
chunks (`flowcurate.pipeline.chunks`), so reruns in one mode give byte-identical shards. An unexpected error on
one element becomes a dead letter (`with_exception_handling`) and a `failed:<stage>` row: the bundle
and the run go on.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import DirectOptions

from flowcurate.captioning.handler import CaptionModelHandler
from flowcurate.formats.config import to_dict
from flowcurate.formats.manifest import EMBEDDINGS_SCHEMA, FAILED_PREFIX, MANIFEST_SCHEMA
from flowcurate.formats.shards import (
    INDEX_JSON,
    RECORD_JSON,
    encode_sample,
    index_doc,
    record_bytes,
    record_files,
    shard_name,
    shard_of,
    split_of,
)
from flowcurate.models.sscd import SSCDPreprocess
from flowcurate.pipeline.chunks import Chunk, Chunks
from flowcurate.pipeline.encode import Captioned, EncodeModelHandler, Kept
from flowcurate.pipeline.filters import ApplyFilters
from flowcurate.pipeline.neardup import NearDupDedup, SSCDModelHandler
from flowcurate.pipeline.options import Launch, OptionsError, launch_options
from flowcurate.pipeline.read import ReadRaw
from flowcurate.pipeline.stages import ExactDedup, Validate, failed_rows, manifest_row
from flowcurate.pipeline.validate import aspect_buckets
from flowcurate.pipeline.write import (
    PARTS_DIR,
    concat_parts,
    delete_tree,
    join,
    read_file,
    write_file,
    write_json,
    write_part,
)

STATS_JSON = "stats.json"


def make_conditioning(_, sd3: str, *, revision, t5_length, store_dtype, ae_dtype, te_dtype, prompts, label,
                      out: str) -> str:
    """Encode the record (empty + validation prompts) once per run, write it, return its content hash."""
    from flowcurate.models.autoencoder import Autoencoder
    from flowcurate.models.conditioning import record_parts
    from flowcurate.models.text_encoders import TextEncoders, quiet_hf_logging

    quiet_hf_logging()
    ae = Autoencoder.load(sd3, revision=revision, dtype=ae_dtype)
    te = TextEncoders.load(sd3, revision=revision, t5_length=t5_length, dtype=te_dtype)
    doc, arrays = record_parts(sd3, ae, te, revision=revision, store_dtype=store_dtype,
                               validation_prompts=prompts, ae_dtype=ae_dtype, te_dtype=te_dtype, label=label)
    _, files, digest = record_files(doc, arrays)
    for name, data in files.items():
        write_file(join(out, name), data)
    return digest


def _caption_pairs(chunk: Chunk):
    return chunk, [(k.item.image, k.item.caption) for k in chunk.items]


def _captioned(kv) -> Chunk:
    chunk, captions = kv
    items = []
    for k, cap in zip(chunk.items, captions):
        notes = list(cap.notes)
        orig = k.item.caption
        if not orig:
            orig = cap.text
            notes.append("orig_caption_missing")
        items.append(Captioned(k, orig, cap.text, tuple(dict.fromkeys(notes))))
    return Chunk(chunk.group, chunk.index, items)


def _sample(e, conditioning: str, store_dtype: str):
    c = e.captioned
    a = c.kept.item
    notes = list(c.notes) + (["caption_truncated_77"] if e.truncated else [])
    meta = {"source": a.source, "width": a.width, "height": a.height, "crop": list(a.crop),
            "resolution": list(a.resolution), "caption": {"orig": c.orig, "syn": c.syn}}
    sample = encode_sample(a.key, e.latent_mean, e.latent_logvar, e.encodings, meta, conditioning, store_dtype)
    row = manifest_row(a.key, a.source, "kept", cluster=c.kept.cluster, width=a.width, height=a.height,
                       caption_original=a.caption, caption_synthetic=c.syn, notes=notes, shard=c.kept.shard)
    return sample, row


def _write_chunk(element, out: str, conditioning: str, store_dtype: str):
    """(Chunk, [Encoded]) -> the part tar; yields ('part', (shard, (index, path, n))) and manifest rows."""
    chunk, encoded = element
    made = [_sample(e, conditioning, store_dtype) for e in encoded]
    path = write_part(out, chunk.group, chunk.index, [s for s, _ in made])
    yield beam.pvalue.TaggedOutput("parts", (chunk.group, (chunk.index, path, len(made))))
    for _, row in made:
        yield row


def _write_shard(kv, out: str):
    shard, parts = kv
    parts = sorted(parts)
    concat_parts(out, shard, [p for _, p, _ in parts])
    return shard, sum(n for _, _, n in parts)


def _write_index(counts: list, out: str, conditioning: str) -> dict:
    doc = index_doc(dict(counts), conditioning)
    write_file(join(out, "shards", INDEX_JSON), record_bytes(doc))
    delete_tree(join(out, "shards", PARTS_DIR))
    return doc


def _count_row(row: dict) -> dict:
    label = row["status"] if row["status"] != "rejected" else f"rejected:{row['reason']}"
    beam.metrics.Metrics.counter("flowcurate", label).inc()
    return row


def _stats(counts: list, out: str, info: dict) -> dict:
    by_status: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for (status, reason), n in counts:
        by_status[status] = by_status.get(status, 0) + n
        if reason:
            reasons[reason] = reasons.get(reason, 0) + n
    doc = {**info, "inputs": sum(by_status.values()),
           "status": {s: by_status.get(s, 0) for s in ("kept", "duplicate", "rejected")},
           "reasons": dict(sorted(reasons.items()))}
    write_json(join(out, STATS_JSON), doc)
    return doc


def _embedding_record(e) -> dict:
    a = e.item
    return {"key": a.key, "embedding": [float(v) for v in e.vector], "width": a.width, "height": a.height}


def build(p: beam.Pipeline, launch: Launch) -> dict[str, Any]:
    """Add the whole curation graph to `p`; returns the main PCollections (for tests)."""
    cfg, o = launch.config, launch.ours
    pc, dd, m = cfg.pipeline, cfg.dedup, cfg.models
    out = o.output.rstrip("/")
    AsSingleton = beam.pvalue.AsSingleton  # noqa: N806
    device = pc.device

    def on_accelerator(transform):  # GPU hints for the model steps only (a command-line hint hits every step)
        return transform.with_resource_hints(accelerator=o.model_accelerator) if o.model_accelerator else transform

    raw = p | "Read" >> ReadRaw(o.input, o.key_column, o.image_column, o.caption_column)
    pre = SSCDPreprocess(dd.sscd_size, tuple(dd.mean), tuple(dd.std))
    buckets = aspect_buckets(pc.resolution, pc.max_aspect) if pc.aspect_buckets else None
    validated = (raw | "Validate" >> beam.ParDo(Validate(pc.resolution, pc.min_size, pc.max_aspect, pc.max_pixels,
                                                         buckets, sscd=pre))
                 .with_outputs(Validate.REJECTED, main="ok")
                 .with_exception_handling(main_tag="ok", dead_letter_tag="failed"))
    failed = [validated.failed | "ValidateFailed" >> beam.FlatMap(
        lambda d: [manifest_row(d[0].key, d[0].source, "rejected", reason=f"{FAILED_PREFIX}validate")])]
    exact = validated.ok | "ExactDedup" >> ExactDedup()
    # optional model-based filters (aesthetic, NSFW, ...) on user-supplied weights: filtered:<name> rows
    filtered = exact.kept | "Filters" >> ApplyFilters(
        [{"device": device, **f} for f in pc.filters], pc.batch_size, o.model_accelerator)

    # SSCD on deterministic chunks, then near-duplicate removal over the dedup core
    sscd_chunks = filtered["kept"] | "SSCDChunks" >> Chunks(lambda a: a.key, pc.batch_size)
    embedded, sscd_failed = (sscd_chunks | "SSCD" >> on_accelerator(RunInference(
        SSCDModelHandler(m.sscd, pre, device)).with_exception_handling()))
    failed.append(sscd_failed.failed_inferences | "SSCDFailed" >> beam.FlatMap(failed_rows("sscd")))
    embedded = embedded | "Embedded" >> beam.FlatMap(lambda xs: xs)
    near = embedded | "NearDup" >> NearDupDedup(dd)

    # shard assignment: split by key hash, shard count from the split's size
    val_fraction, shard_size = pc.val_fraction, pc.shard_size
    split = near["kept"] | "Split" >> beam.Map(lambda ec: (split_of(ec[0].item.key, val_fraction), ec))
    counts = (split | "SplitKeys" >> beam.Keys() | "SplitCounts" >> beam.combiners.Count.PerElement()
              | "SplitDict" >> beam.combiners.ToDict())

    def to_kept(sec, counts):
        s, (e, cluster) = sec
        n = math.ceil(counts.get(s, 0) / shard_size)
        return Kept(e.item, cluster, shard_name(s, shard_of(e.item.key, n)))

    kept = split | "Shard" >> beam.Map(to_kept, AsSingleton(counts))
    chunks = kept | "ShardChunks" >> Chunks(lambda k: k.item.key, pc.batch_size, group=lambda k: k.shard)

    captioner = KeyedModelHandler(CaptionModelHandler(
        m.captioner, revision=m.captioner_revision, prompt=pc.caption_prompt,
        max_new_tokens=pc.caption_max_new_tokens, batch_size=pc.caption_batch_size,
        trust_remote_code=m.trust_remote_code, device=device, share_model=pc.share_models))
    captioned, cap_failed = (chunks | "CaptionInputs" >> beam.Map(_caption_pairs)
                             | "Caption" >> on_accelerator(RunInference(captioner).with_exception_handling()))
    failed.append(cap_failed.failed_inferences | "CaptionFailed" >> beam.FlatMap(failed_rows("caption")))
    captioned = captioned | "Captioned" >> beam.Map(_captioned)

    encoder = KeyedModelHandler(EncodeModelHandler(
        m.sd3, revision=m.sd3_revision, t5_length=pc.t5_max_length, ae_dtype=pc.ae_dtype,
        te_dtype=pc.text_encoder_dtype, device=device, share_model=pc.share_models))
    encoded, enc_failed = (captioned | "EncodeInputs" >> beam.Map(lambda c: (c, c))
                           | "Encode" >> on_accelerator(RunInference(encoder).with_exception_handling()))
    failed.append(enc_failed.failed_inferences | "EncodeFailed" >> beam.FlatMap(failed_rows("encode")))

    conditioning = (p | "RecordSeed" >> beam.Create([None])
                    | "Conditioning" >> beam.Map(
                        make_conditioning, m.sd3, revision=m.sd3_revision, t5_length=pc.t5_max_length,
                        store_dtype=pc.store_dtype, ae_dtype=pc.ae_dtype, te_dtype=pc.text_encoder_dtype,
                        prompts=list(pc.validation_prompts), label=launch.sd3_label, out=out))
    written = (encoded | "WriteParts" >> beam.FlatMap(_write_chunk, out, AsSingleton(conditioning), pc.store_dtype)
               .with_output_types(Any).with_outputs("parts", main="rows"))
    shards = (written.parts | "PartsByShard" >> beam.GroupByKey()
              | "WriteShards" >> beam.Map(_write_shard, out))
    index = (shards | "ShardCounts" >> beam.combiners.ToList()
             | "WriteIndex" >> beam.Map(_write_index, out, AsSingleton(conditioning)))

    rows = ((validated[Validate.REJECTED], exact[ExactDedup.DUPLICATES], filtered["rejected"],
             near[NearDupDedup.DUPLICATES],
             near[NearDupDedup.REJECTED], written.rows, *failed)
            | "AllRows" >> beam.Flatten()
            | "Count" >> beam.Map(_count_row))
    rows | "WriteManifest" >> beam.io.WriteToParquet(
        join(out, "manifest", "part"), MANIFEST_SCHEMA, file_name_suffix=".parquet")
    embedded | "EmbeddingRecords" >> beam.Map(_embedding_record) | "WriteEmbeddings" >> beam.io.WriteToParquet(
        join(out, "embeddings", "part"), EMBEDDINGS_SCHEMA, file_name_suffix=".parquet")

    info = {"config": to_dict(cfg), "inputs_spec": list(o.input), "runner": launch.runner,
            "sscd": {"location": m.sscd, "preprocess": pre.record()},
            "captioner": {"location": m.captioner, "revision": m.captioner_revision, "prompt": pc.caption_prompt,
                          "max_new_tokens": pc.caption_max_new_tokens, "greedy": True}}
    stats = (rows | "StatusReason" >> beam.Map(lambda r: (r["status"], r["reason"] or ""))
             | "CountStatus" >> beam.combiners.Count.PerElement()
             | "StatusList" >> beam.combiners.ToList()
             | "WriteStats" >> beam.Map(_stats, out, info))
    return {"rows": rows, "stats": stats, "index": index, "conditioning": conditioning}


def prepare_output(out: str, overwrite: bool) -> None:
    """Refuse to mix runs: an OUT holding shards or a manifest needs --overwrite (which clears them)."""
    from apache_beam.io.filesystems import FileSystems

    old = [join(out, d) for d in ("shards", "manifest", "embeddings", STATS_JSON, RECORD_JSON)]
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
    prepare_output(out, launch.ours.overwrite)
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
    return stats


EPILOG = """\
examples:
  flowcurate run --input 'raw/*.tar' --output out/ --config tiny
  flowcurate run --input raw/ --output out/ --config tiny --direct_running_mode multi_processing \\
      --direct_num_workers 2
  flowcurate run --input 'gs://B/raw/*.tar' --output gs://B/out --config sd3 --runner DataflowRunner \\
      --project P --region us-central1 --temp_location gs://B/tmp --sdk_container_image IMAGE
  flowcurate run --input 'hdfs://raw/*.tar' --output hdfs://out --config my.toml --runner SparkRunner \\
      --spark_master_url spark://HOST:7077

Every Apache Beam pipeline option passes through (see docs/deploy.md). Outputs: OUT/shards/
(train/val tars + index.json), OUT/conditioning.json, OUT/manifest/, OUT/embeddings/, OUT/stats.json.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: flowcurate run --input SPEC --output OUT [--config NAME|FILE] [beam options]\n\n"
              f"{__doc__}\n{_flags_help()}\n{EPILOG}")
        return 0
    try:
        stats = run(argv)
    except OptionsError as e:
        print(f"flowcurate run: {e}", file=sys.stderr)
        return 2
    if stats is not None:
        s = stats["status"]
        print(f"inputs {stats['inputs']}: kept {s['kept']}, duplicate {s['duplicate']}, rejected {s['rejected']}")
        for reason, n in stats["reasons"].items():
            print(f"  rejected {reason}: {n}")
    return 0


def _flags_help() -> str:
    from flowcurate.pipeline.options import FlowcurateOptions

    parser = argparse.ArgumentParser(prog="flowcurate run", add_help=False)
    FlowcurateOptions._add_argparse_args(parser)
    DirectOptions._add_argparse_args(parser.add_argument_group("local runner (DirectRunner)"))
    return parser.format_help()
