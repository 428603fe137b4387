# syntax=docker/dockerfile:1
# Training image: shards, torchrun DDP training and ONNX export (k8s/training/*): the package
# installed with its [export] extra (which includes [train]) at the tested versions in
# constraints.txt. torch comes from it too: PyPI's Linux build of the pinned torch carries CUDA 13
# and NCCL as wheels, so the node needs only the NVIDIA driver, and the image runs the exact torch
# the tests ran with.
#   docker build -f docker/train.Dockerfile -t registry.example.com/vae-pipeline/train:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md constraints.txt vae_cli.py ./
COPY pipeline ./pipeline
COPY train ./train
COPY export ./export
COPY serve ./serve
# The build fails here if anything the stages import is missing (torchvision included).
RUN pip install --constraint constraints.txt ".[export]" \
    && python -c "import torch, torchvision, webdataset, mlflow, onnx, onnxscript, onnxruntime, train.trainer, export.onnx_export, pipeline.loader" \
    && python -m train --help >/dev/null \
    && python -m export --help >/dev/null \
    && python -m pipeline --help >/dev/null \
    && vae doctor \
    && rm -rf /src \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin vae

USER 10001
WORKDIR /home/vae
CMD ["python", "-m", "train", "--help"]
