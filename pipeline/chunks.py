"""Deterministic batches for model stages (docs/architecture.md "Determinism": batch composition changes
float results, so reruns are byte-identical only when batches are formed the same way every time).

`Chunks` groups elements by a stable group id, sorts each group by key and cuts it into chunks of at
most `size`; a chunk is one element for a `RunInference` step whose handler runs each chunk on its own
(`batch_elements_kwargs` -> max_batch_size 1). So what a model sees together depends only on the set
of elements, never on the runner, the worker count, bundle boundaries or arrival order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import apache_beam as beam

from flowcurate.formats.hashing import stable_hash


class Chunk(NamedTuple):
    group: Any  # the group id (e.g. a shard name)
    index: int  # chunk number within the group, in key order
    items: list  # sorted by key


def stable_bucket(key: str, buckets: int) -> int:
    """key -> [0, buckets) by its stable `chunk` hash."""
    return stable_hash("chunk", key) % max(1, buckets)


def split_sorted(group, items, size: int, key: Callable[[Any], str]):
    items = sorted(items, key=key)
    for i in range(0, len(items), size):
        yield Chunk(group, i // size, items[i:i + size])


class Chunks(beam.PTransform):
    """PCollection[T] -> PCollection[Chunk].

    key: T -> str, unique per element. group: T -> group id; or None to spread elements over
    hash buckets of about `size * per_group` elements each (the count is a side input, so the number
    of buckets follows the data). size: elements per chunk (the model batch).
    """

    def __init__(self, key: Callable[[Any], str], size: int, group: Callable[[Any], Any] | None = None,
                 per_group: int = 16):
        super().__init__()
        self.key, self.size, self.group, self.per_group = key, max(1, int(size)), group, per_group

    def expand(self, pcoll):
        key, size = self.key, self.size
        if self.group is None:
            count = pcoll | "Count" >> beam.combiners.Count.Globally()
            per = size * self.per_group

            def bucket(x, n):
                return stable_bucket(key(x), math.ceil(n / per)), x

            keyed = pcoll | "Bucket" >> beam.Map(bucket, beam.pvalue.AsSingleton(count))
        else:
            group = self.group
            keyed = pcoll | "ByGroup" >> beam.Map(lambda x: (group(x), x))
        return (keyed
                | "Group" >> beam.GroupByKey()
                | "Split" >> beam.FlatMap(lambda kv: split_sorted(kv[0], kv[1], size, key)))
