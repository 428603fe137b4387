"""One way from `--model` to a local model directory: a path, `models:/NAME/VERSION|@ALIAS` or `runs:/RUN_ID/PATH`.

MLflow is imported only when a URI is given (the [registry] extra), so serving from a directory needs none
of it, and torch never. MLflow's global tracking and registry URIs are switched only for the download and
restored afterwards: a library call must not change where the caller's own MLflow calls go.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

from export.model_card import METADATA_FILE, has_model_card

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(/(?P<version>\d+|latest)|@(?P<alias>[\w-]+))$")
RUN_URI = re.compile(r"^runs:/[0-9a-zA-Z]+(/.*)?$")
# Where a registered version keeps the export (`extra_files/` in NAME, `artifacts/model_dir/` in NAME-pyfunc:
# export.registry) or a run logs it (`export/`).
RUN_ARTIFACT_PATH = "export"
PYFUNC_ARTIFACT = "model_dir"
"""The pyfunc's artifact key for the export directory (serve/pyfunc.py reads it, export.registry logs it)."""
EXPORT_SUBDIRS = ("", "extra_files", RUN_ARTIFACT_PATH, f"artifacts/{PYFUNC_ARTIFACT}")
CACHE_ENV = "VAE_SERVE_CACHE"
"""Downloads land in $VAE_SERVE_CACHE (default ~/.cache/vae-serve)/<hash of tracking URI and model URI>."""


def is_model_uri(location: str | Path) -> bool:
    return str(location).startswith(("models:/", "runs:/"))


@contextlib.contextmanager
def tracking_context(uri: str | None):
    """Use `uri` for tracking and the registry inside the block, then restore what was there.

    MLflow resolves `models:/` URIs and logs models through the global URIs whatever is passed
    to `download_artifacts`, hence the switch. The previous state is restored as it was (unset
    stays unset), not as the URI it resolved to, or a later switch of the tracking URI would leave
    the registry behind.
    """
    if not uri:
        yield
        return
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    # set_*_uri also write MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI into os.environ, which child
    # processes would inherit: restore those too.
    previous_env = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = previous
        for name, value in previous_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def resolve_model_dir(location: str | Path, dst: str | Path | None = None, tracking_uri: str | None = None) -> Path:
    """A local directory holding model.json: `location` itself, or the files of a `models:/`/`runs:/` URI
    downloaded into `dst` (default: a cache folder per tracking URI and model URI, see CACHE_ENV)."""
    text = str(location)
    if not is_model_uri(text):
        if has_model_card(text):
            return Path(text)
        raise FileNotFoundError(f"{text} has no {METADATA_FILE}: export a model with `python -m export`, "
                                "or pass models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH")
    if not (MODEL_URI.match(text) or RUN_URI.match(text)):
        raise ValueError(f"expected models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH, got {text!r}")
    from pipeline.cli import require

    mlflow = require("mlflow", "registry", f"--model {text}")
    with tracking_context(tracking_uri):
        if dst is None:
            key = hashlib.sha256(f"{mlflow.get_tracking_uri()} {text}".encode()).hexdigest()[:16]
            dst = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vae-serve") / key
        Path(dst).mkdir(parents=True, exist_ok=True)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(dst)))
        except mlflow.exceptions.MlflowException as error:
            raise FileNotFoundError(f"{text}: {error.message}") from error
    for subdir in EXPORT_SUBDIRS:
        if has_model_card(local / subdir):
            return local / subdir
    raise FileNotFoundError(f"{text} (downloaded to {local}) holds no {METADATA_FILE}: not a vae-pipeline export "
                            "(register the directory `python -m export` wrote)")
