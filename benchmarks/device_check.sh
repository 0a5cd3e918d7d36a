#!/usr/bin/env bash
# dedup on a GPU machine, in one time-guarded run: identity with FAISS / the CPU path,
# exact mode at 1M, the default clustered mode on a float16 memmap up to 10M with peak anonymous memory.
#
#   OUT=/some/dir bash benchmarks/device_check.sh          # from the repo root; .whl/ holds faiss-cpu
#
# Writes $OUT/results.jsonl (one JSON line per step, as it ends), $OUT/<step>-<N>.json and $OUT/log.txt.
# Environment (all optional):
#   BUDGET_S   seconds for the whole script, setup included (default 480); every phase is skipped with a
#              note, or cut by its timeout, so that the script ends inside it
#   DEVICE     cuda (default) | cpu (a dry run on a CPU box)
#   PY         the python to use (default python3: the one with torch on the GPU image)
#   SCRATCH    folder for the memmap files (default: whichever of /tmp and ./.scratch has more free space)
#   DDC_ARGS   more arguments for `dedup_gpu_check.py` (sizes: --exact-n, --scale-n, ...; see --help)
#   SKIP_TESTS 1: skip the GPU unit tests
set -u
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-480}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }

echo "== machine ($(date -u +%FT%TZ)), budget ${BUDGET_S}s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
nproc; free -g | head -2
"$PY" -c 'import sys, numpy, torch; print("python", sys.version.split()[0], "| numpy", numpy.__version__,
"| torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' || exit 1

echo "== install (faiss-cpu from .whl, no index, no deps; the repo itself runs from PYTHONPATH)"
if ! "$PY" -c 'import faiss' 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/faiss_cpu-*.whl || { echo "faiss install failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the repo's folders are portions of the `flowcurate` namespace (pyproject's package-dir): link them as such
mkdir -p /tmp/flowcurate-ns/flowcurate && for d in cli formats models captioning dedup trainer pipeline; do
    ln -sfn "$PWD/$d" "/tmp/flowcurate-ns/flowcurate/$d"; done
export PYTHONPATH=/tmp/flowcurate-ns:$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c 'import faiss, threadpoolctl, flowcurate.dedup.core; print("faiss", faiss.__version__, "threads", faiss.omp_get_max_threads())' || exit 1

if [ -z "${SCRATCH:-}" ]; then
    best=0
    for d in /tmp "$PWD/.scratch"; do
        mkdir -p "$d" 2>/dev/null || continue
        free=$(df -Pk "$d" | awk 'NR==2 {print $4}')
        if [ "${free:-0}" -gt "$best" ]; then best=$free; SCRATCH=$d/ddc; fi
    done
fi
mkdir -p "$SCRATCH"
echo "scratch $SCRATCH: $(df -Ph "$SCRATCH" | awk 'NR==2 {print $4}') free"

if [ "${SKIP_TESTS:-0}" != 1 ] && [ "$(left)" -gt 200 ]; then
    echo "== GPU tests of dedup (tests/test_dedup_gpu.py: identity with FAISS and the CPU path)"
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_dedup_gpu.py 2>&1 | tail -5
fi

echo "== measurements ($(left)s left)"
# shellcheck disable=SC2086
"$PY" benchmarks/dedup_gpu_check.py --budget-s "$(($(left) - 5))" --out "$OUT" \
    --device "$DEVICE" --scratch "$SCRATCH" ${DDC_ARGS:-}
rm -rf "$SCRATCH"
echo "== end: $(($(date +%s) - T0))s"
