"""Resolve `--model` to a local directory: a path, or an MLflow registry URI `models:/NAME/VERSION|@ALIAS`.

MLflow is imported only when a `models:/` URI is given, so serving from a directory needs none of it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(/(?P<version>\d+|latest)|@(?P<alias>[\w-]+))$")


def is_registry_uri(location: str) -> bool:
    return str(location).startswith("models:/")


def resolve_model(location: str | Path, *, tracking_uri: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A directory holding model.json: `location` itself, or the registered model's files downloaded."""
    location = str(location)
    if not is_registry_uri(location):
        path = Path(location)
        if not (path / "model.json").is_file():
            raise FileNotFoundError(f"{path} has no model.json: export a model with `python -m export`, "
                                    "or pass models:/NAME/VERSION or models:/NAME@ALIAS")
        return path
    if not MODEL_URI.match(location):
        raise ValueError(f"expected models:/NAME/VERSION or models:/NAME@ALIAS, got {location!r}")
    from pipeline.cli import require

    # only here: serving from a directory needs no MLflow
    mlflow = require("mlflow", "registry", f"--model {location}")

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    key = hashlib.sha256(f"{mlflow.get_tracking_uri()} {location}".encode()).hexdigest()[:16]
    cache = Path(cache_dir or os.environ.get("VAE_SERVE_CACHE", Path.home() / ".cache" / "vae-serve")) / key
    cache.mkdir(parents=True, exist_ok=True)
    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(cache)))
    found = sorted(downloaded.rglob("model.json"), key=lambda p: len(p.parts))
    if not found:
        raise FileNotFoundError(f"{location} downloaded to {downloaded} holds no model.json "
                                "(register the directory `python -m export` wrote)")
    return found[0].parent
