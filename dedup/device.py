"""The device-resident path (a torch `Engine` with `on_device`): every row normalised onto the device
once, tiles of products there, only candidate indices back to the host, the same exact re-check.

Also `DeviceAssign`: the device proposes each row's nearest centroids, the host ranks them, so the
assignment equals the CPU's.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from flowcurate.dedup.engine import Engine
from flowcurate.dedup.numerics import above, exact_dots, fp32_margin, pool_map, unit_rows

# Products per device tile (row block x column chunk): 2^28 -> 512 MiB of fp16 and a 256 MiB mask.
DEVICE_TILE = 1 << 28
_TORCH_DTYPES = {"fp32": "float32", "tf32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def floor_in(x: float, dtype) -> float:
    """The largest value of the torch `dtype` that is <= x, as a float (exact in that dtype), so that
    `tile >= it`, compared in the tile's own precision, keeps every entry above x."""
    import torch

    c = torch.tensor([x], dtype=torch.float64).to(dtype)
    if float(c) > x:  # one step down on the bits (torch.nextafter lacks half types in some versions)
        bits = c.view(torch.int16 if c.element_size() == 2 else torch.int32)
        if float(c) > 0:
            bits -= 1
        elif float(c) < 0:
            bits += 1  # sign and magnitude: a larger magnitude
        else:  # +-0 > x: the smallest negative subnormal
            bits.fill_(-(1 << (8 * c.element_size() - 1)) + 1)
    return float(c)


def _ahead(fn, items, depth: int = 2):
    """fn over items in order, up to `depth` calls running ahead on a thread (bounded memory)."""
    items = list(items)
    with ThreadPoolExecutor(1) as pool:
        futures = [pool.submit(fn, it) for it in items[:depth]]
        for k in range(len(items)):
            res = futures[k].result()
            futures[k] = None  # release the result once consumed
            if k + depth < len(items):
                futures.append(pool.submit(fn, items[k + depth]))
            yield res


def device_units(x: np.ndarray, device, dtype, chunk: int = 65536):
    """x: (N, D) raw, may be a memmap -> (N, D) unit rows on the device in `dtype`.

    Normalised there in float64, rounded to float32 and then to `dtype`, as `unit_rows` would; the
    float64 norm may differ from the host's in its last bit (another summation order), so a float32
    value may differ by one unit in the last place: 2^-23 relative, far inside every engine's margin
    (fp32 1.5e-4 >= D 2^-24 + 2 * 2^-23). Rows with a zero or non-finite norm become NaN: never a
    candidate (groups hold valid rows anyway). Host reads run one chunk ahead on a thread.
    """
    import torch

    n, d = x.shape
    out = torch.empty((n, d), dtype=dtype, device=device)

    def read(s: int) -> np.ndarray:
        b = np.array(x[s : s + chunk])  # a copy: torch wants writable memory, memmaps are read-only
        return b if b.dtype in (np.float16, np.float32, np.float64) else b.astype(np.float64)

    for s, b in zip(range(0, n, chunk), _ahead(read, range(0, n, chunk))):
        t = torch.from_numpy(b).to(device).double()
        t = t / (t * t).sum(dim=1, keepdim=True).sqrt()
        out[s : s + len(b)] = t.float().to(dtype)
    return out


def _fits(device, nbytes: int) -> bool:
    """Whether `nbytes` of resident rows plus a few tiles fit the device's free memory."""
    import torch

    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes + 8 * DEVICE_TILE <= 0.8 * free


def device_pairs(embeddings, groups, threshold: float, engine: Engine, block_rows: int, threads, progress):
    """`find_pairs_in_groups` with every row resident on the device; None if they do not fit.

    Each group is tiled into row blocks of `block_rows` against column chunks of up to
    DEVICE_TILE / block_rows rows of the same group (upper triangle only). A tile's product is
    compared there with the largest value of the product's dtype <= float32(t) - engine.margin, and
    only the candidate indices leave it, encoded as i * N + j (i < j), one transfer per ~1M. On the
    host: unique candidates (multi-assignment proposes a pair in every cluster both ends share),
    then the same exact re-check as everywhere (`exact_dots` of `unit_rows`), on a thread pool.
    -> pairs (P, 2), cos (P,), stats, as `find_pairs_in_groups`.
    """
    import torch

    device = torch.device(engine.device)
    dtype = getattr(torch, _TORCH_DTYPES[engine.precision])
    n, d = embeddings.shape
    if not _fits(device, n * d * torch.tensor([], dtype=dtype).element_size()):
        return None
    t0 = time.perf_counter()
    units = device_units(embeddings, device, dtype)
    t1 = time.perf_counter()
    cut = floor_in(float(np.float32(threshold)) - engine.margin, dtype)
    rb = max(1, int(block_rows))
    cb = max(rb, DEVICE_TILE // rb)
    n_tasks = sum(-(-len(g) // rb) for g in groups if len(g) >= 2)
    found: list[np.ndarray] = []  # host: candidate codes, compacted to unique ones now and then
    pending: list = []  # device: candidate codes not copied yet
    n_pending = n_found = n_cand = tiles = done = 0

    def flush():
        nonlocal pending, n_pending, n_found, found
        if pending:
            found.append(torch.cat(pending).cpu().numpy())
            n_found += n_pending
            pending, n_pending = [], 0
        if n_found > (1 << 25):  # bound host memory: duplicates out
            found = [np.unique(np.concatenate(found))]
            n_found = len(found[0])

    for rows in groups:
        m = len(rows)
        if m < 2:
            continue
        # a contiguous, writable int64 copy: torch takes neither negative strides nor read-only memory
        idx = torch.from_numpy(np.array(rows, dtype=np.int64)).to(device)
        for a0 in range(0, m, rb):
            a1 = min(m, a0 + rb)
            xa = units.index_select(0, idx[a0:a1])
            for c0 in range(a0, m, cb):
                c1 = min(m, c0 + cb)
                xc = xa if (c0, c1) == (a0, a1) else units.index_select(0, idx[c0:c1])
                nz = torch.nonzero((xa @ xc.T) >= cut)  # the one host sync per tile
                if c0 == a0:  # the tile holds the diagonal: local column j > local row i, each pair once
                    nz = nz[nz[:, 1] > nz[:, 0]]
                tiles += 1
                if len(nz):
                    gi, gj = idx[a0:a1][nz[:, 0]], idx[c0:c1][nz[:, 1]]
                    pending.append(torch.minimum(gi, gj) * n + torch.maximum(gi, gj))
                    n_pending += len(nz)
                    n_cand += len(nz)
                del nz
            if n_pending >= (1 << 20) or len(pending) >= 512:
                flush()
            done += 1
            if progress:
                progress("search", done, n_tasks)
    flush()
    codes = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    del units
    t2 = time.perf_counter()
    pairs, cos = _recheck_codes(embeddings, codes, n, threshold, threads)
    t3 = time.perf_counter()
    stats = {
        "tasks": n_tasks,
        "candidates": n_cand,
        "engine": repr(engine),
        "device": {
            "resident": True,
            "tiles": tiles,
            "unique_candidates": int(len(codes)),
            "t_upload": t1 - t0,
            "t_products": t2 - t1,
            "t_recheck": t3 - t2,
        },
    }
    return pairs, cos, stats


def _recheck_codes(embeddings, codes: np.ndarray, n: int, threshold: float, threads, chunk: int = 2048):
    """Sorted unique codes i * n + j -> pairs (P, 2), cos (P,) with canonical cosine > threshold, in
    (i, j) order: what `unique_pairs` gives for the same pairs (each cosine is per pair). Memory:
    ~chunk x D x 50 bytes per thread (2048 x 512: ~50 MiB)."""

    def work(s: int):
        c = codes[s : s + chunk]
        i, j = c // n, c % n
        cos = exact_dots(unit_rows(embeddings[i]), unit_rows(embeddings[j]))
        keep = above(cos, threshold)
        return i[keep], j[keep], cos[keep]

    parts = list(pool_map(work, range(0, len(codes), chunk), threads))
    if not parts:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    pairs = np.stack([np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])], axis=1)
    return pairs, np.concatenate([p[2] for p in parts])


class DeviceAssign:
    """Centroid proposals for `flowcurate.dedup.assign.rescore` from a torch device: products in
    float64 (float32 inputs are exact in it; the sum's error, ~D 2^-53, is far below fp32_margin), the
    top-`top` threshold per row and the candidates (row, centroid) within fp32_margin of it, like the
    host's BLAS proposals. Both proposal sets contain every row's true top, so `rescore` returns the
    same ids and sims."""

    def __init__(self, engine: Engine, centroids: np.ndarray, top: int):
        import torch

        self.device = torch.device(engine.device)
        self.centroids = torch.from_numpy(np.array(centroids, dtype=np.float64)).to(self.device)
        self.top, self.margin = top, fp32_margin(centroids.shape[1])

    def __call__(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """u: (B, D) float32 unit rows -> proposed (rows (C,), centroid ids (C,))."""
        import torch

        s = torch.from_numpy(u).to(self.device).double() @ self.centroids.T
        kth = torch.topk(s, self.top, dim=1).values[:, -1:]
        idx = torch.nonzero(s >= kth - self.margin).cpu().numpy()
        return idx[:, 0], idx[:, 1]
