"""The exported model as an MLflow pyfunc: `mlflow.pyfunc.load_model(uri).predict(...)` encodes, samples and scores.

No torch: the pyfunc runs the ONNX graphs through `serve.runtime`, so `mlflow models serve` answers
`/invocations` from a process without torch. `export.registry.register_export` logs this file as a
"model from code" (it ends with `mlflow.models.set_model`), the export directory as the artifact
`model_dir`, and serve/ and pipeline/ as code paths, so the model loads wherever onnxruntime and
mlflow are installed.

Input: one row per item, a DataFrame (or the dict/records MLflow turns into one) with the columns the
operation needs; the operation and its options are params (the signature, declared where the model is
logged: export.registry.PYFUNC_SIGNATURE). Options left out take the runtime's defaults:

| op (param)    | column per row                 | output, one entry per row       | params used                 |
| ------------- | ------------------------------ | ------------------------------- | --------------------------- |
| `sample`      | `seed` (int)                   | `image` (C, H, W) in [0, 1]     | `temperature`               |
| `decode`      | `z` (latent_dim floats)        | `image`                         |                             |
| `encode`      | `x` (C, H, W) floats in [0, 1] | `mean`, `logvar` (latent_dim)   |                             |
| `reconstruct` | `x`                            | `image`                         |                             |
| `score`       | `x`                            | `score` (nats; higher: odder)   | `method`, `num_samples`,    |
|               |                                |                                 | `complexity`, `seed`        |

    model.predict(pd.DataFrame({"x": list(images)}), params={"op": "score"})["score"]
    POST /invocations {"dataframe_records": [{"seed": 1}, {"seed": 2}], "params": {"op": "sample"}}

The answer is a dict of arrays (`{"predictions": {...}}` over HTTP). Bad input raises an MLflow
INVALID_PARAMETER_VALUE error (HTTP 400) whose message names the value and what was expected.
"""

from __future__ import annotations

from typing import Any, Callable

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from serve.runtime import VAERuntime, parse_providers

ARTIFACT = "model_dir"
"""The artifact key under which the export directory (model.json, encoder, decoder) travels."""
SCORE_OPTIONS = ("method", "num_samples", "complexity", "seed")
"""Params passed to `score` when given; left out, the runtime's defaults apply."""


def _column(rows, name: str, op: str) -> np.ndarray:
    """Column `name` of the input stacked into one array; a missing column is the caller's error."""
    columns = list(rows.columns) if hasattr(rows, "columns") else sorted(rows)
    if name not in columns:
        raise ValueError(f"op {op!r} needs a column {name!r}, got columns {columns}")
    values = list(rows[name])
    if any(value is None for value in values):
        raise ValueError(f"op {op!r}: column {name!r} has empty rows")
    return np.asarray(values)


# The adapter: each operation as (runtime, input rows, params) -> named arrays. The one place to
# re-point at another operations module.
Operation = Callable[[VAERuntime, Any, dict], dict[str, np.ndarray]]


def _sample(runtime: VAERuntime, rows, params: dict) -> dict[str, np.ndarray]:
    seeds = _column(rows, "seed", "sample")
    temperature = 1.0 if params.get("temperature") is None else float(params["temperature"])
    z = np.concatenate([runtime.sample_latents(1, int(seed), temperature) for seed in seeds]
                       or [np.zeros((0, runtime.latent_dim), np.float32)])
    return {"image": runtime.decode(z)}


def _encode(runtime: VAERuntime, rows, params: dict) -> dict[str, np.ndarray]:
    mean, logvar = runtime.encode(_column(rows, "x", "encode"))
    return {"mean": mean, "logvar": logvar}


OPERATIONS: dict[str, Operation] = {
    "sample": _sample,
    "decode": lambda runtime, rows, params: {"image": runtime.decode(_column(rows, "z", "decode"))},
    "encode": _encode,
    "reconstruct": lambda runtime, rows, params: {"image": runtime.reconstruct(_column(rows, "x", "reconstruct"))},
    "score": lambda runtime, rows, params: {"score": runtime.score(
        _column(rows, "x", "score"), **{name: params[name] for name in SCORE_OPTIONS if params.get(name) is not None})},
}


class VAEPyfunc(mlflow.pyfunc.PythonModel):
    """The runtime behind `predict(rows, params={"op": ...})`; see the module docstring for the schema."""

    def load_context(self, context) -> None:
        # model_config={"providers": "cpu"} at load time picks providers (default: the fastest usable here)
        config = context.model_config or {}
        providers = parse_providers(config["providers"]) if config.get("providers") else None
        self.runtime = VAERuntime(context.artifacts[ARTIFACT], providers=providers)

    def predict(self, context, model_input, params: dict | None = None) -> dict[str, np.ndarray]:
        params = params or {}
        op = params.get("op")
        if op not in OPERATIONS:
            raise MlflowException.invalid_parameter_value(
                f"params.op must be one of {sorted(OPERATIONS)}, got {op!r}")
        try:
            return OPERATIONS[op](self.runtime, model_input, params)
        except (ValueError, TypeError) as error:  # the runtime's input checks: the caller's mistake
            raise MlflowException.invalid_parameter_value(f"op {op!r}: {error}") from error


mlflow.models.set_model(VAEPyfunc())
