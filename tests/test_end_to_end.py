"""Shards -> real `torchrun --nproc_per_node=2` -> checkpoint -> ONNX -> samples, on real digits."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from tests.conftest import REPO, VENV_BIN, subprocess_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(small_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{out}/mlflow.db"
    command = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "train",
               f"--data.shards={small_shards}", f"--run.out_dir={out}/run", "--data.batch_size=32",
               "--run.max_steps=120", "--run.eval_interval_steps=60", "--run.log_interval_steps=20",
               "--run.checkpoint_interval_steps=60", "--optim.warmup_steps=10",
               f"--run.tracking_uri={uri}", "--run.experiment=e2e-test"]
    result = subprocess.run(command, cwd=out, env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {"out": out, "uri": uri, "summaries": summaries, "shards": small_shards}


def test_both_ranks_finish_the_same_steps(trained):
    summaries = sorted(trained["summaries"], key=lambda s: s["rank"])
    assert [s["rank"] for s in summaries] == [0, 1]
    assert summaries[0]["steps"] == summaries[1]["steps"] == 120
    # the validation metric is all-reduced, so both ranks report the same exact number
    assert summaries[0]["val/neg_elbo"] == summaries[1]["val/neg_elbo"]


def test_training_beats_the_untrained_model(trained):
    from pipeline.loader import open_split
    from train import load_checkpoint, load_model
    from train.config import ModelConfig
    from train.distributed import DistContext
    from train.evaluate import evaluate
    from train.model import build_model

    context = DistContext(0, 1, 0, torch.device("cpu"), "gloo")
    val = open_split(str(trained["shards"]), "val")
    torch.manual_seed(0)
    untrained = evaluate(build_model(ModelConfig()), val, context, batch_size=64, precision="fp32")
    model, state = load_model(trained["out"] / "run"), load_checkpoint(trained["out"] / "run")
    assert state["step"] == 120
    trained_metrics = evaluate(model, val, context, batch_size=64, precision="fp32")
    assert untrained["val/neg_elbo"] > 500  # ~784 * ln 2 for an untrained decoder
    assert trained_metrics["val/neg_elbo"] < 0.5 * untrained["val/neg_elbo"], (trained_metrics, untrained)


def test_checkpoints_are_atomic_directories(trained):
    steps = sorted(p.name for p in (trained["out"] / "run" / "checkpoints").iterdir())
    assert steps == ["step-00000060", "step-00000120"]


def test_onnx_export_matches_pytorch_and_serves_samples(trained):
    out = trained["out"]
    export = subprocess.run([str(VENV_BIN / "python"), "-m", "export", "--checkpoint", str(out / "run"),
                             "--out", str(out / "model")], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    metadata = json.loads((out / "model" / "model.json").read_text())
    assert metadata["latent_dim"] == 16 and metadata["image_shape"] == [1, 28, 28]
    assert metadata["parity_max_abs_diff"] <= 1e-4
    assert metadata["mlflow_run_id"] == next(s["mlflow_run_id"] for s in trained["summaries"] if s["rank"] == 0)

    # an independent check of the exported decoder against the checkpoint
    import onnxruntime as ort

    from train import load_model

    model = load_model(out / "run")
    z = np.random.default_rng(1).standard_normal((7, 16)).astype(np.float32)
    session = ort.InferenceSession(str(out / "model" / "decoder.onnx"), providers=["CPUExecutionProvider"])
    _, probs = session.run(None, {"z": z})
    with torch.no_grad():
        expected = torch.sigmoid(model.decode(torch.from_numpy(z))).numpy()
    assert np.abs(probs - expected).max() < 1e-4

    for args in (["generate", "-n", "16", "--out", str(out / "samples.png")],
                 ["reconstruct", "--input", str(trained["shards"]), "--out", str(out / "recon.png")]):
        result = subprocess.run([str(VENV_BIN / "python"), "-m", "serve", *args, "--model", str(out / "model")],
                                cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "CPUExecutionProvider" in result.stdout
    from PIL import Image

    assert Image.open(out / "samples.png").size[0] > 100


def test_mlflow_run_holds_params_metrics_images_and_checkpoint(trained):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=trained["uri"])
    experiment = client.get_experiment_by_name("e2e-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "one MLflow run per training job"
    run = runs[0]
    assert run.data.params["model.latent_dim"] == "16" and run.data.params["data.batch_size"] == "32"
    assert run.data.tags["world_size"] == "2" and run.data.tags["backend"] == "gloo"
    history = client.get_metric_history(run.info.run_id, "train/neg_elbo")
    assert [m.step for m in history] == [20, 40, 60, 80, 100, 120]
    assert history[-1].value < history[0].value
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/neg_elbo")] == [60, 120]
    for metric in ("train/recon", "train/kl"):
        assert len(client.get_metric_history(run.info.run_id, metric)) == 6
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("samples" in p for p in images) and any("reconstructions" in p for p in images)
    checkpoint = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
    assert "checkpoint/state.pt" in checkpoint
