# syntax=docker/dockerfile:1
# flowcurate's Beam worker image: the SDK harness container for Dataflow (--sdk_container_image) and
# for Spark, Flink or any portable job server (--environment_type DOCKER --environment_config IMAGE).
# Build from the repository root (the build context; docker/pipeline.Dockerfile.dockerignore keeps
# it to the packages, and needs BuildKit, the default builder since Docker Engine 23):
#   docker build -f docker/pipeline.Dockerfile -t flowcurate-pipeline:0.1.0 .
# The Beam version and the Python minor must equal those of the machine that launches the job
# (otherwise workers stop at their first bundle: "Pipeline construction environment and pipeline
# runtime environment are not compatible"); tests/test_docker.py holds this FROM to the installed
# apache_beam. Launching from Python 3.12: --build-arg PYTHON_VERSION=3.12. How to run: docs/deploy.md.

ARG PYTHON_VERSION=3.11
FROM apache/beam_python${PYTHON_VERSION}_sdk:2.77.0

# A CUDA build of torch: the wheels carry the CUDA runtime, the driver comes from the host
# (Dataflow: install-nvidia-driver). torchvision must be the build made for this torch (0.X pairs
# with 2.(X-15)); transformers' image processors use it when present (Qwen2-VL's processor needs it).
# CPU-only workers: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# Optional baked weights. Nothing is downloaded here and no token is ever needed or stored: put
# model folders in docker/weights/ (git ignores them), or pass another folder inside the build
# context, then point [models] in your TOML at /opt/flowcurate/weights/... (docs/deploy.md).
# Before the code, so a code change does not re-copy gigabytes of weights.
ARG WEIGHTS_DIR=docker/weights
COPY ${WEIGHTS_DIR}/ /opt/flowcurate/weights/

# flowcurate itself (not editable) with the gcp extra (GCS and Dataflow clients); written "./[gcp]"
# so that hadolint sees a local path (DL3013 exempts those; pyproject.toml pins the ranges). pip keeps
# the torch above: it satisfies pyproject's range. pip check fails the build on a broken environment
# rather than letting workers fail at import time. The packages are copied one by one, not `COPY . .`,
# which would copy docker/weights a second time.
WORKDIR /opt/flowcurate/src
COPY pyproject.toml README.md LICENSE ./
COPY cli/ cli/
COPY formats/ formats/
COPY pipeline/ pipeline/
COPY captioning/ captioning/
COPY dedup/ dedup/
COPY models/ models/
COPY trainer/ trainer/
RUN pip install --no-cache-dir "./[gcp]" \
    && pip check \
    && python -c "import apache_beam, torch, torchvision, flowcurate.pipeline, flowcurate.captioning, flowcurate.dedup; \
print('beam', apache_beam.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__)"

# numpy's OpenBLAS threads: 1, as in the Makefile (Dataflow runs one SDK process per vCPU, so more
# threads per process only oversubscribe); torch and FAISS keep their own thread pools.
ENV OPENBLAS_NUM_THREADS=1

# The Beam boot runs as root: at start it creates a virtualenv under /opt/apache and pip-installs
# staged artifacts into it, and Dataflow mounts root-owned directories (/var/opt/google) into the
# container. A non-root user breaks both, so this image keeps the base image's root user (uid 0).
# hadolint ignore=DL3002
USER 0
ENTRYPOINT ["/opt/apache/beam/boot"]
