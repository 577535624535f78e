# syntax=docker/dockerfile:1
# The gpucluster image: one image for the operator (`gpucluster run`), the node
# agent (`gpucluster agent`) and the fake device plugin (`gpucluster
# device-plugin`); the Helm chart picks the command.
#
#   docker build -t gpucluster:dev --build-arg VERSION=0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" .

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: the gpucluster wheel and the wheels of everything it needs ---------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
# The nvml extra (nvidia-ml-py) is what the agent reads real GPUs with.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[nvml]"

# --- runtime -------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="gpucluster" \
      org.opencontainers.image.description="Kubernetes operator, node agent and fake device plugin for NVIDIA H100/H200 training clusters" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Installed from the wheelhouse only (--no-index): the versions are the ones
# the build stage resolved, and no index is reached here. The wheelhouse
# holds exactly one gpucluster, the one built above, hence no pin.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "gpucluster[nvml]" \
    && groupadd --system --gid 10001 gpucluster \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin gpucluster
# The uid the chart's securityContext runs as (runAsUser: 10001).
USER 10001:10001
ENTRYPOINT ["gpucluster"]
CMD ["--help"]
