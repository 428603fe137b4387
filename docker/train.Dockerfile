# syntax=docker/dockerfile:1
# Training image: shards, torchrun DDP training and ONNX export (k8s/training/*).
#   docker build -f docker/train.Dockerfile -t registry.example.com/vae-pipeline/train:0.1.0 .
# CUDA PyTorch base: torch and torchvision come from it (NCCL included); everything else is
# pinned in docker/requirements-train.txt to the versions the tests run with.
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY docker/requirements-train.txt /tmp/requirements-train.txt
RUN pip install -r /tmp/requirements-train.txt

COPY pyproject.toml README.md vae_cli.py ./
COPY pipeline ./pipeline
COPY train ./train
COPY export ./export
# --no-deps: never let pip swap the base image's CUDA torch for another build. Instead the build
# fails here if anything the stages import is missing (torchvision included).
RUN pip install --no-deps . \
    && python -c "import torch, torchvision, webdataset, mlflow, onnx, onnxscript, onnxruntime, train.trainer, export.onnx_export, pipeline.loader" \
    && python -m train --help >/dev/null \
    && python -m export --help >/dev/null \
    && python -m pipeline --help >/dev/null

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin vae
USER 10001
WORKDIR /home/vae
CMD ["python", "-m", "train", "--help"]
