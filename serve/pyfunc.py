"""The exported model as an MLflow pyfunc: `mlflow.pyfunc.load_model(uri).predict(...)` encodes, samples, scores.

No torch: the pyfunc runs `serve.ops` on the runtime's onnxruntime sessions (`ops.Direct`), so
`mlflow models serve` answers `/invocations` from a process without torch. `export.registry.register_export`
logs this file as a "model from code" (it ends with `mlflow.models.set_model`), the export directory as the
artifact `model_dir`, and serve/, export/ and pipeline/ as code paths, so the model loads wherever
onnxruntime and mlflow are installed.

Input: one row per item, a DataFrame (or the dict/records MLflow turns into one) with the columns the
operation needs; the operation and its options are params (the signature, declared where the model is
logged: export.registry.pyfunc_signature). Options left out take the runtime's defaults:

| op (param)    | column per row                 | output, one entry per row       | params used                 |
| ------------- | ------------------------------ | ------------------------------- | --------------------------- |
| `sample`      | `seed` (int)                   | `image` (C, H, W) in [0, 1]     | `temperature`               |
| `decode`      | `z` (latent_dim floats)        | `image`                         |                             |
| `encode`      | `x` (C, H, W) floats in [0, 1] | `mean`, `logvar` (latent_dim)   |                             |
| `reconstruct` | `x`                            | `image`                         |                             |
| `score`       | `x`                            | `score` (higher: odder; `kind`  | `kind`, `method`, `seed`,   |
|               |                                | says which), `maps` (H, W) nats | `num_samples`, `complexity`,|
|               |                                | with `maps`                     | `maps`                      |

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

from export.model_uri import PYFUNC_ARTIFACT
from serve import ops
from serve.runtime import VAERuntime, parse_providers

SCORE_OPTIONS = ("kind", "method", "num_samples", "complexity", "seed")
"""Params passed to `ops.score` when given; left out, its defaults apply."""


def _column(rows, name: str) -> np.ndarray:
    """Column `name` of the input stacked into one array; a missing column is the caller's error."""
    columns = list(rows.columns) if hasattr(rows, "columns") else sorted(rows)
    if name not in columns:
        raise ops.InvalidInput(f"needs a column {name!r}, got columns {columns}")
    values = list(rows[name])
    if any(value is None for value in values):
        raise ops.InvalidInput(f"column {name!r} has empty rows")
    return np.asarray(values)


def _sample(device: ops.Direct, rows, params: dict) -> dict[str, np.ndarray]:
    temperature = 1.0 if params.get("temperature") is None else float(params["temperature"])
    z = np.concatenate([ops.prior_latents(device.card, 1, int(seed), temperature)  # a seed per row, as /v1/sample n=1
                        for seed in _column(rows, "seed")])
    return {"image": device.run(ops.decode, z)}


def _encode(device: ops.Direct, rows, params: dict) -> dict[str, np.ndarray]:
    posterior = device.run(ops.encode, _column(rows, "x"))
    return {"mean": posterior.mean, "logvar": posterior.logvar}


def _score(device: ops.Direct, rows, params: dict) -> dict[str, np.ndarray]:
    options = {name: params[name] for name in SCORE_OPTIONS if params.get(name) is not None}
    scores = device.run(ops.score, _column(rows, "x"), maps=bool(params.get("maps")), **options)
    return {"score": scores.scores, "kind": np.full(len(scores.scores), scores.kind),
            **({"maps": scores.maps} if scores.maps is not None else {})}


# Each operation as (device, input rows, params) -> named arrays: serve.ops on the runtime's sessions.
OPERATIONS: dict[str, Callable[[ops.Direct, Any, dict], dict[str, np.ndarray]]] = {
    "sample": _sample,
    "decode": lambda device, rows, params: {"image": device.run(ops.decode, _column(rows, "z"))},
    "encode": _encode,
    "reconstruct": lambda device, rows, params: {"image": device.run(ops.reconstruct, _column(rows, "x"))},
    "score": _score,
}


class VAEPyfunc(mlflow.pyfunc.PythonModel):
    """The runtime behind `predict(rows, params={"op": ...})`; see the module docstring for the schema."""

    def load_context(self, context) -> None:
        # model_config={"providers": "cpu"} at load time picks providers (default: the fastest usable here)
        config = context.model_config or {}
        providers = parse_providers(config["providers"]) if config.get("providers") else None
        self.device = ops.Direct(VAERuntime(context.artifacts[PYFUNC_ARTIFACT], providers=providers))

    def predict(self, context, model_input, params: dict | None = None) -> dict[str, np.ndarray]:
        params = params or {}
        op = params.get("op")
        if op not in OPERATIONS:
            raise MlflowException.invalid_parameter_value(
                f"params.op must be one of {sorted(OPERATIONS)}, got {op!r}")
        try:
            return OPERATIONS[op](self.device, model_input, params)
        except (ValueError, TypeError) as error:  # ops.InvalidInput and numpy's complaints: the caller's mistake
            raise MlflowException.invalid_parameter_value(f"op {op!r}: {error}") from error


mlflow.models.set_model(VAEPyfunc())
