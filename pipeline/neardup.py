"""SSCD embedding and near-duplicate removal as Beam transforms over the dedup core (SD3 App. E.2).

    embedded = chunks | RunInference(SSCDModelHandler(...))        # (Accepted, descriptor)
    result = embedded | NearDupDedup(cfg.dedup)                   # kept / duplicates / rejected

The graph (each step a piece of `flowcurate.dedup` (kmeans, assign, search, keep), so decisions equal `flowcurate dedup`
on the same descriptors, whatever the runner, the worker count or the input order):

1. count the valid descriptors -> k (`auto_clusters`: one cluster up to 20k items, else ~4 sqrt(N))
   and the k-means sample fraction (singleton side input);
2. the sample, chosen by key hash, -> `train_centroids` (sorted by key inside) -> centroids
   (singleton side input);
3. each item -> its `assign` nearest centroids (`assign_clusters`, deterministic per row);
4. `GroupByKey(cluster)` -> exact search inside the cluster, members sorted by key (pairs carry keys,
   cosines and pixel counts);
5. all found pairs -> SD3 Algorithm 1 once (`resolve_component` over the items that have pairs: the
   rule depends only on the pairs and the priority order; found pairs are few, so one worker holds
   them);
6. decisions joined back to the items by key: kept items go on, removed ones become `duplicate` rows.
Zero or non-finite descriptors become `bad_embedding` rows.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from flowcurate.dedup.assign import assign_clusters
from flowcurate.dedup.core import valid_rows
from flowcurate.dedup.engine import make_engine
from flowcurate.dedup.keep import resolve_component
from flowcurate.dedup.kmeans import auto_clusters, in_kmeans_sample, kmeans_sample_fraction, train_centroids
from flowcurate.dedup.numerics import unique_pairs
from flowcurate.dedup.report import report_similarity
from flowcurate.dedup.search import search_cluster
from flowcurate.formats.config import DedupConfig
from flowcurate.formats.manifest import BAD_EMBEDDING
from flowcurate.pipeline.stages import Accepted, manifest_row


class Embedded(NamedTuple):
    item: Accepted  # its `sscd` pixels dropped
    vector: np.ndarray  # (D,) float32 SSCD descriptor


class SSCDModelHandler(ModelHandler):
    """RunInference handler: each element is a `flowcurate.pipeline.chunks.Chunk` of `Accepted` items (their
    `sscd` pixels from `SSCDPreprocess.resize`); each yields a list of `Embedded`, in chunk order.

    Every chunk runs as one batch on its own (`max_batch_size` 1), so descriptors do not depend on
    how Beam groups elements. `location`: an SSCD TorchScript path (resolved by the launcher)."""

    def __init__(self, location: str, preprocess, device: str = "cpu"):
        super().__init__()
        self.location, self.preprocess, self.device = str(location), preprocess, device

    def load_model(self):
        from flowcurate.formats.config import resolve_device
        from flowcurate.models.sscd import load_sscd

        self.device = resolve_device(self.device)  # on the worker: "auto" means its own GPU, if any
        return load_sscd(self.location, self.device)

    def run_inference(self, batch, model, inference_args=None):
        import torch

        from flowcurate.models.sscd import embed

        out = []
        for chunk in batch:
            x = torch.stack([self.preprocess.normalize(a.sscd) for a in chunk.items])
            with torch.inference_mode():
                emb = embed(model, x, self.device)
            out.append([Embedded(a._replace(sscd=None), emb[i]) for i, a in enumerate(chunk.items)])
        return out

    def batch_elements_kwargs(self):
        return {"max_batch_size": 1}  # a chunk is already the batch (flowcurate.pipeline.chunks)

    def get_metrics_namespace(self) -> str:
        return "flowcurate_sscd"


def is_valid(vector: np.ndarray) -> bool:
    """The one-process rule (`flowcurate.dedup.core.valid_rows`) for one descriptor."""
    return bool(valid_rows(np.asarray(vector)[None])[0])


class Plan(NamedTuple):
    k: int  # clusters (1: exact search)
    fraction: float  # k-means sample fraction


def _plan(n: int, clusters, exact: bool, kmeans_sample: int) -> Plan:
    k = 1 if exact else (auto_clusters(n) if clusters in ("auto", None) else max(1, int(clusters)))
    return Plan(int(k), kmeans_sample_fraction(n, k, kmeans_sample) if k > 1 else 0.0)


def _train(sample: list[tuple[str, np.ndarray]], plan: Plan, iters: int, seed: int):
    if plan.k == 1 or not sample:
        return None
    keys = [k for k, _ in sample]
    return train_centroids(np.stack([v for _, v in sample]), keys, plan.k, iters=iters, seed=seed)


class _Assign(beam.DoFn):
    """Batches of (key, vector, pixels) -> (cluster, (key, vector, pixels)) per assigned cluster, and
    (key, top-1 cluster) on the 'top1' output."""

    TOP1 = "top1"

    def __init__(self, assign: int, assign_margin: float | None):
        self.assign, self.margin = assign, assign_margin

    def process(self, batch, centroids):
        if centroids is None:
            ids = np.zeros((len(batch), 1), np.int32)
        else:
            ids, _ = assign_clusters(np.stack([v for _, v, _ in batch]), centroids, self.assign,
                                     assign_margin=self.margin, threads=1)
        for row, (key, vec, px) in zip(ids.tolist(), batch):
            yield beam.pvalue.TaggedOutput(self.TOP1, (key, int(row[0])))
            for c in row:
                if c >= 0:
                    yield int(c), (key, vec, px)


def _search(group, threshold: float, block_rows: int, device: str):
    _, members = group
    members = sorted(members, key=lambda m: m[0])
    if len(members) < 2:
        return
    vectors = np.stack([v for _, v, _ in members])
    pairs, cos = search_cluster(vectors, threshold, block_rows=block_rows, engine=make_engine(device),
                                threads=1)
    for (i, j), c in zip(pairs.tolist(), cos.tolist()):
        a, b = members[i], members[j]
        yield a[0], b[0], float(c), a[2], b[2]


def _resolve(found: list, priority: str):
    """All found pairs (key_a, key_b, cos, pixels_a, pixels_b), repeats allowed -> (key, (kept_key,
    cos)) for every removed item."""
    if not found:
        return
    pixels: dict[str, float] = {}
    for a, b, _, pa, pb in found:
        pixels[a], pixels[b] = pa, pb
    keys = sorted(pixels)
    index = {k: i for i, k in enumerate(keys)}
    # a pair found in several clusters has one cosine: `unique_pairs` keeps it once, in (i, j) order
    pairs, cos = unique_pairs(np.array([[index[a], index[b]] for a, b, *_ in found], dtype=np.int64),
                              np.array([c for _, _, c, _, _ in found], dtype=np.float32))
    px = np.array([pixels[k] for k in keys], dtype=np.float64) if priority == "pixels" else None
    dup_of, sim = resolve_component(keys, pairs, cos, pixels=px)
    for k, d, s in zip(keys, dup_of, sim.tolist()):
        if d is not None:
            yield k, (d, s)


def _decide(kv):
    key, g = kv
    (item,) = g["item"]
    cluster = g["cluster"][0] if g["cluster"] else None
    if g["decision"]:
        kept_key, sim = g["decision"][0]
        a = item.item
        yield beam.pvalue.TaggedOutput(NearDupDedup.DUPLICATES, manifest_row(
            a.key, a.source, "duplicate", duplicate_of=kept_key, similarity=report_similarity(sim),
            cluster=cluster, width=a.width, height=a.height))
    else:
        yield item, cluster


class NearDupDedup(beam.PTransform):
    """PCollection[Embedded] -> {'kept': (Embedded, cluster), 'duplicates': manifest rows,
    'rejected': manifest rows (bad_embedding)}. `cfg`: the `[dedup]` section, as for
    `flowcurate.dedup.core.find_duplicates` (k-means always FAISS here)."""

    DUPLICATES, REJECTED = "duplicates", "rejected"

    def __init__(self, cfg: DedupConfig = DedupConfig(), *, device: str = "cpu", assign_batch: int = 1024):
        super().__init__()
        if cfg.priority not in ("pixels", "key"):
            raise ValueError(f"priority must be 'pixels' or 'key', got {cfg.priority!r}")
        self.threshold, self.clusters, self.assign, self.assign_margin = (
            cfg.threshold, cfg.clusters, cfg.assign, cfg.assign_margin)
        self.kmeans_iters, self.kmeans_sample, self.seed = cfg.kmeans_iters, cfg.kmeans_sample, cfg.seed
        self.block_rows, self.priority, self.exact, self.device = cfg.block_rows, cfg.priority, cfg.exact, device
        self.assign_batch = assign_batch

    def expand(self, embedded):
        AsSingleton = beam.pvalue.AsSingleton  # noqa: N806
        checked = embedded | "Check" >> beam.Partition(lambda e, _: 0 if is_valid(e.vector) else 1, 2)
        good, bad = checked[0], checked[1]
        rejected = bad | "BadRows" >> beam.Map(lambda e: manifest_row(
            e.item.key, e.item.source, "rejected", reason=BAD_EMBEDDING, width=e.item.width,
            height=e.item.height))
        vec = good | "Vectors" >> beam.Map(
            lambda e: (e.item.key, np.asarray(e.vector, np.float32), float(e.item.width * e.item.height)))
        clusters, exact, sample_size = self.clusters, self.exact, self.kmeans_sample
        plan = (vec | "Count" >> beam.combiners.Count.Globally()
                | "Plan" >> beam.Map(_plan, clusters, exact, sample_size))
        iters, seed = self.kmeans_iters, self.seed
        centroids = (vec
                     | "Sample" >> beam.Filter(lambda v, p: p.k > 1 and in_kmeans_sample(v[0], p.fraction),
                                               AsSingleton(plan))
                     | "SampleKV" >> beam.Map(lambda v: (v[0], v[1]))
                     | "SampleList" >> beam.combiners.ToList()
                     | "KMeans" >> beam.Map(_train, AsSingleton(plan), iters, seed))
        assigned = (vec
                    | "AssignBatches" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.assign_batch)
                    | "Assign" >> beam.ParDo(_Assign(self.assign, self.assign_margin), AsSingleton(centroids))
                    .with_output_types(Any).with_outputs(_Assign.TOP1, main="members"))
        threshold, block_rows, device, priority = self.threshold, self.block_rows, self.device, self.priority
        decisions = (assigned.members
                     | "ByCluster" >> beam.GroupByKey()
                     | "Search" >> beam.FlatMap(_search, threshold, block_rows, device)
                     | "Pairs" >> beam.combiners.ToList()
                     | "KeepRule" >> beam.FlatMap(_resolve, priority))
        items = good | "ItemByKey" >> beam.Map(lambda e: (e.item.key, e))
        joined = ({"item": items, "cluster": assigned[_Assign.TOP1], "decision": decisions}
                  | "Join" >> beam.CoGroupByKey()
                  | "Decide" >> beam.FlatMap(_decide).with_output_types(Any).with_outputs(self.DUPLICATES, main="kept"))
        return {"kept": joined.kept, self.DUPLICATES: joined[self.DUPLICATES], self.REJECTED: rejected}
