"""What every stage's command line shares: the exit codes and the error for a missing extra.

Lives in `pipeline` (the stage every other one may import) and imports nothing beyond the
standard library, so `vae --help` and `vae doctor` work in any install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXIT_OK = 0
EXIT_FAILURE = 1  # the command started and failed: missing or bad input, a check that failed, a missing extra
EXIT_USAGE = 2  # the command line itself is wrong (argparse and config errors), found before any work
EXIT_PREEMPTED = 143  # 128 + SIGTERM: training saved a checkpoint and stopped; run it again to resume

EXIT_CODES = {EXIT_OK: "success", EXIT_FAILURE: "runtime failure", EXIT_USAGE: "usage error",
              EXIT_PREEMPTED: "preempted (SIGTERM; training saved a checkpoint first)"}

DISTRIBUTION = "vae-pipeline"

# The modules each role's extra provides (pyproject.toml), checked before a stage runs.
EXTRA_MODULES = {
    "serve": ("onnxruntime", "fastapi", "pydantic", "uvicorn", "orjson", "prometheus_client"),
    "train": ("torch", "mlflow", "psutil"),
    "export": ("torch", "mlflow", "onnx", "onnxscript", "onnxruntime"),
    "analysis": ("pyarrow", "matplotlib"),
    "registry": ("mlflow",),
    "stores": ("fsspec", "s3fs", "gcsfs"),
    "demo": ("mlxtend", "sklearn"),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def missing_modules(extra: str) -> list[str]:
    """The modules of `extra` that cannot be found (without importing any of them)."""
    import importlib.util

    return [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]


def install_hint(extra: str) -> str:
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module` for `feature`, or raise MissingExtraError saying which extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or module.split(".")[0] != error.name.split(".")[0]:
            raise  # the module is there but one of its own imports is broken: show that
        raise MissingExtraError(f"{feature} needs {module.split('.')[0]}, which is not installed: "
                                f"{install_hint(extra)}") from error
