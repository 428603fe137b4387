"""An export in MLflow: logged to its training run and registered version by version
(`export.model_uri.resolve_model_dir` resolves it back). Imports no torch.

A registered version is an MLflow 3 logged model of the ONNX flavour: its `model.onnx` is the
decoder (z -> params, image; `mlflow.pyfunc.load_model(uri).predict({"z": z})` generates), with a
signature and an input example; the whole export directory (encoder, decoder, model.json, extra
precisions) travels in it as `extra_files/`, which is what `resolve_model_dir` returns.

Beside it, the same export is registered as `NAME-pyfunc`: serve/pyfunc.py (logged as a model from
code, with serve/, export/ and pipeline/ as its code and the export directory as its artifact) encodes,
samples and scores through onnxruntime, so `mlflow models serve -m models:/NAME-pyfunc@ALIAS`
answers `/invocations` without torch. The file is logged by path, not imported: export stays left of serve.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient

from export.model_card import METADATA_FILE, read_model_json
from export.model_uri import PYFUNC_ARTIFACT, RUN_ARTIFACT_PATH, tracking_context

MODEL_NAME_IN_RUN = "vae-onnx"
PYFUNC_NAME_IN_RUN = "vae-pyfunc"
PYFUNC_SUFFIX = "-pyfunc"
"""The pyfunc of export NAME is registered as NAME + this."""
SOURCE_ROOT = Path(__file__).resolve().parents[1]
# What the pyfunc needs at load time, besides mlflow (which MLflow adds itself).
PYFUNC_DISTRIBUTIONS = (("onnxruntime-gpu", "onnxruntime"), ("numpy",), ("pillow",))
# model.json keys copied into the MLmodel metadata and onto each model version as tags.
FACTS = ("latent_dim", "image_shape", "likelihood", "likelihood_params", "weights", "mlflow_run_id",
         "training_step", "config_sha256", "tool_version", "opset")


def _export_files(model_dir: Path, metadata: dict) -> list[Path]:
    """model.json and every ONNX file it lists (default and variants); a missing one is an error."""
    names = {metadata["encoder"]["file"], metadata["decoder"]["file"]}
    for variant in metadata.get("variants", {}).values():
        names.update(variant[part]["file"] for part in ("encoder", "decoder") if part in variant)
    files = [model_dir / METADATA_FILE, *(model_dir / name for name in sorted(names))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir}: model.json lists files that are not there: {missing}")
    return files


@dataclass(frozen=True)
class Registered:
    """The versions one `register_export` created."""

    onnx: "mlflow.entities.model_registry.ModelVersion"
    """NAME: the ONNX flavour (decoder as model.onnx, the export in extra_files/)."""
    pyfunc: "mlflow.entities.model_registry.ModelVersion | None"
    """NAME-pyfunc: serve/pyfunc.py over the export (None when not asked for)."""

    def describe(self) -> str:
        uris = [f"models:/{v.name}/{v.version}" for v in (self.onnx, self.pyfunc) if v is not None]
        return "registered " + " and ".join(uris)


def pyfunc_signature():
    """The pyfunc's input contract (serve/pyfunc.py's docstring): one row per item with the column its `op`
    needs; `op` and the options are params, unset (None) ones taking the runtime's defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([
            ColSpec(Array(Array(Array(DataType.double))), "x", required=False),  # an image (C, H, W) per row
            ColSpec(Array(DataType.double), "z", required=False),  # a latent per row
            ColSpec(DataType.long, "seed", required=False),  # a sample's seed per row
        ]),
        params=ParamSchema([
            ParamSpec("op", DataType.string, None),  # sample, decode, encode, reconstruct or score
            ParamSpec("temperature", DataType.double, None),  # sample
            ParamSpec("kind", DataType.string, None),  # score: auto, likelihood, png_mse or excess_mse
            ParamSpec("method", DataType.string, None),  # score: elbo or iwae
            ParamSpec("num_samples", DataType.long, None),  # score
            ParamSpec("complexity", DataType.string, None),  # score: none or png
            ParamSpec("seed", DataType.long, None),  # score's noise
            ParamSpec("maps", DataType.boolean, None),  # score: per-pixel maps too
        ]))


def _pyfunc_requirements() -> list[str]:
    """The installed versions of what serve/pyfunc.py imports, pinned (onnxruntime-gpu or onnxruntime)."""
    pins = []
    for choices in PYFUNC_DISTRIBUTIONS:
        for distribution in choices:
            try:
                pins.append(f"{distribution}=={importlib.metadata.version(distribution)}")
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            raise ModuleNotFoundError(f"the pyfunc needs one of {choices} installed to pin it")
    return pins


def _log_pyfunc(files: list[Path], facts: dict):
    """Log serve/pyfunc.py over the export's `files` into the active run; returns the ModelInfo."""
    import shutil
    import tempfile

    import pandas as pd

    source = SOURCE_ROOT / "serve" / "pyfunc.py"
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing: the pyfunc is logged from serve/'s source")
    with tempfile.TemporaryDirectory(prefix="vae-pyfunc-") as staging:
        export = Path(staging) / PYFUNC_ARTIFACT  # the folder's name is the one it gets in the model
        export.mkdir()
        for path in files:  # the listed files only, not whatever else lies in the export directory
            shutil.copy2(path, export)
        return mlflow.pyfunc.log_model(
            name=PYFUNC_NAME_IN_RUN, python_model=str(source), artifacts={PYFUNC_ARTIFACT: str(export)},
            code_paths=[str(SOURCE_ROOT / package) for package in ("serve", "export", "pipeline")],
            signature=pyfunc_signature(),
            input_example=(pd.DataFrame({"seed": [0, 1]}), {"op": "sample"}),
            pip_requirements=_pyfunc_requirements(), metadata=facts)


def register_export(model_dir: str | Path, name: str, *, alias: str | None = None,
                    tracking_uri: str | None = None, run_id: str | None = None,
                    pyfunc: bool = True) -> Registered:
    """Log `model_dir` to its training run and register it as a new version of `name` (ONNX flavour)
    and, with `pyfunc`, of `name`-pyfunc (serve/pyfunc.py); `alias` points at both.

    The run is model.json's `mlflow_run_id` unless `run_id` is given.
    """
    import onnx
    import onnxruntime as ort
    from mlflow.models import infer_signature

    model_dir = Path(model_dir)
    metadata = read_model_json(model_dir)
    files = _export_files(model_dir, metadata)
    run_id = run_id or metadata.get("mlflow_run_id")
    if not run_id:
        raise ValueError(f"{model_dir}/model.json has no mlflow_run_id: pass the training run id")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException as error:
        raise ValueError(f"training run {run_id} not found at {tracking_uri or mlflow.get_tracking_uri()}: "
                         f"{error.message}") from error

    decoder_path = model_dir / metadata["decoder"]["file"]
    session = ort.InferenceSession(str(decoder_path), providers=["CPUExecutionProvider"])
    z = np.random.default_rng(0).standard_normal((2, int(metadata["latent_dim"]))).astype(np.float32)
    params, image = session.run(None, {"z": z})
    signature = infer_signature({"z": z}, {"params": params, "image": image})
    facts = {key: metadata[key] for key in FACTS if key in metadata}
    with tracking_context(tracking_uri), mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(str(model_dir), RUN_ARTIFACT_PATH)
        info = mlflow.onnx.log_model(
            onnx.load(str(decoder_path)), name=MODEL_NAME_IN_RUN, signature=signature,
            input_example={"z": z}, extra_files=[str(f) for f in files], metadata=facts,
            save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"],
            tags={"config_sha256": metadata.get("config_sha256", "")})
        tags = {key: json.dumps(value) if not isinstance(value, str) else value for key, value in facts.items()}
        version = mlflow.register_model(info.model_uri, name, tags=tags)
        pyfunc_version = None
        if pyfunc:
            pyfunc_info = _log_pyfunc(files, facts)
            pyfunc_version = mlflow.register_model(pyfunc_info.model_uri, name + PYFUNC_SUFFIX, tags=tags)
    step = metadata.get("training_step")
    client.update_model_version(name, version.version, description=(
        f"VAE export from run {run_id} step {step}: model.onnx is the decoder; the full export (encoder, "
        f"decoder, model.json) is in extra_files/."))
    if pyfunc_version:
        client.update_model_version(name + PYFUNC_SUFFIX, pyfunc_version.version, description=(
            f"VAE export from run {run_id} step {step} as a pyfunc: predict(rows, params={{'op': 'sample' | "
            f"'decode' | 'encode' | 'reconstruct' | 'score'}}) through onnxruntime (serve/pyfunc.py)."))
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
        if pyfunc_version:
            client.set_registered_model_alias(name + PYFUNC_SUFFIX, alias, pyfunc_version.version)
    return Registered(
        client.get_model_version(name, version.version),
        client.get_model_version(name + PYFUNC_SUFFIX, pyfunc_version.version) if pyfunc_version else None)
