# The image cluster/k8s/*.yaml run: Ray's GPU image (the Ray and Python this project
# uses), a CUDA 13 build of torch (DALI's nvidia-dali-cuda130 wheel needs CUDA 13), and
# this project with its dependencies, DALI included, at the exact versions in
# cluster/constraints.txt (the same the ray_cluster.yaml nodes install).
#
#   make image                      # = docker build -t ghcr.io/your-org/vgg-pipeline:0.1.0 .
#   make image CONTAINER=podman IMAGE=registry.example.com/vgg-pipeline:1
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130

WORKDIR /home/ray/vgg-pipeline
# Dependencies first, from files that change only when a version does: a code change
# rebuilds none of these layers (torch, DALI, MLflow are gigabytes).
COPY --chown=ray:users pyproject.toml ./
COPY --chown=ray:users cluster/constraints.txt cluster/
# DL3013: every version is pinned by cluster/constraints.txt (-c), which hadolint cannot read.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -c cluster/constraints.txt torch --index-url "${TORCH_INDEX}"
# pyproject.toml's dependencies, read from it (one list, no copy of it here)
# hadolint ignore=DL3013
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -c cluster/constraints.txt -r /tmp/requirements.txt
# Then the code, and the project itself without dependencies (all present above).
COPY --chown=ray:users README.md ./
COPY --chown=ray:users pipeline pipeline
COPY --chown=ray:users data_prep data_prep
COPY --chown=ray:users cluster cluster
COPY --chown=ray:users tools tools
RUN pip install --no-cache-dir --no-deps -e . \
    && python -c "import torch, nvidia.dali, ray, mlflow, pipeline.cli, cluster.submit, data_prep.shard"

ENV PYTHONUNBUFFERED=1
