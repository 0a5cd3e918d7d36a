# Two commands on a fresh machine:  make demo   and   make test
# Each creates .venv if absent and installs what it needs (torch first, from TORCH_SPEC).
# GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo-out
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flowcurate-installed

# numpy's OpenBLAS with 2 threads runs small calls 10-40x slower on 2-core machines; torch and FAISS
# keep their own threads (OMP_NUM_THREADS is deliberately left alone).
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: demo test lint tiny-models clean

# pip's and setuptools' warnings go to $(VENV)/install.log; the terminal gets one line (or the log's
# tail when an install fails)
INSTALL_LOG := $(VENV)/install.log
QUIET_PIP = $(PY) -m pip install --quiet --disable-pip-version-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@: > $(INSTALL_LOG)
	@echo "installing into $(VENV) (details: $(INSTALL_LOG)) ..."
	@($(QUIET_PIP) --upgrade pip && $(QUIET_PIP) $(TORCH_SPEC) && $(QUIET_PIP) -e ".[dev,dask,report]") \
		>> $(INSTALL_LOG) 2>&1 || (tail -n 30 $(INSTALL_LOG); exit 1)
	@echo "installed: $$($(PY) -c 'import importlib.metadata as m; print(", ".join(p + " " + m.version(p) for p in ("flowcurate", "torch", "apache-beam", "transformers", "diffusers")))')"
	@touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Build the cached tiny models once before pytest, so both cores build them instead of one worker
# building while the other waits on the lock.
tiny-models: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -c "from flowcurate.models.tiny import ensure_tiny_models; print(ensure_tiny_models(0))"

test: lint tiny-models
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -n 2 --durations=15 -q

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/flowcurate demo --output $(DEMO_OUT)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
