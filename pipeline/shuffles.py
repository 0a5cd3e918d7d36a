"""How many bytes a finished run sent through its shuffles, from the runner's own metrics.

A shuffle here is every PCollection that feeds a GroupByKey (CoGroupByKey and Reshuffle are built on
it) or is read as a side input: on Dataflow, Spark or Flink those bytes leave the worker; Beam's
in-process runner holds them whole in memory. Beam samples the encoded size of elements per
PCollection (`beam:metric:sampled_byte_size:v1`) and counts elements exactly; their product estimates
the bytes. Works with the in-process runner (FnApiRunner), whose results carry monitoring infos.

    result = p.run(); result.wait_until_finish()
    sizes = shuffle_bytes(p, result)     # {"Decide/GroupKeys (group)": 123456, ...}
"""

from __future__ import annotations

from apache_beam.metrics.monitoring_infos import ELEMENT_COUNT_URN, SAMPLED_BYTE_SIZE_URN
from apache_beam.portability.api import beam_runner_api_pb2

GROUP_BY_KEY_URN = "beam:transform:group_by_key:v1"
COMBINE_PER_KEY_URN = "beam:transform:combine_per_key:v1"
PARDO_URN = "beam:transform:pardo:v1"


def shuffle_feeds(proto: beam_runner_api_pb2.Pipeline) -> dict[str, str]:
    """PCollection id -> a label naming the shuffle it feeds (a GroupByKey or a side input).

    The GroupByKey inside a combine (Count, Sum, ...) is left out: runners lift combines, so what
    crosses that shuffle is one partial result per bundle, not the combine's input."""
    transforms = proto.components.transforms
    lifted = {sub for t in transforms.values() if t.spec.urn == COMBINE_PER_KEY_URN for sub in t.subtransforms}
    feeds = {}
    for tid, t in transforms.items():
        if t.spec.urn == GROUP_BY_KEY_URN and tid not in lifted:
            for pcoll in t.inputs.values():
                feeds[pcoll] = f"{t.unique_name} (group)"
        elif t.spec.urn == PARDO_URN:
            payload = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload)
            for tag in payload.side_inputs:
                feeds[t.inputs[tag]] = f"{t.unique_name} (side input {tag})"
    return feeds


def _varints(data: bytes) -> list[int]:
    out, value, shift = [], 0, 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            out.append(value)
            value, shift = 0, 0
    return out


def pcollection_bytes(result) -> dict[str, float]:
    """PCollection id -> estimated encoded bytes (mean sampled element size x element count)."""
    counts, means = {}, {}
    for mi in result.monitoring_infos():
        pcoll = mi.labels.get("PCOLLECTION")
        if mi.urn == ELEMENT_COUNT_URN:
            counts[pcoll] = _varints(mi.payload)[0]
        elif mi.urn == SAMPLED_BYTE_SIZE_URN:
            sampled, total = _varints(mi.payload)[:2]
            if sampled:
                means[pcoll] = total / sampled
    return {p: means[p] * counts.get(p, 0) for p in means}


def shuffle_bytes(pipeline, result) -> dict[str, int]:
    """Shuffle label -> estimated bytes that went through it in this run."""
    sizes = pcollection_bytes(result)
    return {label: int(sizes.get(pcoll, 0)) for pcoll, label in shuffle_feeds(pipeline.to_runner_api()).items()}
