# The image cluster/k8s/*.yaml run: Ray's GPU image (the Ray and Python this project
# uses), a CUDA 13 build of torch (DALI's nvidia-dali-cuda130 wheel needs CUDA 13), and
# this project with its dependencies, DALI included.
#
#   make image                      # = docker build -t ghcr.io/your-org/vgg-pipeline:latest .
#   make image CONTAINER=podman IMAGE=registry.example.com/vgg-pipeline:1
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE_IMAGE}

ARG TORCH_SPEC="torch==2.11.*"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130

WORKDIR /home/ray/vgg-pipeline
# Dependencies first (a code change does not reinstall torch), then the code.
COPY --chown=ray:users pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "${TORCH_SPEC}" --index-url "${TORCH_INDEX}"
COPY --chown=ray:users pipeline pipeline
COPY --chown=ray:users data_prep data_prep
COPY --chown=ray:users cluster cluster
COPY --chown=ray:users tools tools
# DL3013: torch is pinned by TORCH_SPEC (a build argument hadolint cannot read), and
# the project's own dependencies by pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -e . \
    && python -c "import torch, nvidia.dali, ray, mlflow, pipeline.cli, cluster.submit, data_prep.shard"

ENV PYTHONUNBUFFERED=1
