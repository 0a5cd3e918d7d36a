"""The keep rule: SD3 Algorithm 1 (App. E.2), applied once over all found pairs, in priority order.

Visit items in priority order (more pixels first, then key; without sizes, key). An item nobody has
removed yet is kept and removes every found neighbour not yet removed; `duplicate_of` is the kept item
that removed it, `similarity` their cosine. This is greedy, not transitive: in a chain A~B~C with A
first, A removes B and C stays (SemDeDup's rule, "similar to any earlier item", would drop C too).

The outcome for an item depends only on the pairs and the relative order of items in its connected
component, so components can be resolved anywhere, in any order (`resolve_component`), and the union
equals `keep_greedy` over everything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flowcurate.dedup.numerics import above


def priority_rank(keys: Sequence[str], pixels: np.ndarray | None = None) -> np.ndarray:
    """keys: (N,) unique strings; pixels: (N,) width*height or None -> (N,) int64 visiting rank
    (0 first). More pixels first, then key (Python string order); unknown sizes (None, NaN, <= 0)
    count as 0 pixels, i.e. after every known size."""
    n = len(keys)
    key_order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    if pixels is None:
        order = key_order
    else:
        px = np.array([np.nan if v is None else v for v in pixels], dtype=np.float64).reshape(n)
        px = np.where(np.isfinite(px) & (px > 0), px, 0.0)
        key_pos = np.empty(n, dtype=np.int64)
        key_pos[key_order] = np.arange(n)
        order = np.lexsort((key_pos, -px))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank


def keep_greedy(
    n: int, pairs: np.ndarray, cos: np.ndarray, rank: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """SD3 Algorithm 1 once over all pairs. pairs: (P, 2) int64 item indices (any orientation,
    repeats allowed), cos: (P,), rank: (N,) from `priority_rank` -> duplicate_of (N,) int64 (-1: not
    removed), similarity (N,) float32 (NaN where not removed)."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    cos = np.asarray(cos, dtype=np.float32)
    rank = np.asarray(rank, dtype=np.int64)
    u, v = pairs[:, 0], pairs[:, 1]
    first = np.where(rank[u] <= rank[v], u, v)  # visited earlier
    second = np.where(rank[u] <= rank[v], v, u)
    # Process edges in the visiting order of their earlier end. When an item's edges come up, every
    # item ranked before it is settled, so "not removed yet" means kept.
    order = np.lexsort((rank[second], rank[first]))
    removed = bytearray(n)
    dup_of = [-1] * n
    edge = [-1] * n
    for a, b, e in zip(first[order].tolist(), second[order].tolist(), order.tolist()):
        if removed[a] or removed[b] or a == b:
            continue
        removed[b] = 1
        dup_of[b] = a
        edge[b] = e
    duplicate_of = np.asarray(dup_of, dtype=np.int64)
    similarity = np.full(n, np.nan, dtype=np.float32)
    hit = duplicate_of >= 0
    similarity[hit] = cos[np.asarray(edge, dtype=np.int64)[hit]]
    return duplicate_of, similarity


def resolve_component(
    keys: Sequence[str],
    pairs: np.ndarray,
    cos: np.ndarray,
    *,
    pixels: np.ndarray | None = None,
    threshold: float | None = None,
) -> tuple[list[str | None], np.ndarray]:
    """Decide one connected component (or any union of components) on its own.

    keys: (M,) the component's items; pairs: (P, 2) local indices into keys; cos: (P,); pixels: (M,)
    or None; threshold: drop pairs not above it first (re-running at a higher threshold).
    -> duplicate_of: M keys (None: kept), similarity (M,) float32 (NaN for kept items).
    Equals `keep_greedy` on the whole graph restricted to these items, because priority is a total
    order and decisions never cross components.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    cos = np.asarray(cos, dtype=np.float32)
    if threshold is not None:
        keep = above(cos, threshold)
        pairs, cos = pairs[keep], cos[keep]
    dup_of, sim = keep_greedy(len(keys), pairs, cos, priority_rank(keys, pixels))
    return [None if d < 0 else keys[d] for d in dup_of.tolist()], sim


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """pairs: (P, 2) item indices -> (N,) int64 component label = the smallest item index in it
    (isolated items are their own component). Union-find by pointer jumping, all numpy."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    label = np.arange(n, dtype=np.int64)
    if len(pairs) == 0:
        return label
    u, v = pairs[:, 0], pairs[:, 1]
    while True:
        lu, lv = label[u], label[v]
        low = np.minimum(lu, lv)
        new = label.copy()
        np.minimum.at(new, lu, low)
        np.minimum.at(new, lv, low)
        # pointer jumping: follow labels to their fixed point
        while True:
            nxt = new[new]
            if np.array_equal(nxt, new):
                break
            new = nxt
        if np.array_equal(new, label):
            return label
        label = new
