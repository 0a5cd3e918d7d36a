"""The global decisions, on pass 1's small records only: one decision per input.

    repeated keys      GroupByKey(key): the first by (source, reason) keeps the key, the others become
                       `{key}~2`, `~3`, ... rejected `duplicate_key`
    pass-1 rejections  rows as they are (reason from pass 1)
    exact duplicates   GroupByKey(pixel hash): the first by (more pixels, key) is kept, the others are
                       `duplicate` rows with similarity 1.0
    near duplicates    on the exact survivors' SSCD descriptors, as `flowcurate dedup` decides (SD3
                       App. E.2): count -> k and the k-means sample fraction; the sample chosen by key
                       hash -> centroids (side input); each item -> its `assign` nearest centroids;
                       GroupByKey(cluster) -> exact search inside the cluster; all found pairs (integer
                       ids and cosines: compact) -> SD3 Algorithm 1 once, in priority order
                       (`resolve_component`); zero or non-finite descriptors -> `bad_embedding`
    kept               `Kept` records (with split) for pass 2

What crosses the shuffles here is keys, ids, sizes, hashes and (for near-dup search) descriptors as raw
float32 bytes: never pixels. Decisions equal `flowcurate dedup` on the same descriptors, whatever the
runner, the worker count or the input order.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np

from flowcurate.dedup.assign import assign_clusters
from flowcurate.dedup.core import valid_rows
from flowcurate.dedup.engine import make_engine
from flowcurate.dedup.keep import resolve_component
from flowcurate.dedup.kmeans import auto_clusters, in_kmeans_sample, kmeans_sample_fraction, train_centroids
from flowcurate.dedup.numerics import unique_pairs
from flowcurate.dedup.report import report_similarity
from flowcurate.dedup.search import search_cluster
from flowcurate.formats.config import DedupConfig
from flowcurate.formats.manifest import BAD_EMBEDDING, DUPLICATE_KEY
from flowcurate.formats.shards import split_of
from flowcurate.pipeline.previous import PREVIOUS
from flowcurate.pipeline.records import Item, Kept, manifest_row, rejected_row

AsSingleton = beam.pvalue.AsSingleton


class Named(NamedTuple):
    """An input with its final (unique) key; what the exact and near-duplicate steps carry."""

    id: int
    key: str
    source: str
    pixel_hash: str
    width: int
    height: int
    scores: tuple = ()  # pass 1's filter scores (Item.scores), for the manifest row

    @property
    def pixels(self) -> float:
        return float(self.width * self.height)


# ---------------------------------------------------------------------------------------------- keys

def number_repeats(key: str, items: list) -> list[tuple[object, str, bool]]:
    """The items read under one key -> (item, final key, is a repeat): the first by (source, reason)
    keeps the key, the others become `{key}~2`, `~3`, ... (so arrival order does not matter)."""
    items = sorted(items, key=lambda it: (it.source, it.reason or ""))
    return [(it, key if i == 1 else f"{key}~{i}", i > 1) for i, it in enumerate(items, start=1)]


def _number_repeats(kv):
    """(key, [slim Items]) -> Named for valid first items; rows for repeats and rejected items (tagged).
    A key that an earlier output (--previous) holds is taken: every new item under it is a repeat."""
    key, items = kv
    earlier = [it for it in items if it.reason == PREVIOUS]
    new = [it for it in items if it.reason != PREVIOUS]
    for it, final, repeat in number_repeats(key, new):
        if repeat or earlier:
            yield beam.pvalue.TaggedOutput("rows", manifest_row(
                final, it.source, "rejected", reason=DUPLICATE_KEY, previous=earlier[0].source if earlier else None,
                scores=it.scores))
        elif it.reason is not None:
            yield beam.pvalue.TaggedOutput("rows", rejected_row(it))
        else:
            yield Named(it.id, final, it.source, it.pixel_hash, it.width, it.height, it.scores)


def _slim(it: Item) -> tuple[str, Item]:
    """The key grouping's element: the item without its descriptor and caption (scores are a few floats)."""
    return it.key, it._replace(embedding=None, caption=None)


def _resolve_exact(kv):
    """(pixel hash, [Named]) -> the survivor; (survivor id, duplicate row) for the others (tag 'dups')."""
    _, group = kv
    group = sorted(group, key=lambda n: (-n.pixels, n.key))
    yield group[0]
    for n in group[1:]:
        yield beam.pvalue.TaggedOutput("dups", (group[0].id, manifest_row(
            n.key, n.source, "duplicate", duplicate_of=group[0].key, similarity=1.0, width=n.width,
            height=n.height, scores=n.scores)))


def _exact_rows(kv):
    """An exact survivor's id, its exact duplicates' rows and its near decision (if it was removed):
    the duplicates then name the item that removed it, so `duplicate_of` is always a kept key. Their
    pixels equal the survivor's, so the survivor's cosine is theirs too."""
    _, g = kv
    decision = g["decision"][0] if g["decision"] else None
    for row in g["dup"]:
        if decision is not None:
            kept_key, sim, origin = decision
            row = {**row, "duplicate_of": kept_key, "similarity": report_similarity(sim), "previous": origin}
        yield row


# ---------------------------------------------------------------------------------------------- near

class Plan(NamedTuple):
    k: int  # clusters (1: exact search)
    fraction: float  # k-means sample fraction


def _plan(n: int, dd: DedupConfig) -> Plan:
    k = 1 if dd.exact else (auto_clusters(n) if dd.clusters in ("auto", None) else max(1, int(dd.clusters)))
    return Plan(int(k), kmeans_sample_fraction(n, k, dd.kmeans_sample) if k > 1 else 0.0)


def _train(sample: list[tuple[str, bytes]], plan: Plan, dd: DedupConfig):
    if plan.k == 1 or not sample:
        return None
    sample = sorted(sample)
    vectors = np.stack([np.frombuffer(v, np.float32) for _, v in sample])
    return train_centroids(vectors, [k for k, _ in sample], plan.k, iters=dd.kmeans_iters, seed=dd.seed)


class _Assign(beam.DoFn):
    """Batches of (id, descriptor bytes, pixels) -> (cluster, member) per assigned cluster, and
    (id, top-1 cluster) on the 'top1' output."""

    TOP1 = "top1"

    def __init__(self, assign: int, assign_margin: float | None):
        self.assign, self.margin = assign, assign_margin

    def process(self, batch, centroids):
        if centroids is None:
            ids = np.zeros((len(batch), 1), np.int32)
        else:
            vectors = np.stack([np.frombuffer(v, np.float32) for _, v, _ in batch])
            ids, _ = assign_clusters(vectors, centroids, self.assign, assign_margin=self.margin, threads=1)
        for row, member in zip(ids.tolist(), batch):
            yield beam.pvalue.TaggedOutput(self.TOP1, (member[0], int(row[0])))
            for c in row:
                if c >= 0:
                    yield int(c), member


def _search(group, threshold: float, block_rows: int):
    """One cluster's members -> its above-threshold pairs as (id_a, id_b, cos) triples."""
    _, members = group
    members = sorted(members)
    if len(members) < 2:
        return []
    vectors = np.stack([np.frombuffer(v, np.float32) for _, v, _ in members])
    pairs, cos = search_cluster(vectors, threshold, block_rows=block_rows, engine=make_engine("cpu"),
                                threads=1)
    ids = [m[0] for m in members]
    return [(ids[i], ids[j], float(c)) for (i, j), c in zip(pairs.tolist(), cos.tolist())]


def _resolve(pairs: list, nodes: list, priority: str) -> list:
    """All found pairs (id_a, id_b, cos; repeats allowed) and the paired items (id, key, pixels,
    origin) -> (id, (kept key, cos, origin of the kept item)) for every removed item: SD3 Algorithm 1
    in priority order. Items of earlier outputs (negative ids, `origin` their folder) come first and
    are never removed: pairs between two of them are dropped."""
    pairs = [p for p in pairs if p[0] >= 0 or p[1] >= 0]
    if not pairs:
        return []
    # by key: the priority's tie-break and a fixed order; earlier outputs' items first
    nodes = sorted(nodes, key=lambda n: (n[0] >= 0, n[1]))
    index = {n[0]: i for i, n in enumerate(nodes)}
    keys = [f"\0previous{i:012d}" if n[0] < 0 else n[1] for i, n in enumerate(nodes)]  # never a real key
    # a pair found in several clusters has one cosine: `unique_pairs` keeps it once, in (i, j) order
    found, cos = unique_pairs(np.array([[index[a], index[b]] for a, b, _ in pairs], dtype=np.int64),
                              np.array([c for _, _, c in pairs], dtype=np.float32))
    px = np.array([1e300 if n[0] < 0 else n[2] for n in nodes], dtype=np.float64) if priority == "pixels" else None
    if px is None and nodes and nodes[0][0] < 0:  # key priority: earlier outputs' items still first
        px = np.array([1.0 if n[0] < 0 else 0.0 for n in nodes])
    dup_of, sim = resolve_component(keys, found, cos, pixels=px)
    by_key = dict(zip(keys, nodes))
    return [(n[0], (by_key[d][1], s, by_key[d][3])) for n, d, s in zip(nodes, dup_of, sim.tolist()) if d is not None]


def _decide(kv, val_fraction: float):
    id_, g = kv
    (n,) = g["named"]
    cluster = g["cluster"][0] if g["cluster"] else None
    if id_ < 0:
        pass  # an earlier output's item: already kept there, never written again
    elif g["decision"]:
        kept_key, sim, origin = g["decision"][0]
        yield beam.pvalue.TaggedOutput("rows", manifest_row(
            n.key, n.source, "duplicate", duplicate_of=kept_key, similarity=report_similarity(sim),
            cluster=cluster, width=n.width, height=n.height, previous=origin, scores=n.scores))
    else:
        yield kept_record(n, cluster, val_fraction)


def kept_record(n: Named, cluster: int | None, val_fraction: float) -> Kept:
    return Kept(n.id, n.key, n.source, n.pixel_hash, n.width, n.height, cluster, split_of(n.key, val_fraction),
                n.scores)


def _bad_or_good(kv):
    """(id, {named, embedding}) -> (Named, descriptor bytes) for valid descriptors; bad ones as rows;
    nothing for inputs that are not exact-dedup survivors (duplicates, repeats, rejected)."""
    _, g = kv
    for n in g["named"]:
        (emb,) = g["embedding"]
        if valid_rows(np.frombuffer(emb, np.float32)[None])[0]:
            yield n, emb
        else:
            yield beam.pvalue.TaggedOutput("rows", manifest_row(
                n.key, n.source, "rejected", reason=BAD_EMBEDDING, width=n.width, height=n.height,
                scores=n.scores))


# ------------------------------------------------------------------------------------------- reference

def read_reference(specs: list[str]) -> dict:
    """--reference embedding files (`flowcurate dedup`'s embeddings.parquet, OUT/embeddings/, or a
    Parquet of key + embedding) -> {"keys", "embeddings" (R, D), "valid" rows}, read on a worker."""
    from flowcurate.dedup.inputs import check_rows, classify, read_embedding_files

    kind, files = classify(specs, "--reference", set())
    if kind != "embeddings":
        raise ValueError("flowcurate run --reference takes embedding files (Parquet: key, embedding); "
                         "embed reference images first with flowcurate dedup")
    ref = read_embedding_files(files, None, "--reference")
    return {"keys": ref.keys, "embeddings": np.asarray(ref.embeddings, np.float32),
            "valid": np.flatnonzero(check_rows(ref.embeddings, ref.keys, "--reference", skip=True))}


class _Decontaminate(beam.DoFn):
    """Batches of Items -> the same Items, those whose descriptor is above the threshold to any
    reference item rejected as `filtered:reference` (as `flowcurate dedup --reference` decides)."""

    def __init__(self, dd: DedupConfig):
        self.dd = dd

    def process(self, batch, reference):
        rows = [i for i, it in enumerate(batch) if it.embedding is not None and it.reason is None]
        if rows:
            from flowcurate.dedup.reference import REFERENCE_REASON, match_reference

            x = np.stack([batch[i].vector() for i in rows])
            ok = np.flatnonzero(valid_rows(x))
            best, _ = match_reference(x, ok, reference["embeddings"], reference["valid"], reference["keys"], self.dd)
            for r, b in zip(rows, best.tolist()):
                if b >= 0:
                    batch[r] = batch[r]._replace(reason=REFERENCE_REASON)
        yield from batch


class Decide(beam.PTransform):
    """PCollection[Item] -> {'rows': manifest rows of every input not kept, 'kept': PCollection[Kept],
    'embedded': (Named, descriptor bytes) of every exact-dedup survivor with a valid descriptor}."""

    def __init__(self, dedup: DedupConfig, val_fraction: float, assign_batch: int = 1024,
                 reference: tuple[str, ...] = (), previous=None):
        super().__init__()
        self.reference = tuple(reference)
        self.previous = previous  # PCollection[Item] of earlier outputs' kept items (ReadPrevious), or None
        if dedup.priority not in ("pixels", "key"):
            raise ValueError(f"[dedup] priority must be 'pixels' or 'key', got {dedup.priority!r}")
        self.dd, self.val_fraction, self.assign_batch = dedup, val_fraction, assign_batch

    def expand(self, items):
        dd = self.dd
        if self.reference:  # decontamination first: a filtered item takes no part in any dedup
            reference = (items.pipeline | "ReferenceSpecs" >> beam.Create([list(self.reference)])
                         | "ReadReference" >> beam.Map(read_reference))
            items = (items | "ReferenceBatches" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.assign_batch)
                     | "Decontaminate" >> beam.ParDo(_Decontaminate(dd), AsSingleton(reference)))
        keyed = items
        if self.previous is not None:  # earlier outputs' keys are taken
            keyed = (items, self.previous) | "WithPreviousKeys" >> beam.Flatten()
        named = (keyed
                 | "SlimByKey" >> beam.Map(_slim)
                 | "GroupKeys" >> beam.GroupByKey()
                 | "NumberRepeats" >> beam.FlatMap(_number_repeats).with_output_types(Any)
                 .with_outputs("rows", main="named"))
        exact = (named.named
                 | "ByPixels" >> beam.Map(lambda n: (n.pixel_hash, n))
                 | "GroupPixels" >> beam.GroupByKey()
                 | "ExactDedup" >> beam.FlatMap(_resolve_exact).with_output_types(Any).with_outputs("dups", main="kept"))

        embeddings = (items
                      | "WithEmbedding" >> beam.Filter(lambda it: it.embedding is not None)
                      | "EmbeddingById" >> beam.Map(lambda it: (it.id, it.embedding)))
        checked = ({"named": exact.kept | "SurvivorById" >> beam.Map(lambda n: (n.id, n)), "embedding": embeddings}
                   | "JoinEmbeddings" >> beam.CoGroupByKey()
                   | "CheckEmbeddings" >> beam.FlatMap(_bad_or_good).with_output_types(Any)
                   .with_outputs("rows", main="good"))
        good = checked.good
        if not dd.near:  # exact duplicates only: every exact survivor with a valid descriptor is kept
            kept = good | "KeptAll" >> beam.Map(lambda ne, vf: kept_record(ne[0], None, vf), self.val_fraction)
            dups = exact.dups | "ExactRows" >> beam.Map(lambda kv: kv[1])
            rows = (named.rows, dups, checked.rows) | "DecisionRows" >> beam.Flatten()
            return {"rows": rows, "kept": kept, "embedded": good}

        embedded = good
        if self.previous is not None:  # searched with the new items; always kept, first in priority
            good = (good, self.previous | "PreviousNamed" >> beam.Map(
                lambda it: (Named(it.id, it.key, it.source, "", it.width, it.height), it.embedding))
                    ) | "WithPrevious" >> beam.Flatten()
        plan = (good | "Count" >> beam.combiners.Count.Globally() | "Plan" >> beam.Map(_plan, dd))
        centroids = (good
                     | "Sample" >> beam.Filter(lambda ne, p: p.k > 1 and in_kmeans_sample(ne[0].key, p.fraction),
                                               AsSingleton(plan))
                     | "SampleKV" >> beam.Map(lambda ne: (ne[0].key, ne[1]))
                     | "SampleList" >> beam.combiners.ToList()
                     | "KMeans" >> beam.Map(_train, AsSingleton(plan), dd))
        assigned = (good
                    | "Members" >> beam.Map(lambda ne: (ne[0].id, ne[1], ne[0].pixels))
                    | "AssignBatches" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.assign_batch)
                    | "Assign" >> beam.ParDo(_Assign(dd.assign, dd.assign_margin), AsSingleton(centroids))
                    .with_output_types(Any).with_outputs(_Assign.TOP1, main="members"))
        pairs = (assigned.members
                 | "ByCluster" >> beam.GroupByKey()
                 | "Search" >> beam.FlatMap(_search, dd.threshold, dd.block_rows))
        # the keys and sizes of the paired items only (few): the keep rule's priority order needs them
        nodes = ({"paired": pairs | "PairedIds" >> beam.FlatMap(lambda p: [(p[0], None), (p[1], None)]),
                  "node": good | "NodeById" >> beam.Map(
                      lambda ne: (ne[0].id, (ne[0].key, ne[0].pixels, ne[0].source if ne[0].id < 0 else None)))}
                 | "JoinNodes" >> beam.CoGroupByKey()
                 | "Nodes" >> beam.FlatMap(lambda kv: [(kv[0], *kv[1]["node"][0])] if kv[1]["paired"] else []))
        decisions = (pairs
                     | "PairList" >> beam.combiners.ToList()
                     | "KeepRule" >> beam.FlatMap(_resolve, AsSingleton(nodes | "NodeList" >> beam.combiners.ToList()),
                                                  dd.priority))
        final = ({"named": good | "GoodById" >> beam.Map(lambda ne: (ne[0].id, ne[0])),
                  "cluster": assigned[_Assign.TOP1], "decision": decisions}
                 | "JoinDecisions" >> beam.CoGroupByKey()
                 | "Decide" >> beam.FlatMap(_decide, self.val_fraction).with_output_types(Any)
                 .with_outputs("rows", main="kept"))
        dups = ({"dup": exact.dups, "decision": decisions} | "JoinExactDups" >> beam.CoGroupByKey()
                | "ExactRows" >> beam.FlatMap(_exact_rows))
        rows = ((named.rows, dups, checked.rows, final.rows) | "DecisionRows" >> beam.Flatten())
        return {"rows": rows, "kept": final.kept, "embedded": embedded}
