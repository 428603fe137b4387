"""An export in MLflow: logged to its training run and registered version by version
(`export.model_uri.resolve_model_dir` resolves it back). Imports no torch.

A registered version is an MLflow 3 logged model of the ONNX flavour: its `model.onnx` is the
decoder (z -> params, image; `mlflow.pyfunc.load_model(uri).predict({"z": z})` generates), with a
signature and an input example; the whole export directory (encoder, decoder, model.json, extra
precisions) travels in it as `extra_files/`, which is what `resolve_model_dir` returns.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient

from export.model_card import METADATA_FILE, read_model_json
from export.model_uri import RUN_ARTIFACT_PATH, tracking_context

MODEL_NAME_IN_RUN = "vae-onnx"
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


def register_export(model_dir: str | Path, name: str, *, alias: str | None = None,
                    tracking_uri: str | None = None, run_id: str | None = None):
    """Log `model_dir` to its training run and register it as a new version of `name`.

    The run is model.json's `mlflow_run_id` unless `run_id` is given. Returns the ModelVersion.
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
        version = mlflow.register_model(
            info.model_uri, name, tags={key: json.dumps(value) if not isinstance(value, str) else value
                                        for key, value in facts.items()})
    description = (f"VAE export from run {run_id} step {metadata.get('training_step')}: model.onnx is the "
                   f"decoder; the full export (encoder, decoder, model.json) is in extra_files/.")
    client.update_model_version(name, version.version, description=description)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return client.get_model_version(name, version.version)

