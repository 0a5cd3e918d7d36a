# syntax=docker/dockerfile:1
# flowcurate's trainer image: CUDA PyTorch plus flowcurate (no dev extras), torchrun as entry point.
# Build from the repository root (docker/trainer.Dockerfile.dockerignore keeps the context to the
# packages; BuildKit, the default builder since Docker Engine 23, reads it):
#   docker build -f docker/trainer.Dockerfile -t flowcurate-trainer:0.1.0 .
# Run (8 GPUs, one node; docs/deploy.md has multi-node and the mounts):
#   docker run --gpus all --ipc=host -v "$PWD/out:/data:ro" -v "$PWD/run:/workspace/run" \
#     flowcurate-trainer:0.1.0 --standalone --nproc_per_node 8 -m flowcurate.trainer train \
#     --shards /data --config sd3 --output /workspace/run

# torch 2.13.0 (CUDA 12.6, cuDNN 9), the version `make test` installs; tests/test_docker.py checks
# that this tag's torch satisfies pyproject.toml's torch range.
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

# The base image's system Python is externally managed (PEP 668), so flowcurate goes into a venv that
# sees the base's packages: pip finds the base's torch satisfies pyproject's range and keeps it (the
# check after the install fails the build if a second torch lands in the venv).
ENV VIRTUAL_ENV=/opt/flowcurate \
    PATH=/opt/flowcurate/bin:$PATH \
    OPENBLAS_NUM_THREADS=1
WORKDIR /opt/flowcurate/src
COPY . .
# (Full paths: the shell may remember where `python` was before the venv existed.)
RUN python -m venv --system-site-packages --without-pip /opt/flowcurate \
    && /opt/flowcurate/bin/python -m pip install --no-cache-dir ./ \
    && /opt/flowcurate/bin/python -c "import sys, torch, flowcurate.trainer; \
assert not torch.__file__.startswith(sys.prefix), 'pip installed a second torch into the venv'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Non-root at run time (uid 10001: Ubuntu bases already use 1000); the installed code stays
# root-owned. /workspace is the home and working folder: runs go there (mount a host folder at
# /workspace/run), and so do the Hugging Face and flowcurate caches (~/.cache). It is writable by any
# uid (mode 1777, like /tmp), so `docker run --user "$(id -u):$(id -g)"` works too and makes the
# run's files the host user's.
RUN groupadd --gid 10001 flowcurate \
    && useradd --no-log-init --uid 10001 --gid 10001 --home-dir /workspace --shell /bin/bash flowcurate \
    && mkdir -p /workspace \
    && chmod 1777 /workspace
ENV HOME=/workspace
USER 10001:10001
WORKDIR /workspace

# torchrun, started by the venv's Python: the base's `torchrun` script starts the system Python,
# which cannot import flowcurate. Arguments are torchrun's: [options] -m flowcurate.trainer train ...
# No HEALTHCHECK: a batch training job, not a service; the job's exit status is its health.
ENTRYPOINT ["python", "-m", "torch.distributed.run"]
CMD ["--standalone", "--nproc_per_node", "1", "-m", "trainer", "train", "--help"]
