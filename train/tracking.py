"""MLflow tracking for one training job: rank 0 logs, other ranks get a tracker that does nothing."""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import numpy as np

from train.config import TrainConfig, flat_params


def default_tracking_uri(config: TrainConfig) -> str:
    """config -> $MLFLOW_TRACKING_URI -> sqlite file beside the run directory."""
    if config.run.tracking_uri:
        return config.run.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(config.run.out_dir).resolve().parent / 'mlflow.db'}"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class NullTracker:
    """What non-main ranks hold: every call is a no-op, so the loop has no rank checks."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: np.ndarray, key: str, step: int) -> None: ...
    def log_artifacts(self, path: str | Path, artifact_path: str) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run per job; a resumed job passes `run_id` and continues the same run."""

    def __init__(self, config: TrainConfig, tags: dict[str, str], run_id: str | None = None) -> None:
        import mlflow

        self.mlflow = mlflow
        uri = default_tracking_uri(config)
        mlflow.set_tracking_uri(uri)
        mlflow.config.enable_async_logging(True)  # log_metric is ~55 ms against a server
        experiment = mlflow.get_experiment_by_name(config.run.experiment)
        if experiment is None:
            artifacts = None
            if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in cwd
                artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            experiment_id = mlflow.create_experiment(config.run.experiment, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        if run_id:
            self.run = mlflow.start_run(run_id=run_id)
        else:
            self.run = mlflow.start_run(experiment_id=experiment_id, run_name=config.run.run_name or None)
            mlflow.log_params(flat_params(config))
            mlflow.set_tags({**tags, "git_commit": _git_commit()})
        self.run_id = self.run.info.run_id
        self.tracking_uri = uri

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        self.mlflow.log_image(image, key=key, step=step)

    def log_artifacts(self, path: str | Path, artifact_path: str) -> None:
        self.mlflow.log_artifacts(str(path), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        try:
            self.mlflow.flush_async_logging()
        except Exception as error:  # never lose the run's status over a flush problem
            warnings.warn(f"MLflow flush failed: {error}", stacklevel=2)
        self.mlflow.end_run(status=status)


def make_tracker(config: TrainConfig, is_main: bool, tags: dict[str, str],
                 run_id: str | None = None) -> NullTracker:
    """An MlflowTracker on rank 0, a NullTracker elsewhere."""
    return MlflowTracker(config, tags, run_id) if is_main else NullTracker()
