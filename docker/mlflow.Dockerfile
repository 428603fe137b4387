# syntax=docker/dockerfile:1
# MLflow tracking server with the PostgreSQL driver and boto3 (k8s/mlflow/mlflow.yaml).
#   docker build -f docker/mlflow.Dockerfile -t registry.example.com/vae-pipeline/mlflow:3.17.2 .
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY docker/requirements-mlflow.txt /tmp/requirements-mlflow.txt
RUN pip install -r /tmp/requirements-mlflow.txt \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin mlflow

USER 10001
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--workers", "1"]
