"""MLflow tracking for one training job that never stops training.

Rank 0 holds an MlflowTracker; other ranks hold a NullTracker, so the loop has no rank checks.
Every call only queues: a background thread sends the queue in order (metrics batched). When the
tracking server goes away, the thread warns once, keeps the queue and retries with back-off; when
the server is back it sends the backlog. At the end `close` waits up to
run.tracking_flush_timeout_s, then writes whatever is still unsent to <out_dir>/mlflow-unsent.jsonl,
which the next start of the same job (same out_dir) sends first. Every metric is also appended to
<out_dir>/metrics.jsonl as it is logged: the local record that does not depend on any server.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from train.config import TrainConfig, flat_params

METRICS_FILE = "metrics.jsonl"
UNSENT_FILE = "mlflow-unsent.jsonl"
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
# Errors that retrying cannot fix (the request itself is wrong): drop the operation, say so.
CLIENT_ERROR_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST",
                      "RESOURCE_ALREADY_EXISTS", "INVALID_STATE", "PERMISSION_DENIED"}


def default_tracking_uri(config: TrainConfig) -> str:
    """config -> $MLFLOW_TRACKING_URI -> sqlite file beside the run directory."""
    if config.run.tracking_uri:
        return config.run.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(config.run.out_dir).resolve().parent / 'mlflow.db'}"


def git_commit() -> str:
    """The commit of the code that trains (with '-dirty' when the tree has changes), or 'unknown'."""
    try:
        cwd = Path(__file__).parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=cwd).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, cwd=cwd).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def readable_run_name(config: TrainConfig, world_size: int, precision: str) -> str:
    """A run name that says what differs between runs, e.g. 'bernoulli-z16-32x64-bs256-fp32-2p-1124-2315'
    ('discretized_logistic-resnet-s-z32-...' for a preset other than conv)."""
    if config.run.run_name:
        return config.run.run_name
    model = config.model
    stamp = time.strftime("%m%d-%H%M", time.gmtime())
    preset = "" if model.preset == "conv" else f"{model.preset}-"
    return (f"{model.likelihood}-{preset}z{model.latent_dim}-{'x'.join(map(str, model.widths))}"
            f"{'-res' if model.residual else ''}-bs{config.data.batch_size * world_size}-{precision}"
            f"-{world_size}p-{stamp}")


def system_metrics(device) -> dict[str, float]:
    """system/ metrics: host CPU and memory use, this process's memory, GPU memory when present."""
    import psutil

    memory = psutil.virtual_memory()
    metrics = {"system/cpu_percent": psutil.cpu_percent(interval=None),
               "system/memory_percent": memory.percent,
               "system/memory_used_gb": (memory.total - memory.available) / 2**30,
               "system/process_rss_gb": psutil.Process().memory_info().rss / 2**30}
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        metrics["system/gpu_memory_allocated_gb"] = torch.cuda.memory_allocated(device) / 2**30
        metrics["system/gpu_memory_reserved_gb"] = torch.cuda.memory_reserved(device) / 2**30
    return metrics


class NullTracker:
    """What non-main ranks hold: every call is a no-op."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: np.ndarray, key: str, step: int) -> None: ...
    def log_artifacts(self, path: str | Path, artifact_path: str) -> None: ...
    def flush(self, timeout_s: float) -> bool: return True
    def close(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run per job; a resumed job passes `run_id` and continues the same run."""

    def __init__(self, config: TrainConfig, tags: dict[str, str], run_id: str | None = None,
                 run_name: str | None = None, retry_max_s: float = 10.0) -> None:
        # Fail fast inside the sender thread and retry there, rather than let the REST client
        # block for minutes on its own retries (its defaults: 7 retries with back-off).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.config = config
        self.tracking_uri = default_tracking_uri(config)
        self.client = MlflowClient(self.tracking_uri)
        self.out_dir = Path(config.run.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        self._resumed = run_id is not None
        self._run_name = run_name or config.run.run_name or None
        self._tags = {**tags, "git_commit": git_commit()}
        self._ops: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._healthy = True
        self._retry_max_s = retry_max_s
        self.num_failures = 0
        self._metrics_file = open(self.out_dir / METRICS_FILE, "a", buffering=1)
        self._load_unsent()
        try:  # create the run now if the server is there, so its id goes into the first checkpoint
            self._ensure_run()
        except Exception as error:  # noqa: BLE001 - any failure here is retried by the sender
            self._report_failure(error)
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    # -- what the training loop calls (never blocks on the network) -----------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        record = {"step": step, "timestamp": timestamp, **{k: float(v) for k, v in metrics.items()}}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._enqueue(("metrics", step, timestamp, {k: float(v) for k, v in metrics.items()}))

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        self._enqueue(("image", key, step, int(time.time() * 1000), image))

    def log_artifacts(self, path: str | Path, artifact_path: str) -> None:
        self._enqueue(("artifacts", str(path), artifact_path))

    def flush(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for the queue to drain; True when everything was sent."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify_all()
            while self._ops and time.monotonic() < deadline:
                self._cond.wait(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
            return not self._ops

    @property
    def healthy(self) -> bool:
        return self._healthy

    def close(self, status: str = "FINISHED") -> None:
        """Send the backlog (waiting up to tracking_flush_timeout_s), mark the run, save leftovers."""
        self._enqueue(("status", status))
        sent = self.flush(self.config.run.tracking_flush_timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=15)
        self._metrics_file.close()
        if not sent:
            self._save_unsent()

    # -- the sender thread ----------------------------------------------------------------------
    def _enqueue(self, op: tuple) -> None:
        with self._cond:
            self._ops.append(op)
            self._cond.notify_all()

    def _ensure_run(self) -> None:
        if self.run_id is not None:
            if self._resumed:
                self.client.update_run(self.run_id, status="RUNNING")
                self._resumed = False
            return
        from mlflow.entities import Param

        experiment = self.client.get_experiment_by_name(self.config.run.experiment)
        if experiment is None:
            artifacts = None
            if self.tracking_uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in cwd
                artifacts = (Path(self.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(self.config.run.experiment, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=self._run_name, tags=self._tags)
        params = [Param(k, v) for k, v in flat_params(self.config).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[start:start + 100])
        self.run_id = run.info.run_id

    def _send(self, op: tuple) -> int:
        """Send the op at the head of the queue (and the metric ops after it); return how many."""
        kind = op[0]
        if kind == "metrics":
            from mlflow.entities import Metric

            metrics, count = [], 0
            for queued in list(self._ops):
                if queued[0] != "metrics" or len(metrics) + len(queued[3]) > MAX_METRICS_PER_BATCH:
                    break
                _, step, timestamp, values = queued
                metrics += [Metric(k, v, timestamp, step) for k, v in values.items()]
                count += 1
            self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
            return count
        if kind == "image":
            _, key, step, timestamp, image = op
            self.client.log_image(self.run_id, image, key=key, step=step, timestamp=timestamp,
                                  synchronous=True)
        elif kind == "artifacts":
            _, path, artifact_path = op
            if Path(path).exists():
                self.client.log_artifacts(self.run_id, path, artifact_path)
            else:
                warnings.warn(f"MLflow: {path} no longer exists; artifact {artifact_path} not logged", stacklevel=1)
        elif kind == "status":
            self.client.set_terminated(self.run_id, status=op[1])
        return 1

    def _send_loop(self) -> None:
        delay = 0.5
        while True:
            with self._cond:
                while not self._ops and not self._closing:
                    self._cond.wait()
                if not self._ops:
                    return
                head = self._ops[0]
            try:
                self._ensure_run()
                sent = self._send(head)
            except Exception as error:  # noqa: BLE001 - the server's failures must never reach training
                if getattr(error, "error_code", None) in CLIENT_ERROR_CODES and self.run_id is not None:
                    warnings.warn(f"MLflow rejected {head[0]} ({error}); dropped it", stacklevel=1)
                    sent = 1
                else:
                    self._report_failure(error)
                    with self._cond:
                        if self._closing:
                            return
                        self._cond.wait(timeout=delay)
                    delay = min(self._retry_max_s, delay * 2)
                    continue
            with self._cond:
                for _ in range(sent):
                    self._ops.popleft()
                backlog = len(self._ops)
                self._cond.notify_all()
            if not self._healthy:
                print(f"MLflow tracking at {self.tracking_uri} is back; sending the backlog "
                      f"({backlog} operations left)", file=sys.stderr, flush=True)
                self._healthy = True
            delay = 0.5

    def _report_failure(self, error: Exception) -> None:
        self.num_failures += 1
        if self._healthy:
            first_line = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
            warnings.warn(f"MLflow tracking at {self.tracking_uri} unreachable ({first_line}); training "
                          "continues and the metrics are kept to send when it is back", stacklevel=1)
            print(f"warning: MLflow tracking at {self.tracking_uri} unreachable; buffering",
                  file=sys.stderr, flush=True)
        self._healthy = False

    # -- leftovers across restarts --------------------------------------------------------------
    def _save_unsent(self) -> None:
        path = self.out_dir / UNSENT_FILE
        metrics = [op for op in self._ops if op[0] == "metrics"]
        dropped = len(self._ops) - len(metrics)
        with open(path, "a") as file:
            for _, step, timestamp, values in metrics:
                file.write(json.dumps({"run_id": self.run_id, "step": step, "timestamp": timestamp,
                                       "metrics": values}) + "\n")
        warnings.warn(f"MLflow tracking at {self.tracking_uri} still unreachable: {len(metrics)} metric "
                      f"batches saved to {path} (sent by the next start of this job); {dropped} image/"
                      "artifact/status operations not sent", stacklevel=2)

    def _load_unsent(self) -> None:
        path = self.out_dir / UNSENT_FILE
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("run_id") in (None, self.run_id):
                self._ops.append(("metrics", record["step"], record["timestamp"], record["metrics"]))
        path.unlink()


def make_tracker(config: TrainConfig, is_main: bool, tags: dict[str, str],
                 run_id: str | None = None, run_name: str | None = None) -> NullTracker:
    """An MlflowTracker on rank 0, a NullTracker elsewhere."""
    return MlflowTracker(config, tags, run_id, run_name) if is_main else NullTracker()
