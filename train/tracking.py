"""MLflow tracking for one training job that never stops training.

Rank 0 holds an MlflowTracker; other ranks hold a NullTracker, so the loop has no rank checks.
Every call only queues: a background thread sends the queue in order (metrics batched). When the
tracking server goes away, the thread warns once, keeps the queue and retries with back-off; when
the server is back it sends the backlog. At the end `close` waits up to
run.tracking_flush_timeout_s, then writes whatever is still unsent to <out_dir>/mlflow-unsent.jsonl,
which the next start of the same job (same out_dir) sends first. Every metric is also appended to
<out_dir>/metrics.jsonl as it is logged: the local record that does not depend on any server.

Host metrics (system/: CPU, memory, disk, network, GPU utilisation) come from MLflow's own monitor,
on its own clock; process/ metrics (this process's memory and PyTorch's allocator, which MLflow's
monitor does not see) travel with the training metrics. The training shards are the run's input.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from train.config import TrainConfig, flat_params

if TYPE_CHECKING:
    from pipeline.loader import ShardSet

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RUN_NOTE = ("Compare runs on train/neg_elbo, val/neg_elbo and val/nll first (nats per image, lower is better); "
            "train/samples_per_s for speed. system/ is MLflow's host monitor, process/ this trainer's memory.")
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


def experiment_name(config: TrainConfig) -> str:
    """config -> $MLFLOW_EXPERIMENT_NAME -> vae-pipeline."""
    return config.run.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "vae-pipeline"


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
    """process/ metrics, which MLflow's system monitor (whole host, whole GPU) does not log: this
    process's resident memory and, on CUDA, the memory PyTorch's allocator holds and caches."""
    import psutil

    metrics = {"process/rss_gb": psutil.Process().memory_info().rss / 2**30}
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        metrics["process/gpu_memory_allocated_gb"] = torch.cuda.memory_allocated(device) / 2**30
        metrics["process/gpu_memory_reserved_gb"] = torch.cuda.memory_reserved(device) / 2**30
    return metrics


def dataset_input(location: str, shards: ShardSet):
    """The training shards as an MLflow dataset input: named by the manifest's source, found at
    `location`, with the sha256 of the manifest (which holds every shard's sha256) as digest."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    manifest = shards.manifest
    sha256 = hashlib.sha256(manifest.to_json().encode()).hexdigest()
    uri = location if "://" in location or location.startswith("pipe:") else str(Path(location).resolve())
    profile = json.dumps({"manifest_sha256": sha256, "num_samples": shards.num_samples,
                          "num_shards": len(shards.urls), "image_shape": list(manifest.image_shape),
                          "layout": manifest.layout})
    try:
        with warnings.catch_warnings():  # MLflow registers its local source twice and warns that it is ambiguous
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(uri)
        fields = MetaDataset(source, name=manifest.source, digest=sha256[:16]).to_dict()
    except MlflowException:  # a `pipe:` command, say: no MLflow source type fits
        fields = {"name": manifest.source, "digest": sha256[:16], "source_type": "external",
                  "source": json.dumps({"uri": uri})}
    return DatasetInput(Dataset(**fields, profile=profile), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])


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
                 run_name: str | None = None, retry_max_s: float = 10.0, dataset: ShardSet | None = None) -> None:
        # Fail fast inside the sender thread and retry there, rather than let the REST client
        # block for minutes on its own retries (its defaults: 7 retries with back-off).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        # MLflow prints the run's address to stdout when the run ends; stdout carries only the JSON
        # summary (scripts read it), so the address goes to the log when the run is created instead.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        from mlflow.tracking import MlflowClient

        self.config = config
        self.tracking_uri = default_tracking_uri(config)
        self.client = MlflowClient(self.tracking_uri)
        self.out_dir = Path(config.run.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        self._resumed = run_id is not None
        self._run_name = run_name or config.run.run_name or None
        self._tags = {**tags, "git_commit": git_commit(), "mlflow.note.content": RUN_NOTE}
        self._ops: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._healthy = True
        self._retry_max_s = retry_max_s
        self.num_failures = 0
        self._monitor = None  # MLflow's system metrics monitor, once the run exists
        self._monitor_stopped = False
        self._metrics_file = open(self.out_dir / METRICS_FILE, "a", buffering=1)
        self._load_unsent()
        if dataset is not None:
            self._ops.append(("inputs", dataset_input(config.data.shards, dataset)))
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
        with self._cond:
            monitor, self._monitor, self._monitor_stopped = self._monitor, None, True
        if monitor is not None:
            monitor.finish()  # sends its last sample while the run is still RUNNING
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
                self._start_monitor(resume=True)
                self._resumed = False
            return
        from mlflow.entities import Param

        name = experiment_name(self.config)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            artifacts = None
            if self.tracking_uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in cwd
                artifacts = (Path(self.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=self._run_name, tags=self._tags)
        params = [Param(k, v) for k, v in flat_params(self.config).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[start:start + 100])
        self.run_id = run.info.run_id
        address = f"{self.tracking_uri}/#/experiments/{experiment_id}/runs/{self.run_id}" \
            if self.tracking_uri.startswith("http") else f"{self.run_id} in {self.tracking_uri}"
        log.info("MLflow run %s, experiment %s: %s", run.info.run_name, name, address)
        self._start_monitor(resume=False)

    def _start_monitor(self, resume: bool) -> None:
        """(Re)start MLflow's system metrics monitor on this run (never raises): it stops for good
        when a request fails, so the sender starts it again once the server is back."""
        if not self.config.run.system_metrics or self._monitor_stopped:
            return
        # The class behind mlflow.start_run(log_system_metrics=True), which needs the fluent active run.
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        with self._cond:
            previous, self._monitor = self._monitor, None
        if previous is not None:
            previous.finish()
        try:
            monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.tracking_uri, resume_logging=resume)
        except Exception as error:  # noqa: BLE001 - host metrics must never stop tracking; retried when back
            log.warning("MLflow system metrics not started: %s", error)
            return
        with self._cond:
            if self._monitor_stopped:  # close() came first
                return
            self._monitor = monitor
        monitor.start()

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
                log.warning("MLflow: %s no longer exists; artifact %s not logged", path, artifact_path)
        elif kind == "inputs":
            self.client.log_inputs(self.run_id, datasets=[op[1]])
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
                    log.warning("MLflow rejected %s (%s); dropped it", head[0], error)
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
                log.warning("MLflow tracking at %s is back; sending the backlog (%d operations left)",
                            self.tracking_uri, backlog)
                self._healthy = True
                self._start_monitor(resume=True)
            delay = 0.5

    def _report_failure(self, error: Exception) -> None:
        self.num_failures += 1
        if self._healthy:
            first_line = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
            log.warning("MLflow tracking at %s unreachable (%s); training continues and the metrics are "
                        "kept to send when it is back", self.tracking_uri, first_line)
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
        log.warning("MLflow tracking at %s still unreachable: %d metric batches saved to %s (sent by the next "
                    "start of this job); %d image/artifact/input/status operations not sent",
                    self.tracking_uri, len(metrics), path, dropped)

    def _load_unsent(self) -> None:
        path = self.out_dir / UNSENT_FILE
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("run_id") in (None, self.run_id):
                self._ops.append(("metrics", record["step"], record["timestamp"], record["metrics"]))
        path.unlink()


def make_tracker(config: TrainConfig, is_main: bool, tags: dict[str, str], run_id: str | None = None,
                 run_name: str | None = None, dataset: ShardSet | None = None) -> NullTracker:
    """An MlflowTracker on rank 0 (`dataset`: the training shards, logged as the run's input), a
    NullTracker elsewhere."""
    return MlflowTracker(config, tags, run_id, run_name, dataset=dataset) if is_main else NullTracker()
