# syntax=docker/dockerfile:1
# Serving image: Python, ONNX Runtime (CUDA 13 + cuDNN 9 from wheels; the node supplies only the
# driver), serve/ and pipeline's numpy image helpers. No torch, no MLflow: the model comes from a
# directory (the vae-models volume), so `--model models:/...`, parquet output and plots are not
# available here.
#   docker build -f docker/serve.Dockerfile -t registry.example.com/vae-pipeline/serve:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app
COPY docker/requirements-serve.txt /tmp/requirements-serve.txt
RUN pip install -r /tmp/requirements-serve.txt

COPY serve ./serve
COPY pipeline ./pipeline
RUN python -c "import serve.__main__, serve.http" \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin vae

USER 10001
EXPOSE 8000
ENTRYPOINT ["python", "-m", "serve"]
CMD ["http", "--model", "/models/vae", "--host", "0.0.0.0", "--port", "8000"]
