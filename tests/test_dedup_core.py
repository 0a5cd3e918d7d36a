"""dedup core: invariants, equality with brute-force SD3 Algorithm 1, and independence from input order,
thread count, block size and distribution."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from flowcurate.dedup.assign import assign_clusters, group_members
from flowcurate.dedup.core import DUPLICATE, KEPT, REJECTED, find_duplicates
from flowcurate.dedup.engine import Engine, block_pairs, search_block_pair
from flowcurate.dedup.keep import connected_components, keep_greedy, priority_rank, resolve_component
from flowcurate.dedup.kmeans import in_kmeans_sample, kmeans_sample_fraction, train_centroids
from flowcurate.dedup.numerics import pair_cosines, unit_rows
from flowcurate.dedup.search import search_cluster
from flowcurate.formats.config import DedupConfig
from flowcurate.formats.manifest import BAD_EMBEDDING
from flowcurate.models.tiny.planted import generate

T = 0.5


def cfg(threshold=T, **fields) -> DedupConfig:
    """The [dedup] section with these fields changed (clusters as the config spells it: "auto" or digits)."""
    return DedupConfig(threshold=threshold, **fields)


def planted(n=900, d=32, seed=0, copies=160, bins=((0.85, 0.95),), chains=10):
    """`flowcurate.models.tiny.planted` rows (isotropic) with `copies` near-copies at cosines in `bins`
    (~2 per base, so small groups), plus chains A~B~C with A!~C, exact copies, and a scattered scale
    so normalisation matters."""
    base = np.empty((n - 3 * chains - 5, d), np.float32)
    generate(base, "isotropic", seed, fraction=copies / len(base), bins=bins)
    rng = np.random.default_rng([seed, 7])
    rows = []
    for _ in range(chains):  # unit steps along a great circle: cos(A,B)=cos(B,C)=cos(55deg)>0.5, cos(A,C)<0.5
        p, q = np.linalg.qr(rng.standard_normal((d, 2)))[0].T
        rows += [np.cos(np.deg2rad(ang)) * p + np.sin(np.deg2rad(ang)) * q for ang in (0.0, 55.0, 110.0)]
    rows += [rows[-1]] * 5  # exact copies of the last chain end
    x = np.concatenate([base.astype(np.float64), np.stack(rows)])
    x *= rng.uniform(0.01, 100, size=(n, 1))
    keys = [f"img{v:06d}" for v in rng.permutation(n)]  # key order != row order
    return x.astype(np.float32), keys


def brute_force(x, keys, t, pixels=None):
    """SD3 Algorithm 1 over all items (one cluster), literally: visit in priority order, skip marked
    items, mark every range-search hit. -> {key: (status, duplicate_of key, similarity)}."""
    x64 = np.asarray(x, dtype=np.float64)
    norms = np.sqrt((x64 * x64).sum(axis=1))
    ok = np.isfinite(norms) & (norms > 0)
    u = np.zeros(x.shape, np.float32)
    u[ok] = (x64[ok] / norms[ok, None]).astype(np.float32)
    sim = (u.astype(np.float64) @ u.astype(np.float64).T).astype(np.float32)
    px = [0 if pixels is None else pixels[i] for i in range(len(keys))]
    order = sorted(np.flatnonzero(ok).tolist(), key=lambda i: (-px[i], keys[i]))
    dups: dict[int, tuple[int, float]] = {}
    for i in order:
        if i in dups:
            continue
        for j in np.flatnonzero(ok & (sim[i] > np.float32(t))).tolist():
            if j != i and j not in dups:
                dups[j] = (i, float(sim[i, j]))
    out = {}
    for i, k in enumerate(keys):
        if not ok[i]:
            out[k] = ("rejected", None, None)
        elif i in dups:
            out[k] = ("duplicate", keys[dups[i][0]], dups[i][1])
        else:
            out[k] = ("kept", None, None)
    return out


def decisions(result):
    """{key: (status, duplicate_of key, similarity)} from a DedupResult, comparable across row orders."""
    return {r["key"]: (r["status"], r["duplicate_of"], r["similarity"]) for r in result.rows()}


def key_pairs(result):
    return {
        (tuple(sorted((result.keys[i], result.keys[j]))), float(c))
        for (i, j), c in zip(result.pairs, result.pair_cos)
    }


def assert_same_decisions(a, b, sim_tol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][:2] == b[k][:2], (k, a[k], b[k])
        if a[k][2] is not None:
            assert abs(a[k][2] - b[k][2]) <= sim_tol, (k, a[k], b[k])


def check_invariants(result, x, t):
    n = len(x)
    assert len(result.keys) == len(result.status) == n  # exactly one row per input
    x64 = np.asarray(x, dtype=np.float64)
    u = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
    dup = np.flatnonzero(result.status == DUPLICATE)
    d_of = result.duplicate_of[dup]
    assert np.all(result.status[d_of] == KEPT)  # every duplicate names a kept item
    true = (u[dup] * u[d_of]).sum(axis=1)
    assert np.all(true > t - 1e-6)
    np.testing.assert_allclose(result.similarity[dup], true, atol=1e-5)
    assert np.all(result.duplicate_of[result.status != DUPLICATE] == -1)
    p = result.pairs
    assert np.all(p[:, 0] < p[:, 1])
    assert np.all((u[p[:, 0]] * u[p[:, 1]]).sum(axis=1) > t - 1e-6)  # no false pairs
    kept = result.status == KEPT
    assert not np.any(kept[p[:, 0]] & kept[p[:, 1]])  # no two kept items form a found pair
    assert np.all(result.cluster[result.status == REJECTED] == -1)
    assert np.all(result.cluster[result.status != REJECTED] >= 0)


@pytest.mark.parametrize("mode", [{"exact": True}, {"clusters": "1"}])
def test_exact_and_one_cluster_equal_brute_force_algorithm_1(mode):
    x, keys = planted()
    rng = np.random.default_rng(1)
    pixels = rng.choice([64 * 64, 128 * 128, 256 * 256], size=len(keys))  # many ties -> key decides
    result = find_duplicates(x, keys, cfg(block_rows=128, **mode), pixels=pixels)
    expected = brute_force(x, keys, T, pixels)
    assert_same_decisions(decisions(result), expected, sim_tol=1e-6)
    assert result.counts()["duplicate"] > 150
    check_invariants(result, x, T)


def test_cluster_mode_invariants_and_recall_mitigation():
    x, keys = planted(n=1500, seed=2)
    exact = find_duplicates(x, keys, cfg(exact=True))
    top1 = find_duplicates(x, keys, cfg(clusters="20", assign=1))
    top2 = find_duplicates(x, keys, cfg(clusters="20", assign=2, assign_margin=None))
    adaptive = find_duplicates(x, keys, cfg(clusters="20", assign=2, assign_margin=0.02))
    e, p1, p2, pa = (key_pairs(r) for r in (exact, top1, top2, adaptive))
    assert p1 <= pa <= p2 <= e  # top-2 groups contain top-1 groups; found pairs are true pairs
    close = {p for p in e if p[1] > 0.8}  # the planted near-copies (32-d noise pairs sit near 0.5)
    assert len(p1 & close) < len(close)  # this data does split close pairs across clusters...
    assert len(p2 & close) > len(p1 & close) and len(p2 & close) / len(close) > 0.97  # ...top-2 recovers them
    for r in (top1, top2, adaptive):
        check_invariants(r, x, T)
        assert r.stats["n_clusters"] == 20
    assert top2.assignment.shape == (len(x), 2) and np.all(top2.assignment[:, 1] >= 0)
    assert 1.0 < adaptive.stats["assignments_per_item"] < 2.0


def test_adversarial_inputs_rejected_and_strict_threshold():
    d = 8
    e = np.eye(d, dtype=np.float32)
    rows = [
        e[0],  # a
        np.array([0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0], np.float32),  # cos(a, .) == 0.5 exactly: not a pair
        np.array([0.75, 0, 0, 0, 0, 0, 0, 0.6614378], np.float32),  # cos(a, .) ~ 0.75: a pair
        -e[0],  # antipodal
        np.zeros(d, np.float32),  # zero
        np.full(d, np.nan, np.float32),  # NaN
        np.array([np.inf] + [0] * (d - 1), np.float32),  # inf
        e[0] * 1e-30,  # tiny but fine: same direction as a
        np.array([1, 0, 0, 0, 0, 0, np.nan, 0], np.float32),  # one NaN component
    ]
    x = np.stack(rows)
    keys = list("abcdefghi")
    result = find_duplicates(x, keys, cfg(0.5, exact=True))
    dec = decisions(result)
    for k in "efgi":
        assert dec[k][0] == "rejected"
    assert list(result.reason[[4, 5, 6, 8]]) == [BAD_EMBEDDING] * 4
    assert dec["b"] == ("kept", None, None)  # strict >
    assert dec["c"][:2] == ("duplicate", "a") and dec["h"][:2] == ("duplicate", "a")
    assert dec["d"] == ("kept", None, None)
    assert {(i, j) for i, j in result.pairs.tolist()} == {(0, 2), (0, 7), (2, 7)}
    assert find_duplicates(x, keys, cfg(0.4999, exact=True)).status[1] == DUPLICATE  # just below 0.5: a pair
    assert_same_decisions(dec, brute_force(x, keys, 0.5))


def test_one_dense_group_larger_than_blocks():
    rng = np.random.default_rng(3)
    base = rng.standard_normal(16)
    x = (base + 0.05 * rng.standard_normal((300, 16))).astype(np.float32)
    x[:10] = x[10]  # exact copies
    keys = [f"k{i:03d}" for i in range(300)]
    result = find_duplicates(x, keys, cfg(clusters="1", block_rows=32))
    assert result.counts() == {"kept": 1, "duplicate": 299, "rejected": 0}
    assert len(result.pairs) == 300 * 299 // 2
    assert result.keys[result.status == KEPT][0] == "k000"
    np.testing.assert_allclose(result.similarity[1:10], 1.0, atol=1e-6)
    check_invariants(result, x, T)


def test_independent_of_input_order_threads_blocks_and_scale():
    x, keys = planted(n=1200, seed=4)
    kw = dict(clusters="12", assign=2, kmeans_sample=600)
    ref = find_duplicates(x, keys, cfg(**kw))
    ref_dec, ref_pairs = decisions(ref), key_pairs(ref)
    perm = np.random.default_rng(5).permutation(len(x))
    permuted = find_duplicates(x[perm], [keys[i] for i in perm], cfg(**kw))
    assert decisions(permuted) == ref_dec
    assert key_pairs(permuted) == ref_pairs
    # the top-1 cluster of every key is the same too (same centroids, same assignment)
    assert dict(zip(permuted.keys, permuted.cluster.tolist())) == dict(zip(ref.keys, ref.cluster.tolist()))
    old = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        one = find_duplicates(x, keys, cfg(block_rows=64, **kw), threads=1)
    finally:
        faiss.omp_set_num_threads(old)
    assert decisions(one) == ref_dec and key_pairs(one) == ref_pairs
    scaled = x * np.float32(2.0) ** np.random.default_rng(6).integers(-20, 20, size=(len(x), 1))
    assert decisions(find_duplicates(scaled.astype(np.float32), keys, cfg(**kw))) == ref_dec


def test_float16_memmap_equals_in_memory(tmp_path):
    x, keys = planted(n=700, seed=7)
    x16 = (x / np.abs(x).max(axis=1, keepdims=True)).astype(np.float16)
    mm = np.lib.format.open_memmap(tmp_path / "emb.npy", mode="w+", dtype=np.float16, shape=x16.shape)
    mm[:] = x16
    mm.flush()
    mm = np.load(tmp_path / "emb.npy", mmap_mode="r")
    a = find_duplicates(mm, keys, cfg(clusters="5", kmeans_sample=400, block_rows=100))
    b = find_duplicates(x16.astype(np.float32), keys, cfg(clusters="5", kmeans_sample=400))
    assert decisions(a) == decisions(b) and key_pairs(a) == key_pairs(b)
    check_invariants(a, x16.astype(np.float32), T)


def test_distributed_pieces_equal_one_process():
    """What the Beam graph does: hashed sample -> centroids -> assign in arbitrary batches -> search
    each cluster (a big one split in block tasks) -> components resolved one by one."""
    x, keys = planted(n=1000, seed=8)
    k, assign, thr = 8, 2, T
    ref = find_duplicates(x, keys, cfg(thr, clusters=str(k), assign=assign, assign_margin=0.1, kmeans_sample=500))
    rng = np.random.default_rng(9)
    perm = rng.permutation(len(x))  # arrival order on the workers
    frac = kmeans_sample_fraction(len(x), k, 500)
    sample = [i for i in perm if in_kmeans_sample(keys[i], frac)]
    centroids = train_centroids(x[sample], [keys[i] for i in sample], k)
    ids = np.zeros((len(x), assign), np.int32)
    for chunk in np.array_split(perm, 7):  # worker batches
        ids[chunk] = assign_clusters(x[chunk], centroids, assign, assign_margin=0.1)[0]
    assert np.array_equal(ids[:, 0], ref.cluster)
    found = {}
    for members in group_members(ids, np.arange(len(x)), k):
        if len(members) > 150:  # "too big for one worker": block tasks
            bs = 64
            for a, b in block_pairs(len(members), bs):
                ra, rb = members[a * bs : (a + 1) * bs], members[b * bs : (b + 1) * bs]
                ub = None if a == b else unit_rows(x[rb])
                ia, ib, cos = search_block_pair(unit_rows(x[ra]), ub, thr)
                for i, j, c in zip(ra[ia], (ra if a == b else rb)[ib], cos):
                    found[(min(i, j), max(i, j))] = c
        else:
            pairs, cos = search_cluster(x[members], thr)
            for (i, j), c in zip(members[pairs], cos):
                found[(min(i, j), max(i, j))] = c
    pairs = np.array(sorted(found), dtype=np.int64).reshape(-1, 2)
    cos = np.array([found[tuple(p)] for p in pairs.tolist()], np.float32)
    assert np.array_equal(pairs, ref.pairs) and np.array_equal(cos, ref.pair_cos)
    labels = connected_components(len(x), pairs)
    got = {}
    for lab in np.unique(labels[pairs[:, 0]]):
        comp = np.flatnonzero(labels == lab)
        local = {g: i for i, g in enumerate(comp.tolist())}
        sel = labels[pairs[:, 0]] == lab
        lp = np.vectorize(local.get)(pairs[sel]).reshape(-1, 2)
        dup_of, sim = resolve_component([keys[i] for i in comp], lp, cos[sel])
        got.update({keys[g]: (d, s) for g, d, s in zip(comp, dup_of, sim)})
    ref_dec = decisions(ref)
    for key, (d, s) in got.items():
        assert ref_dec[key][1] == d
        assert (d is None) == np.isnan(s)
    assert sum(d is not None for d, _ in got.values()) == ref.counts()["duplicate"]


def test_at_threshold_equals_searching_again():
    x, keys = planted(n=800, seed=10, bins=((0.5, 1.0),))
    low = find_duplicates(x, keys, cfg(0.5, clusters="6"))
    for t in (0.6, 0.75, 0.9):
        again = find_duplicates(x, keys, cfg(t, clusters="6"))
        assert decisions(low.at_threshold(t)) == decisions(again)
        assert key_pairs(low.at_threshold(t)) == key_pairs(again)
    counts = low.removed_counts()
    assert list(counts) == [0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95]
    assert counts[0.5] == low.counts()["duplicate"] > counts[0.9]
    with pytest.raises(ValueError):
        low.at_threshold(0.4)


def test_keep_rule_greedy_chain_priority_and_components():
    # chain a~b~c (a!~c): a removes b, c survives (not SemDeDup's "similar to any earlier item")
    keys = ["a", "b", "c", "d"]
    pairs = np.array([[0, 1], [1, 2]])
    dup_of, sim = resolve_component(keys, pairs, np.array([0.9, 0.8], np.float32))
    assert dup_of == [None, "a", None, None] and sim[1] == np.float32(0.9)
    # more pixels first: c is visited first, removes b; then a is kept
    dup_of, _ = resolve_component(keys, pairs, np.array([0.9, 0.8]), pixels=np.array([10, 10, 99, -1]))
    assert dup_of == [None, "c", None, None]
    # raising the threshold drops the (a, b) pair: b is removed by... nobody earlier; b keeps, removes c
    dup_of, _ = resolve_component(keys, pairs, np.array([0.55, 0.8], np.float32), threshold=0.6)
    assert dup_of == [None, None, "b", None]
    rank = priority_rank(["b", "a", "c"], np.array([5, 5, float("nan")]))
    assert rank.tolist() == [1, 0, 2]
    assert connected_components(6, np.array([[4, 1], [1, 3], [5, 5]])).tolist() == [0, 1, 2, 1, 1, 5]
    d, s = keep_greedy(3, np.array([[2, 0], [0, 2]]), np.array([0.7, 0.7]), np.array([2, 1, 0]))
    assert d.tolist() == [2, -1, -1] and np.isnan(s[1])


def test_assignment_is_per_row_deterministic():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((500, 24)).astype(np.float32)
    c = unit_rows(rng.standard_normal((30, 24)))
    c[7] = c[3]  # tied centroids: the lower id wins
    ids, sims = assign_clusters(x, c, 3, assign_margin=None, threads=2)
    one = np.concatenate(
        [assign_clusters(x[i : i + 1], c, 3, assign_margin=None, threads=1)[0] for i in range(0, 500, 37)]
    )
    assert np.array_equal(one, ids[::37])
    exact = unit_rows(x).astype(np.float64) @ c.T.astype(np.float64)
    assert np.array_equal(ids[:, 0], np.argmax(exact, axis=1))
    assert np.all(np.diff(sims, axis=1) <= 0)
    assert not np.any(ids == 7) or np.all(np.isin(3, ids[np.any(ids == 7, axis=1)]))
    ids_m, _ = assign_clusters(x, c, 3, assign_margin=0.05)
    assert np.all(ids_m[:, 0] == ids[:, 0]) and np.any(ids_m[:, 1] == -1)


def test_validation_and_edge_sizes():
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="unique"):
        find_duplicates(x, ["a", "b", "a"])
    with pytest.raises(ValueError):
        find_duplicates(x, ["a", "b"])
    with pytest.raises(TypeError):
        find_duplicates(x.astype(np.int32), ["a", "b", "c"])
    with pytest.raises(ValueError):
        find_duplicates(np.ones(4, np.float32), ["a"])
    empty = find_duplicates(np.zeros((0, 4), np.float32), [])
    assert len(empty.keys) == 0 and len(empty.pairs) == 0
    single = find_duplicates(x[:1], ["only"])
    assert single.counts() == {"kept": 1, "duplicate": 0, "rejected": 0}
    allbad = find_duplicates(np.zeros((2, 4), np.float32), ["a", "b"], cfg(clusters="3"))
    assert allbad.counts()["rejected"] == 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torch_engines_give_identical_pairs(precision):
    x, keys = planted(n=400, d=64, seed=12)
    ref_pairs, ref_cos = search_cluster(x, T, engine=Engine())
    assert len(ref_pairs) > 100
    eng = Engine("torch", "cpu", precision, resident=True)  # a torch engine on the CPU: the resident path
    for block_rows in (2048, 96):  # one tile; many tiles
        pairs, cos = search_cluster(x, T, engine=eng, block_rows=block_rows)
        assert np.array_equal(pairs, ref_pairs) and np.array_equal(cos, ref_cos)
    got = find_duplicates(x, keys, cfg(exact=True), engine=eng)
    assert decisions(got) == decisions(find_duplicates(x, keys, cfg(exact=True)))
    with pytest.raises(ValueError):
        Engine("numpy", precision="bf16")
    with pytest.raises(ValueError):  # the CPU bf16 / int8 block engines are gone: fp32 was never slower
        Engine("torch", "cpu", precision)


def test_group_members_is_each_clusters_rows_ascending():
    rng = np.random.default_rng(11)
    for trial in range(60):
        n, a, k = int(rng.integers(0, 200)), int(rng.integers(1, 5)), int(rng.integers(1, 30))
        ids = np.full((n, a), -1, np.int32)
        for i in range(n):  # an item's clusters are distinct; some entries unused (-1)
            pick = rng.permutation(k)[: min(a, k)]
            ids[i, : len(pick)] = pick
        ids[rng.random(ids.shape) < 0.2] = -1
        rows = rng.choice(5000, n, replace=False)
        if trial % 2:
            rows = np.sort(rows)
        got = group_members(ids, rows, k)
        assert len(got) == k
        for c in range(k):
            want = np.sort(rows[(ids == c).any(axis=1)])
            assert got[c].dtype == np.int64 and np.array_equal(got[c], want), (trial, c)


def test_planted_generator_same_rows_for_any_thread_count_and_on_a_memmap(tmp_path):
    a = np.empty((3000, 64), np.float32)
    truth = generate(a, "clustered", 3, chunk=700)
    b = np.lib.format.open_memmap(tmp_path / "b.npy", mode="w+", dtype=np.float32, shape=a.shape)
    again = generate(b, "clustered", 3, chunk=700, threads=3)
    assert np.array_equal(a, b) and np.array_equal(truth.pairs, again.pairs)
    assert len(truth.pairs) == 180 and np.all(truth.pairs[:, 0] < truth.pairs[:, 1])
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-6)
    # each copy sits at its target cosine to its base, the targets cycle through the bins
    np.testing.assert_allclose(pair_cosines(a, truth.pairs), truth.target, atol=1e-5)
    assert np.all((truth.target[::3] > 0.5) & (truth.target[::3] < 0.7) & (truth.target[2::3] > 0.9))
