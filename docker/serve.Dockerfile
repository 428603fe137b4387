# syntax=docker/dockerfile:1
# Serving image: the package installed with its [serve] extra (ONNX Runtime, the HTTP stack) and
# [cuda] (CUDA 13 + cuDNN 9 as wheels: the node supplies only the NVIDIA driver), at the tested
# versions in constraints.txt. No torch, no MLflow: the model comes from a directory (the
# vae-models volume), so `--model models:/...` ([registry]), parquet output and plots ([analysis])
# are not available here.
#   docker build -f docker/serve.Dockerfile -t registry.example.com/vae-pipeline/serve:0.1.0 .
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
# A regular (not editable) install: the sources are copied into site-packages, /src goes away.
# The build fails here if serving imports anything the extra does not bring. That the extra brings no
# torch is tested without Docker (tests/test_docker.py, tests/test_install_serve.py).
RUN pip install --constraint constraints.txt ".[serve,cuda]" \
    && python -c "import serve.__main__, serve.http" \
    && python -m serve --help >/dev/null \
    && vae doctor \
    && rm -rf /src \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin vae

WORKDIR /
USER 10001
EXPOSE 8000
ENTRYPOINT ["python", "-m", "serve"]
CMD ["http", "--model", "/models/vae", "--host", "0.0.0.0", "--port", "8000"]
