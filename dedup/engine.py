"""Where candidate matrix products run, and the exact re-check that makes every engine give one pair set.

Two engines: numpy float32 BLAS on the CPU (blocks on a thread pool), and torch on a device (a GPU;
fp16 by default) whose rows stay resident there (`flowcurate.dedup.device`). Reduced-precision CPU
engines (torch bf16, fbgemm int8) were dropped: measured, they never beat fp32 (BENCHMARKS.md).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from flowcurate.dedup.numerics import BLOCK_ROWS, MARGINS, above, exact_dots, fp32_margin


class Block(NamedTuple):
    """A block of canonical unit rows u: (B, D) float32, with an engine's form of it."""

    u: np.ndarray
    data: object  # numpy: u itself; torch: a (B, D) tensor on the device in the engine's dtype
    nbytes: int  # host memory held (for the block cache's budget)


class Engine:
    """Where candidate products run; the pair set is the same for every engine.

    backend "numpy": float32 BLAS on the CPU, blocks spread over a thread pool (one BLAS thread each).
    backend "torch": `device` (e.g. "cuda") and `precision` fp32 | tf32 | fp16 | bf16. `resident`
    (default None: yes when the rows fit the device's memory): `find_pairs_in_groups` normalises every
    row once onto the device and multiplies tiles of any group there, and `assign_clusters` lets the
    device propose centroids; False: one block pair at a time through `prepare` / `candidates`, run in
    the calling thread with torch's own threads. A torch engine on the CPU exists only as the resident
    path (`resident=True`), so that path can be tested without a GPU.
    Blocks with fewer than `min_rows` rows use numpy fp32 (conversion overheads dominate); not on the
    resident path.
    """

    def __init__(
        self,
        backend: str = "numpy",
        device: str = "cpu",
        precision: str = "fp32",
        min_rows: int = 1024,
        resident: bool | None = None,
    ):
        if backend not in ("numpy", "torch"):
            raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
        if precision not in MARGINS or (backend == "numpy" and precision != "fp32"):
            raise ValueError(f"precision {precision!r} is not available with backend {backend!r}")
        if backend == "torch" and str(device).startswith("cpu") and resident is not True:
            raise ValueError("a torch engine on the CPU is only the resident path (resident=True); "
                             "the CPU engine is numpy fp32")
        self.backend, self.device, self.precision, self.min_rows = backend, str(device), precision, min_rows
        self.resident = resident
        # fp32 on CUDA may silently run as TF32 (a global torch flag): use the TF32 bound there
        cuda_fp32 = backend == "torch" and precision == "fp32" and not self.device.startswith("cpu")
        self.margin = MARGINS["tf32" if cuda_fp32 else precision]

    def __repr__(self) -> str:
        return f"Engine({self.backend!r}, {self.device!r}, {self.precision!r})"

    @property
    def on_device(self) -> bool:
        """Whether search and assignment take the device-resident path (see the class docstring)."""
        return self.backend == "torch" and self.resident is not False

    @property
    def on_gpu(self) -> bool:
        """Whether the products run on a non-CPU torch device (k-means and "auto" k follow it there)."""
        return self.backend == "torch" and not self.device.startswith("cpu")

    def prepare(self, u: np.ndarray) -> Block:
        """u: (B, D) unit rows -> the block with this engine's form of it (cacheable; either side)."""
        if self.backend == "numpy":
            return Block(u, u, u.nbytes)
        import torch

        dtype = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        return Block(u, torch.from_numpy(u).to(self.device, dtype[self.precision]), u.nbytes * 2)

    def candidates(self, pa, pb, threshold: float, same: bool) -> tuple[np.ndarray, np.ndarray]:
        """pa, pb: `Block.data` of two blocks (pb ignored when `same`: the upper triangle of pa pa^T) ->
        (ia, ib) int64, a superset of the pairs with cosine > threshold."""
        t32 = float(np.float32(threshold))
        pb = pa if same else pb
        if self.backend == "torch":  # compare in float32: the threshold must not be rounded to fp16/bf16
            import torch

            # the mask stays on the device: only the (few) candidate indices cross to the host, in
            # row-major order like flatnonzero below (copying a block's mask costs more than its product)
            hit = (pa @ pb.T).float() > t32 - self.margin
            idx = torch.nonzero(torch.triu(hit, diagonal=1) if same else hit).cpu().numpy()
            return idx[:, 0].astype(np.int64), idx[:, 1].astype(np.int64)
        mask = (pa @ pb.T) > np.float32(t32 - fp32_margin(pa.shape[1]))
        # flatnonzero + divmod: 2-D np.nonzero is far slower on a sparse mask; filtering i < j
        # afterwards is cheaper than masking the lower triangle first
        ia, ib = np.divmod(np.flatnonzero(mask), mask.shape[1])
        if same:
            upper = ia < ib
            ia, ib = ia[upper], ib[upper]
        return ia.astype(np.int64), ib.astype(np.int64)


FP32 = Engine()


def make_engine(device: str = "cpu", precision: str = "auto") -> Engine:
    """numpy fp32 on the CPU; torch on any other device (e.g. "cuda"), fp16 unless `precision` says."""
    if str(device).startswith("cpu"):
        if precision not in ("auto", "fp32"):
            raise ValueError(f"the CPU engine is numpy fp32; precision {precision!r} needs a GPU device")
        return FP32
    return Engine("torch", device, "fp16" if precision == "auto" else precision)


def pick(engine: Engine, rows: int) -> Engine:
    """The engine for blocks of `rows` rows: numpy fp32 below its `min_rows`."""
    return engine if rows >= engine.min_rows else FP32


def check(pa: Block, pb: Block | None, threshold: float, engine: Engine):
    """Candidates from `engine` for blocks pa, pb (None: pa against itself), then the exact re-check.
    -> ia (P,), ib (P,) int64 local indices, cos (P,) float32, number of candidates."""
    same = pb is None
    pb = pa if same else pb
    ia, ib = engine.candidates(pa.data, pb.data, threshold, same)
    cos = exact_dots(pa.u[ia], pb.u[ib])
    keep = above(cos, threshold)
    return ia[keep], ib[keep], cos[keep], len(ia)


def search_block_pair(
    ua: np.ndarray, ub: np.ndarray | None, threshold: float, engine: Engine | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ua: (A, D), ub: (B, D) canonical unit rows (`unit_rows`), or ub None to search ua against itself
    (i < j) -> ia (P,), ib (P,) int64 local indices and cos (P,) float32: exactly the pairs with
    canonical cosine > threshold."""
    engine = pick(engine or FP32, len(ua))
    return check(engine.prepare(ua), None if ub is None else engine.prepare(ub), threshold, engine)[:3]


def block_pairs(n_rows: int, block_rows: int = BLOCK_ROWS) -> list[tuple[int, int]]:
    """Split an (n x n) upper triangle into block tasks (a, b), a <= b, row-block indices of size
    `block_rows`: how a cluster too big for one worker is spread out."""
    nb = max(1, -(-n_rows // block_rows))
    return [(a, b) for a in range(nb) for b in range(a, nb)]
