# syntax=docker/dockerfile:1
# radq: one image for every service (api, worker, flower, migrate); the compose
# file picks the role with `command:`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the CPU-only index, in its own layer: it is by far the largest
# dependency and changes least often. pyproject pins the same version exactly, so the
# `pip install .` below keeps this wheel instead of pulling a CUDA build from PyPI.
# GPU images pass another index (compose's worker-gpu: --build-arg
# TORCH_INDEX=https://download.pytorch.org/whl/cu128); those wheels carry their CUDA
# libraries, so the host needs only the driver and the NVIDIA Container Toolkit.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX}

# The source is bind-mounted for the build only, so it never becomes an image layer;
# rw because setuptools writes build/ and *.egg-info into the tree (discarded afterwards).
RUN --mount=type=bind,source=.,target=/tmp/radq-src,rw \
    pip install '/tmp/radq-src[s3]'

# Non-root. /data is created here and owned by radq so that a fresh named volume
# mounted on it (compose's `blobs`) inherits that ownership and stays writable.
RUN useradd --system --create-home --home-dir /home/radq --uid 10001 radq \
    && mkdir -p /app /data/blobs /archive \
    && chown -R radq:radq /app /data

USER radq
WORKDIR /app
ENV RADQ_HOME=/data

# api, flower, worker metrics (RADQ_WORKER_METRICS_PORT in compose), scp
EXPOSE 8000 5555 9100 11112
CMD ["radq", "api", "--host", "0.0.0.0", "--port", "8000"]
