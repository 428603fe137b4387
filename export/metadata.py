"""What travels with the ONNX files: model.json beside them (export.model_card) and the same facts in
`metadata_props`.

Kept free of torch: it works on plain dicts and ONNX protos, so tools that only read an export
(the registry, Triton, TensorRT) can use it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx

FORMAT_VERSION = 1  # keys are only ever added; serve relies on the version-1 keys
PIXEL_SCALING = "uint8 / 255 -> [0, 1]"
ENCODER_IO = {"inputs": ["x"], "outputs": ["mean", "logvar"]}
DECODER_IO = {"inputs": ["z"], "outputs": ["params", "image"]}
# Keys copied into each ONNX file's metadata_props (JSON-encoded values): enough to use the file
# on its own, without model.json.
ONNX_METADATA_KEYS = (
    "format_version", "latent_dim", "latent_shape", "image_shape", "channels", "pixel_scaling", "likelihood",
    "likelihood_params", "weights", "mlflow_run_id", "training_step", "config_sha256", "tool_version",
)


def tool_version() -> str:
    """`vae-pipeline X.Y.Z` as installed (or `unknown` when run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"vae-pipeline {version('vae-pipeline')}"
    except PackageNotFoundError:
        return "vae-pipeline unknown"


def config_sha256(config_dict: dict) -> str:
    """Hash of the resolved training config (sorted JSON), the same on every machine."""
    return hashlib.sha256(json.dumps(config_dict, sort_keys=True).encode()).hexdigest()


def likelihood_params(model_config: dict) -> dict:
    """Constants of p(x|z) that are not graph outputs (e.g. a fixed Gaussian sigma), by name.

    The fallback for a model without `likelihood_params()`: read from the model config, any field
    named `likelihood_<name>` or `<...>sigma` becomes `<name>` / `sigma`; a discretized logistic
    states its 8-bit bin width.
    """
    params: dict = {}
    for key, value in model_config.items():
        if key.startswith("likelihood_"):
            params[key.removeprefix("likelihood_")] = value
        elif key.endswith("sigma"):
            params["sigma"] = value
    if model_config.get("likelihood") == "discretized_logistic":
        params.setdefault("bin_width", 1 / 255)
    if model_config.get("likelihood") != "gaussian":
        params.pop("sigma", None)  # only the fixed-sigma Gaussian keeps sigma outside the graph
    return params


def onnx_metadata(metadata: dict, precision: str) -> dict[str, str]:
    """The metadata_props of one ONNX file: JSON-encoded values, its own precision included."""
    props = {key: json.dumps(metadata[key]) for key in ONNX_METADATA_KEYS if key in metadata}
    props["precision"] = json.dumps(precision)
    return props


def attach(model: onnx.ModelProto, props: dict[str, str]) -> onnx.ModelProto:
    """Replace the model's metadata_props with `props` (in place) and return it."""
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def read_onnx_metadata(path: str | Path) -> dict:
    """metadata_props of an ONNX file, JSON-decoded."""
    model = onnx.load(str(path), load_external_data=False)
    return {entry.key: json.loads(entry.value) for entry in model.metadata_props}
