"""`clique_test` (SD3 Algorithm 2's question, decided per node by branch and bound) against the
exhaustive reference (every maximal clique, Bron-Kerbosch): the same answers on a sweep of sizes,
densities and thresholds, whatever the node order; a budget too small gives "undecided", never a wrong
answer; and the work stays small where listing cliques explodes."""

from __future__ import annotations

import numpy as np
import pytest

from flowcurate.trainer.cliques import (
    _exhaustive_clique_sizes,
    _search,
    clique_test,
)

SIZES = (5, 10, 20, 30, 40)
DENSITIES = (0.1, 0.3, 0.45, 0.6, 0.8, 0.95)


def random_graph(n: int, p: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.random((n, n)) < p, 1)
    return upper | upper.T


def thresholds(reference: np.ndarray) -> list[int]:
    """Fixed ones, and the ones around the largest clique, where the answer flips."""
    top = int(reference.max())
    return sorted({1, 2, 3, 4, 6, 10, top - 1, top, top + 1} - {0})


def check(edges: np.ndarray, reference: np.ndarray, t: int, budget: int | None = None) -> np.ndarray:
    """Every decided answer agrees with the reference, sizes are true lower bounds (exact where they
    say so), and memorized is exactly size >= t. Returns the undecided mask."""
    a = clique_test(edges, t) if budget is None else clique_test(edges, t, budget)
    decided = ~a.undecided
    assert (a.memorized[decided] == (reference >= t)[decided]).all()
    assert not (a.memorized & a.undecided).any()
    assert (a.memorized == (a.size >= t)).all()
    assert (a.size >= 1).all() and (a.size <= reference).all()
    assert (a.size[a.exact] == reference[a.exact]).all()
    return a.undecided


@pytest.mark.parametrize("n", SIZES)
def test_same_answers_as_the_exhaustive_method(n):
    exact = checked = 0
    for p in DENSITIES:
        for seed in range(3):
            edges = random_graph(n, p, seed)
            reference = _exhaustive_clique_sizes(edges)
            for t in thresholds(reference):
                undecided = check(edges, reference, t)
                assert not undecided.any(), (n, p, seed, t)
                a = clique_test(edges, t)
                exact += int(a.exact.sum())
                checked += n
    # the exact flag is not vacuous: where it is set, check() compared the size with the reference
    assert exact > 0.1 * checked, (exact, checked)


def test_answers_do_not_depend_on_node_order():
    rng = np.random.default_rng(7)
    for n, p in ((25, 0.45), (40, 0.6), (40, 0.3), (30, 0.9)):
        edges = random_graph(n, p, n)
        reference = _exhaustive_clique_sizes(edges)
        for t in (3, int(reference.max()), int(reference.max()) + 1):
            base = clique_test(edges, t)
            for _ in range(3):
                perm = rng.permutation(n)  # new node i is old node perm[i]
                moved = clique_test(edges[np.ix_(perm, perm)], t)
                assert (moved.memorized == base.memorized[perm]).all(), (n, p, t)
                assert not moved.undecided.any() and not base.undecided.any()


def test_planted_clique_in_a_sparse_graph():
    n, planted = 200, np.arange(10, 200, 5)[:30]  # 30 generations that copy one image
    edges = random_graph(n, 0.05, 3)
    edges[np.ix_(planted, planted)] = True
    np.fill_diagonal(edges, False)
    reference = _exhaustive_clique_sizes(edges)
    assert set(np.flatnonzero(reference >= 10)) == set(planted.tolist())
    a = clique_test(edges, 10)
    assert set(np.flatnonzero(a.memorized)) == set(planted.tolist()) and not a.undecided.any()
    assert (a.size[planted] >= 30).all()  # the found clique was grown to the whole planted one
    assert a.expanded == 0  # k-core pruning and one greedy clique answered every node


def test_a_tiny_budget_gives_undecided_not_wrong_answers():
    undecided = 0
    for n, p in ((40, 0.45), (40, 0.6), (30, 0.3), (40, 0.8)):
        for seed in range(3):
            edges = random_graph(n, p, seed)
            reference = _exhaustive_clique_sizes(edges)
            for t in thresholds(reference):
                for budget in (1, 2, 5):
                    undecided += int(check(edges, reference, t, budget).sum())
    assert undecided > 0  # the budget did cut searches short, and check() found no wrong answer


def test_undecided_answers_are_counted_and_the_budget_bounds_the_work():
    # the hard middle: the largest clique is about T, so most nodes need a real search to be proved out
    edges = random_graph(120, 0.5, 0)
    t = int(_exhaustive_clique_sizes(edges).max()) + 1  # no clique of t: every searched node is a "no"
    full = clique_test(edges, t)
    assert not full.memorized.any() and not full.undecided.any() and full.expanded > 0
    cut = clique_test(edges, t, budget=3)
    assert cut.undecided.any() and not cut.memorized.any()
    assert cut.expanded <= 3 * len(edges)  # at most the budget per searched node
    assert cut.expanded < full.expanded


def test_dense_graphs_need_little_search():
    # listing the maximal cliques of 64 nodes at density 0.9 took over 20 s; here 300 nodes at 0.95 and
    # 0.8 are answered by greedy cliques grown to maximal (no branch and bound at all), and 0.5 by a few
    for p, most in ((0.95, 0), (0.8, 0), (0.5, 5_000)):
        a = clique_test(random_graph(300, p, 1), 10)
        assert a.memorized.all() and not a.undecided.any(), p
        assert a.expanded <= most, (p, a.expanded)


def test_search_is_iterative():
    # a clique deeper than Python's recursion limit, found by the explicit-stack search itself
    n = 1200
    adj = [((1 << n) - 1) & ~(1 << v) for v in range(n)]
    excl = [~(a | 1 << v) for v, a in enumerate(adj)]
    found, deepest, expanded = _search(0, adj[0], adj, excl, n, budget=10 * n)
    assert found is not None and sorted(found) == list(range(n)) and expanded == n - 1
    found, _, expanded = _search(0, adj[0], adj, excl, n + 1, budget=10 * n)
    assert found is None and expanded == 0  # n - 1 candidates cannot make n more


def test_trivial_thresholds_and_bad_input():
    edges = random_graph(12, 0.3, 0)
    reference = _exhaustive_clique_sizes(edges)
    assert clique_test(edges, 1).memorized.all()
    assert (clique_test(edges, 2).memorized == (edges.sum(axis=1) > 0)).all()
    assert (clique_test(edges, 2).memorized == (reference >= 2)).all()
    assert not clique_test(np.zeros((0, 0), bool), 10).memorized.any()
    with pytest.raises(ValueError):
        clique_test(np.triu(edges), 3)  # not symmetric
    with pytest.raises(ValueError):
        clique_test(edges | np.eye(12, dtype=bool), 3)  # self loops
