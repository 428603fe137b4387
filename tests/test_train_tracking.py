"""MLflow resilience: a real tracking server stopped mid-run and started again loses no metric;
a server that never comes back leaves the metrics on disk for the next start of the job."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, VENV_BIN, free_port, stop_process_group, subprocess_env, wait_until_healthy

pytestmark = pytest.mark.slow


def start_server(port: int, root: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "artifacts")],
        env=subprocess_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until_healthy(f"http://127.0.0.1:{port}/health", process, 120)
    return process


def stop_server(process: subprocess.Popen) -> None:
    stop_process_group(process, timeout_s=30)  # the server and its worker processes


def local_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_server_stopped_mid_run_and_restarted_loses_nothing(small_shards, tmp_path):
    port = free_port()
    server = start_server(port, tmp_path)
    uri = f"http://127.0.0.1:{port}"
    command = [str(VENV_BIN / "python"), "-m", "train", f"--data.shards={small_shards}",
               f"--run.out_dir={tmp_path}/run", "--data.batch_size", "32", "--data.num_workers", "0",
               "--model.widths=8,16", "--model.hidden_dim=32", "--model.latent_dim=4",
               "--run.max_steps=150", "--run.log_interval_steps=5", "--run.eval_interval_steps=50",
               "--run.checkpoint_interval_steps=50", "--run.final_iwae_samples=5", "--run.precision=fp32",
               f"--run.tracking_uri={uri}", "--run.run_name=outage-test", "--run.tracking_flush_timeout_s=180"]
    # the experiment from MLflow's own variable; MLflow's host monitor sampling every second
    env = subprocess_env(MLFLOW_EXPERIMENT_NAME="outage", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    trainer = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)

    def host_metrics_sent() -> bool:  # MLflow's monitor publishes on its own clock, not with our metrics
        experiment = client.get_experiment_by_name("outage")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        return bool(runs) and "system/cpu_utilization_percentage" in runs[0].data.metrics

    try:
        metrics_file = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while not (metrics_file.exists() and len(local_records(tmp_path / "run")) >= 2 and host_metrics_sent()):
            assert trainer.poll() is None and time.monotonic() < deadline, trainer.communicate()[1][-3000:]
            time.sleep(0.2)
        stop_server(server)
        logged_before = len(local_records(tmp_path / "run"))
        # training goes on while the server is away (or finishes and waits in close for it)
        while len(local_records(tmp_path / "run")) < logged_before + 3 and trainer.poll() is None:
            time.sleep(0.2)
        server = start_server(port, tmp_path)
        stdout, stderr = trainer.communicate(timeout=400)
        assert trainer.returncode == 0, stderr[-3000:]
        # log lines with time and rank; stdout holds only the summary
        log_line = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank 0\] WARNING train.tracking: MLflow tracking at \S+ "
        assert re.search(log_line + "unreachable", stderr, re.MULTILINE), stderr[-3000:]
        assert re.search(log_line + "is back", stderr, re.MULTILINE), stderr[-3000:]
        assert len(stdout.splitlines()) == 1
        summary = json.loads(stdout.splitlines()[-1])
        runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        assert len(runs) == 1 and runs[0].info.run_id == summary["mlflow_run_id"]
        run = runs[0]
        assert run.info.status == "FINISHED" and run.info.run_name == "outage-test"
        assert run.data.tags["git_commit"] != "unknown" and run.data.params["run.max_steps"] == "150"
        records = local_records(tmp_path / "run")
        for key in ("train/neg_elbo", "train/lr", "train/grad_norm", "train/samples_per_s",
                    "train/data_wait_share", "train/skipped_steps", "data/skipped_samples", "data/bad_shards",
                    "process/rss_gb", "val/neg_elbo", "val/nll", "val/active_units"):
            expected = {(r["step"], r[key]) for r in records if key in r}
            got = {(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)}
            assert expected and got == expected, (key, sorted(expected - got))
        assert {r["step"] for r in records if "val/nll" in r} == {150}  # IWAE at the final evaluation
        assert {r["step"] for r in records if "val/neg_elbo" in r} == {50, 100, 150}
        images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
        for name in ("samples", "reconstructions", "interpolations"):
            assert any(name in path for path in images), images
        assert "checkpoint/state.pt" in [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
        assert client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")  # MLflow's monitor
        (data,) = run.inputs.dataset_inputs  # the training shards, identified by their manifest
        manifest = (small_shards / "manifest.json").read_text()
        assert data.dataset.digest == hashlib.sha256(manifest.encode()).hexdigest()[:16]
        assert json.loads(data.dataset.source) == {"uri": str(small_shards)} and data.dataset.source_type == "local"
        assert json.loads(data.dataset.profile)["num_samples"] == 1080
        assert [(t.key, t.value) for t in data.tags] == [("mlflow.data.context", "training")]
    finally:
        if trainer.poll() is None:
            trainer.kill()
        stop_server(server)


def test_metrics_unsent_at_the_end_are_sent_by_the_next_start(small_shards, tmp_path, caplog):
    import torch

    from train.config import build_config
    from train.distributed import DistContext
    from train.trainer import run_training

    def config(uri: str):
        return build_config({
            "data": {"shards": str(small_shards), "batch_size": 32, "num_workers": 0, "eval_batch_size": 120},
            "model": {"widths": [8, 16], "hidden_dim": 32, "latent_dim": 4},
            "run": {"out_dir": str(tmp_path / "run"), "max_steps": 6, "log_interval_steps": 2,
                    "final_iwae_samples": 0, "tracking_uri": uri, "tracking_flush_timeout_s": 1.0,
                    "experiment": "replay"}})

    context = DistContext(0, 1, 0, torch.device("cpu"), "gloo")
    with caplog.at_level(logging.WARNING, logger="train.tracking"):
        summary = run_training(config(f"http://127.0.0.1:{free_port()}"), context)  # nothing listens there
    assert "unreachable" in caplog.text and "mlflow-unsent.jsonl" in caplog.text
    assert summary["steps"] == 6 and summary["mlflow_run_id"] is None
    assert (tmp_path / "run" / "mlflow-unsent.jsonl").exists()

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    summary = run_training(config(uri), context)  # resumes at step 6: already done, so it only finishes
    assert not (tmp_path / "run" / "mlflow-unsent.jsonl").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    steps = [m.step for m in client.get_metric_history(summary["mlflow_run_id"], "train/neg_elbo")]
    assert sorted(steps) == [2, 4, 6]
