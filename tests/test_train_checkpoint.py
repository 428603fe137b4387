"""Checkpoints: exact resume, SIGTERM saves before exiting, a killed writer never corrupts the newest."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, VENV_BIN, subprocess_env
from train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from train.config import build_config
from train.distributed import DistContext
from train.trainer import run_training

CPU = DistContext(0, 1, 0, torch.device("cpu"), "gloo")


def tiny_config(shards: Path, out: Path, **run) -> object:
    return build_config({
        "data": {"shards": str(shards), "batch_size": 32, "num_workers": 0, "eval_batch_size": 120},
        "model": {"widths": [8, 16], "hidden_dim": 32, "latent_dim": 4},
        "optim": {"warmup_steps": 2},
        "run": {"out_dir": str(out / "run"), "eval_interval_steps": 1000, "log_interval_steps": 1,
                "final_iwae_samples": 0, "precision": "fp32", "system_metrics": False,
                "tracking_uri": f"sqlite:///{out.parent}/mlflow.db", **run},
    })


def read_metrics(run_dir: Path, key: str) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def test_resume_restores_the_exact_next_step_losses(small_shards, tmp_path):
    straight = tmp_path / "straight"
    config = tiny_config(small_shards, straight, max_steps=8, checkpoint_interval_steps=4)
    run_training(config, CPU)
    expected = read_metrics(straight / "run", "train/neg_elbo")
    assert sorted(expected) == list(range(1, 9))

    # a second job that starts from the straight run's step-4 checkpoint (mid-epoch: 33 batches/epoch)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "run" / "checkpoints" / "step-00000004",
                    resumed / "run" / "checkpoints" / "step-00000004")
    summary = run_training(tiny_config(small_shards, resumed, max_steps=8, checkpoint_interval_steps=4), CPU)
    assert summary["steps"] == 8
    got = read_metrics(resumed / "run", "train/neg_elbo")
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:  # same data position, RNG, optimizer and schedule: the very same numbers
        assert got[step] == expected[step], (step, got[step], expected[step])
    state = load_checkpoint(resumed / "run")
    assert state["position"]["step"] == 8 and state["position"]["batch_in_epoch"] == 8
    assert state["mlflow_run_id"] == summary["mlflow_run_id"]  # the same MLflow run continued
    for key in ("model", "ema", "optimizer", "scaler", "rng", "config"):
        assert key in state


def test_sigterm_saves_a_checkpoint_then_exits_143(small_shards, tmp_path):
    config_file = tmp_path / "c.json"
    base = tiny_config(small_shards, tmp_path, max_steps=100000, checkpoint_interval_steps=100000,
                       log_interval_steps=5)
    from train.config import config_to_dict

    config_file.write_text(json.dumps(config_to_dict(base)))
    process = subprocess.Popen([str(VENV_BIN / "python"), "-m", "train", "--config", str(config_file)],
                               cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    summary = json.loads(stdout.splitlines()[-1])
    assert summary["stopped_by"] == "sigterm"
    newest = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert newest is not None and int(newest.name.split("-")[1]) == summary["steps"] > 0
    from train import load_model

    model, config, state = load_model(newest)
    assert state["position"]["step"] == summary["steps"] and config.model.latent_dim == 4


WRITER = """
import sys, torch
from train.checkpoint import save_checkpoint
save_checkpoint(sys.argv[1], 1, {"model": {"w": torch.ones(3)}, "config": {}})
print("first saved", flush=True)
save_checkpoint(sys.argv[1], 2, {"model": {"w": torch.randn(150_000_000)}, "config": {}})
print("second saved", flush=True)
"""


def test_a_writer_killed_mid_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    directory = tmp_path / "checkpoints"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(directory)], cwd=REPO,
                               env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(directory.glob(".tmp-step-00000002-*")):
        assert process.poll() is None and time.monotonic() < deadline, "the writer ended before step 2"
        time.sleep(0.01)
    process.kill()  # SIGKILL while step 2 is being written
    process.wait(timeout=30)
    assert [p.name for p in list_checkpoints(directory)] == ["step-00000001"]
    assert torch.equal(load_checkpoint(directory)["model"]["w"], torch.ones(3))
    # the next save clears the half-written directory
    save_checkpoint(directory, 3, {"model": {"w": torch.zeros(3)}, "config": {}})
    assert not list(directory.glob(".tmp-*"))
    assert load_checkpoint(directory)["step"] == 3


class Payload:
    """Stands in for arbitrary code in a pickle."""


def test_only_the_newest_k_are_kept_and_loading_refuses_code(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"model": {}, "config": {}}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]

    # an object, not data: weights_only loading must refuse to unpickle it
    torch.save({"format_version": 2, "evil": Payload()}, tmp_path / "bad.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(tmp_path / "bad.pt")
