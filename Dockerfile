# syntax=docker/dockerfile:1
# The image that every pod in k8s/ runs: CUDA torch, Ray, ffcv and moco_ray.
#
#   docker build -t ghcr.io/moco-ray/moco-ray:0.1.0 .
#   docker push ghcr.io/moco-ray/moco-ray:0.1.0
#
# The tag is the project version (pyproject.toml). The == pins below are pyproject.toml's;
# tests/test_k8s.py checks both. PyPI's torch wheel bundles CUDA 13.0, so the base image needs no
# CUDA of its own; the GPU nodes need an NVIDIA driver that supports CUDA 13.0 (580 or newer).
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="moco-ray" \
      org.opencontainers.image.description="Elastic, Ray-distributed MoCo pretraining" \
      org.opencontainers.image.version="0.1.0"

# build-essential, pkg-config, libopencv-dev, libturbojpeg0-dev: ffcv compiles its C++ extension
# against OpenCV and libjpeg-turbo at install time and links them at run time.
# wget: KubeRay's liveness and readiness probes call it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential pkg-config libopencv-dev libturbojpeg0-dev wget \
    && rm -rf /var/lib/apt/lists/*

# Installed into the system Python (/usr/local): KubeRay starts Ray with `bash -c`, possibly as a
# login shell, whose PATH always has /usr/local/bin but not a virtualenv.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# The large pinned dependencies get layers of their own, so a code change rebuilds in seconds.
RUN pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31 "ray[default,train,tune]==2.60.0"
RUN pip install ffcv==1.0.2

WORKDIR /opt/moco_ray
COPY pyproject.toml README.md ./
COPY moco_ray ./moco_ray
COPY tune ./tune
COPY data_prep ./data_prep
RUN pip install .

# uid/gid 10000 is the runAsUser/runAsGroup of every pod in k8s/: at or above 10000, so that it is
# no user of the host (checkov CKV_K8S_40). The pods mount emptyDirs over /tmp, /home/ray and
# /dev/shm and keep the rest of the filesystem read-only.
RUN groupadd --gid 10000 ray \
    && useradd --uid 10000 --gid 10000 --create-home --home-dir /home/ray --shell /bin/bash ray
# numba (ffcv) caches compiled functions next to their source unless told otherwise, and
# site-packages is not writable by uid 10000.
ENV HOME=/home/ray \
    NUMBA_CACHE_DIR=/tmp/numba-cache
USER 10000:10000
