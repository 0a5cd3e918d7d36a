"""SD3 Algorithm 2 (after Carlini et al. 2023): is a generation in a clique of at least T of its
prompt's K generations, two joined where their tiled l2 is below eps?

- `tiled_distances`: pixels in [0, 1], a 4x4 grid of tiles scaled to the image size, the RMS difference
  inside each tile (Carlini's l2 normalised by dimension), the maximum over tiles (plain l2 let
  all-grey backgrounds match, SD3 App. E.3); one matrix product per tile for all K x K pairs.
- `clique_test`: decided per generation by a branch-and-bound search that stops at the first clique of
  T, not by listing every maximal clique, which is exponential in the density (64 generations at edge
  probability 0.9 took over 20 s; SD3 uses 500). `_exhaustive_clique_sizes` (Bron-Kerbosch) is kept
  as the reference the tests and benchmarks/memorization_cliques.py check it against.

Used by trainer/memorization.py (`flowcurate memorization`); imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

EPS = 0.15  # tiled l2 on [0, 1] pixels: SD3 Algorithm 2 / Carlini et al.
MIN_CLIQUE = 10  # Carlini et al.'s clique size T
GRID = 4  # 4x4 tiles (SD3: 16 tiles of 128x128 on 512x512 images)


def tiled_distances(images: np.ndarray, grid: int = GRID) -> np.ndarray:
    """images (N, H, W, 3) uint8 -> (N, N) float64: the maximum over a grid x grid tiling (tile edges
    at round(i H / grid)) of the RMS difference of [0, 1] pixels inside a tile.

    All N x N pairs of a tile in one matrix product (|a|^2 + |b|^2 - 2 a.b); only one tile of the
    N images is float64 at a time (1/16 of them: 500 images of 512^2 would be 3.1 GB as float64)."""
    images = np.asarray(images)
    n, h, w = images.shape[:3]
    if h < grid or w < grid:
        raise ValueError(f"{h}x{w} images cannot be cut into {grid}x{grid} tiles")
    ys, xs = np.linspace(0, h, grid + 1).round().astype(int), np.linspace(0, w, grid + 1).round().astype(int)
    dist = np.zeros((n, n))
    for i in range(grid):
        for j in range(grid):
            t = images[:, ys[i]:ys[i + 1], xs[j]:xs[j + 1]].reshape(n, -1).astype(np.float64) / 255.0
            sq = (t * t).sum(axis=1)
            d2 = (sq[:, None] + sq[None, :] - 2 * t @ t.T) / t.shape[1]
            dist = np.maximum(dist, np.sqrt(np.clip(d2, 0, None)))
    np.fill_diagonal(dist, 0.0)
    return dist


CLIQUE_BUDGET = 20_000  # search nodes expanded per generation before its answer is "undecided"


@dataclass(frozen=True)
class CliqueAnswers:
    """Per node of one prompt's graph: is it in a clique of at least T? (SD3 Algorithm 2's question)

    `size` is the largest clique found containing the node: a lower bound on the largest there is, and
    exactly it where `exact` (the bound met an upper bound: the node's core number + 1, or T - 1 once the
    search proved there is no clique of T). `memorized`: a clique of >= T was found (so `size >= T`).
    `undecided`: the search for this node spent its budget without finding such a clique or proving there
    is none; it is not memorized as far as anyone knows. `expanded`: search nodes expanded in all."""

    size: np.ndarray  # (N,) int32
    exact: np.ndarray  # (N,) bool
    memorized: np.ndarray  # (N,) bool
    undecided: np.ndarray  # (N,) bool
    expanded: int


def clique_edges(dist: np.ndarray, eps: float = EPS) -> np.ndarray:
    """(N, N) distances -> (N, N) bool adjacency: an edge wherever d < eps, none on the diagonal."""
    edges = np.asarray(dist) < eps
    np.fill_diagonal(edges, False)
    return edges


def _bitsets(edges: np.ndarray) -> list[int]:
    """Row i of a bool matrix -> a Python int with bit j set where edges[i, j]: set algebra on a few
    hundred nodes becomes one machine-speed operation on the int's limbs."""
    packed = np.packbits(edges, axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


def _degeneracy(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, core): nodes in the order repeatedly taking a node of least remaining degree removes them
    (Matula-Beck), and each node's core number. A clique of s nodes lies in the (s-1)-core, so core + 1
    bounds the largest clique through a node."""
    n = len(edges)
    deg = edges.sum(axis=1).astype(np.int64)
    removed = np.zeros(n, bool)
    order, core = np.empty(n, np.int64), np.empty(n, np.int64)
    k = 0
    for i in range(n):
        v = int(np.argmin(np.where(removed, n + 1, deg)))
        k = max(k, int(deg[v]))
        order[i], core[v], removed[v] = v, k, True
        deg -= edges[v]
    return order, core


def _branch_set(cand: int, excl: list[int], kmin: int) -> int:
    """The nodes of `cand` worth branching on when `kmin` more clique nodes are needed: those left after
    kmin - 1 greedy colour classes (Tomita's MCQ colouring bound, on bitsets as in San Segundo's BBMC).

    The nodes inside those classes form kmin - 1 independent sets, so they alone hold a clique of at most
    kmin - 1: every clique of kmin in `cand` has a node outside them. Branching on each outside node (the
    branch taking the remaining candidates, the classes included) therefore misses none. With a fixed
    target the later classes' colours never prune, so they are not computed. `excl[v]` is the
    complement of v's closed neighbourhood: one AND per coloured node."""
    uncoloured = cand
    for _ in range(kmin - 1):
        free = uncoloured
        if not free:
            break
        while free:
            low = free & -free
            uncoloured ^= low
            free &= excl[low.bit_length() - 1]
    return uncoloured


def _grow(clique: list[int], cand: int, adj: list[int], prefer: int) -> list[int]:
    """`clique` grown greedily to a maximal clique from `cand` (its common neighbours), taking a node of
    `prefer` while there is one, the lowest bit first."""
    while cand:
        pick = cand & prefer or cand
        low = pick & -pick
        clique.append(low.bit_length() - 1)
        cand &= adj[clique[-1]]
    return clique


def _search(root: int, cand: int, adj: list[int], excl: list[int], t: int,
            budget: int) -> tuple[list[int] | None, list[int], int]:
    """A clique of >= t nodes containing `root`, all others from `cand` (root's neighbours).

    Branch and bound (MCQ with a fixed target): depth first, branching only on the nodes the colouring
    bound leaves (`_branch_set`), the highest core first; it stops at the first clique of t. Iterative,
    with an explicit stack (one frame per clique node, so the depth is at most t). Returns (the clique or
    None, the deepest clique seen, nodes expanded); None with `expanded >= budget` means the budget ran
    out (undecided), otherwise that there is none."""
    path = [root]
    deepest = [root]
    if t <= 1:
        return path, path, 0
    if cand.bit_count() < t - 1:
        return None, deepest, 0
    stack = [[cand, _branch_set(cand, excl, t - 1)]]
    expanded = 0
    while stack:
        frame = stack[-1]
        branch = frame[1]
        if not branch:
            stack.pop()
            path.pop()
            continue
        low = branch & -branch
        v = low.bit_length() - 1
        frame[1] = branch ^ low
        cand = frame[0]
        frame[0] = cand ^ low  # v's siblings do not look at v again
        cand &= adj[v]
        expanded += 1
        path.append(v)
        if len(path) > len(deepest):
            deepest = path.copy()
        if len(path) >= t:
            return path, path, expanded
        if expanded >= budget:
            return None, deepest, expanded
        if len(path) + cand.bit_count() >= t:
            branch = _branch_set(cand, excl, t - len(path))
            if branch:
                stack.append([cand, branch])
                continue
        path.pop()
    return None, deepest, expanded


def clique_test(edges: np.ndarray, min_clique: int = MIN_CLIQUE, budget: int = CLIQUE_BUDGET) -> CliqueAnswers:
    """For each node of an undirected graph ((N, N) bool, symmetric, no diagonal): is it in a clique of
    at least `min_clique` (T) nodes? Exact, except for nodes whose search expands more than `budget`
    search nodes: those are reported undecided.

    Listing every maximal clique (Bron-Kerbosch) answers this too, but its cost grows exponentially with
    the graph's density: 64 generations joined with probability 0.9 took over 20 s, and SD3 uses 500. The
    question needs far less:

    - a node of core number < T - 1 is in no clique of T (a clique of T is in the (T-1)-core);
    - a greedy clique through each node gives every node a size, and those of T or more are answered;
    - the other nodes, least core first, try a greedy clique again (among the nodes still in question)
      and, when it falls short, search their neighbourhood for T - 1 more (`_search`); the
      first clique of T found stops the search, and every node of it (grown to a maximal clique, for the
      size column) is answered yes at once, so a dense graph needs a few searches, not one per node;
    - a node answered no leaves the graph (it is in no clique of T, so no clique of T needs it), which
      lowers its neighbours' degrees; those below T - 1 leave too. Later searches look at fewer nodes.
    Nodes are renumbered so the bit order is highest core first: the colouring bound is tighter and a
    search meets big cliques early. The answers do not depend on the input order (the sizes found may)."""
    edges = np.asarray(edges, bool)
    n, t = len(edges), int(min_clique)
    if edges.shape != (n, n) or (edges != edges.T).any() or edges.diagonal().any():
        raise ValueError("edges must be a symmetric (N, N) bool matrix with an empty diagonal")
    order, core = _degeneracy(edges)
    node = order[::-1].copy()  # bit p is node[p]: the highest core first
    adj = _bitsets(ranked := edges[np.ix_(node, node)])
    excl = [~(a | 1 << v) for v, a in enumerate(adj)]
    core_ranked = core[node]

    size = np.ones(n, np.int64)
    for v in range(n):  # a quick greedy clique through each node: a lower bound for those never searched
        clique, cand = [v], adj[v]
        while cand:
            low = cand & -cand
            clique.append(low.bit_length() - 1)
            cand &= adj[clique[-1]]
        for u in clique:
            size[u] = max(size[u], len(clique))

    yes, undecided = size >= t, np.zeros(n, bool)  # a greedy clique of t is an answer already
    yes_bits = sum(1 << v for v in np.flatnonzero(yes).tolist())
    in_graph = core_ranked >= t - 1  # the nodes still in question (or answered yes), also as a bitset
    alive = sum(1 << v for v in np.flatnonzero(in_graph).tolist())
    degree = (ranked & in_graph).sum(axis=1)

    def leave(v: int) -> None:
        """v is in no clique of t: drop it, and every node that falls below t - 1 neighbours after."""
        nonlocal alive
        todo = [v]
        while todo:
            u = todo.pop()
            if not in_graph[u]:
                continue
            in_graph[u], undecided[u] = False, False
            alive &= ~(1 << u)
            degree[ranked[u]] -= 1
            todo += np.flatnonzero(ranked[u] & in_graph & (degree < t - 1)).tolist()

    expanded = 0
    for v in range(n - 1, -1, -1):  # least core first: cheap answers, and the graph shrinks
        if yes[v] or not in_graph[v]:
            continue
        if degree[v] < t - 1:
            leave(v)
            continue
        # first a greedy clique through v, new nodes first: in a dense graph it is the answer
        found, work = _grow([v], adj[v] & alive, adj, alive & ~yes_bits), 0
        if len(found) < t:
            found, deepest, work = _search(v, adj[v] & alive, adj, excl, t, budget)
            expanded += work
            for u in deepest:
                size[u] = max(size[u], len(deepest))
        if found is not None:
            common = alive
            for u in found:
                common &= adj[u]
            # grown to a maximal clique, new nodes first: a better size for its members, and more of them
            # answered by this one search
            clique = _grow(list(found), common, adj, alive & ~yes_bits)
            for u in clique:
                yes[u], undecided[u] = True, False
                size[u] = max(size[u], len(clique))
                yes_bits |= 1 << u
        elif work >= budget:
            undecided[v] = True
        else:
            leave(v)

    upper = np.where(yes, core_ranked + 1, np.minimum(core_ranked + 1, max(t - 1, 1)))
    upper = np.where(undecided, core_ranked + 1, upper)
    back = np.empty(n, np.int64)
    back[node] = np.arange(n)  # ranked position of each input node
    return CliqueAnswers(size[back].astype(np.int32), (size >= upper)[back], yes[back], undecided[back], expanded)


def concat_answers(parts: Sequence[CliqueAnswers]) -> CliqueAnswers:
    """The answers of several graphs, one after the other (work summed)."""
    return CliqueAnswers(*(np.concatenate([getattr(a, f) for a in parts])
                           for f in ("size", "exact", "memorized", "undecided")), sum(a.expanded for a in parts))


def _maximal_cliques(adj: Sequence[set[int]]) -> list[frozenset[int]]:
    """Every maximal clique of an undirected graph (Bron-Kerbosch with pivoting); `adj[v]` excludes v.
    Exponential in the density: kept as the reference the tests and benchmarks/memorization_cliques.py
    check `clique_test` against."""
    found: list[frozenset[int]] = []

    def expand(r: frozenset[int], p: set[int], x: set[int]) -> None:
        if not p and not x:
            found.append(r)
            return
        pivot = max(p | x, key=lambda u: len(adj[u] & p))
        for v in list(p - adj[pivot]):
            expand(r | {v}, p & adj[v], x & adj[v])
            p.remove(v)
            x.add(v)

    expand(frozenset(), set(range(len(adj))), set())
    return found


def _exhaustive_clique_sizes(edges: np.ndarray) -> np.ndarray:
    """(N, N) bool adjacency -> (N,) size of the largest clique containing each node, by listing every
    maximal clique (the reference; a node alone is a clique of 1)."""
    edges = np.asarray(edges, bool)
    adj = [set(np.flatnonzero(row).tolist()) - {i} for i, row in enumerate(edges)]
    best = np.ones(len(edges), np.int32)
    for c in _maximal_cliques(adj):
        for v in c:
            best[v] = max(best[v], len(c))
    return best
