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

    from train.model import VAE

    model, state = load_model(newest), load_checkpoint(newest)
    assert isinstance(model, VAE) and not model.training  # the model itself, not a tuple
    assert state["position"]["step"] == summary["steps"] and model.config.latent_dim == 4
    assert not (tmp_path / "run" / "model").exists()  # a preempted run leaves no finished model


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


def test_stray_names_and_unreadable_checkpoints_are_passed_over_with_a_warning(small_shards, tmp_path, capfd):
    from train.checkpoint import CheckpointWarning, UnreadableCheckpointError

    run_training(tiny_config(small_shards, tmp_path, max_steps=4, checkpoint_interval_steps=2), CPU)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-00000002", "step-00000004"]
    (checkpoints / "step-abc").mkdir()  # a stray directory once stopped every start
    newest = checkpoints / "step-00000004" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut short, as by a full disk
    capfd.readouterr()

    with pytest.warns(CheckpointWarning) as caught:
        summary = run_training(tiny_config(small_shards, tmp_path, max_steps=6, checkpoint_interval_steps=2), CPU)
    messages = [str(w.message) for w in caught]
    assert any("step-abc" in m and "not a checkpoint" in m for m in messages), messages
    assert any("step-00000004" in m and "not a readable checkpoint" in m for m in messages), messages
    assert f"resumed from {checkpoints / 'step-00000002'} at step 2" in capfd.readouterr().err
    assert summary["steps"] == 6
    assert load_checkpoint(checkpoints / "step-00000004")["step"] == 4  # saved again, whole this time

    # export reads a run directory the same way; a named file that is garbage is a clear error
    (checkpoints / "step-00000006" / "state.pt").write_bytes(b"garbage" * 1000)
    with pytest.warns(CheckpointWarning, match="step-00000006"):
        assert load_checkpoint(tmp_path / "run")["step"] == 4
    with pytest.raises(UnreadableCheckpointError, match=r"step-00000006.state\.pt: not a readable checkpoint"):
        load_checkpoint(checkpoints / "step-00000006")

    # nothing readable at all: an error naming them, never a silent start from scratch over them
    for path in list_checkpoints(checkpoints):
        (path / "state.pt").write_bytes(b"")
    with pytest.warns(CheckpointWarning), pytest.raises(UnreadableCheckpointError, match="no readable checkpoint"):
        run_training(tiny_config(small_shards, tmp_path, max_steps=8), CPU)


def test_checkpoints_are_saved_before_evaluations_that_fail(small_shards, tmp_path):
    """Validation data that breaks at an evaluation must not cost the steps trained since the last save."""
    from dataclasses import replace

    from pipeline.errors import DataError

    def strict(config):  # no bad data allowed: the vanished shard stops the evaluation
        return replace(config, data=replace(config.data, max_bad_samples=0, max_bad_fraction=0.0))

    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    (shards / "val-000001.tar").unlink()  # the image grids read val-000000 only: evaluations fail, start does not
    checkpoints = tmp_path / "run" / "checkpoints"
    with pytest.raises(DataError, match="val-000001.tar"):  # at the step-2 evaluation
        run_training(strict(tiny_config(shards, tmp_path, max_steps=4, checkpoint_interval_steps=2,
                                        eval_interval_steps=2)), CPU)
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-00000002"]
    with pytest.raises(DataError, match="val-000001.tar"):  # at the final evaluation
        run_training(strict(tiny_config(shards, tmp_path, max_steps=3)), CPU)
    assert latest_checkpoint(checkpoints).name == "step-00000003"


def test_skipped_samples_reach_metrics_jsonl_and_mlflow(digit_slice, tmp_path):
    import tarfile

    from mlflow.tracking import MlflowClient

    from pipeline.shards import write_shards
    from tests.test_pipeline_bad_data import rewrite_tar

    shards = tmp_path / "shards"
    write_shards(digit_slice, shards, samples_per_shard=300, progress=False, layout="png")  # 1,080 train
    bad = sorted(n for n in tarfile.open(shards / "train-000000.tar").getnames() if n.endswith(".png"))[3]
    rewrite_tar(shards / "train-000000.tar", lambda name, payload: b"not a png" if name == bad else payload)

    summary = run_training(tiny_config(shards, tmp_path, max_steps=3), CPU)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "data/skipped_samples" in r}
    assert sorted(logged) == [1, 2, 3]
    # one pass over every training shard fills the first shuffle window: all of it is read by step 1
    assert logged[3]["data/skipped_samples"] == 1 and logged[3]["data/bad_shards"] == 0
    assert logged[3]["data/read_samples"] >= 1079
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.parent}/mlflow.db")
    for key in ("data/skipped_samples", "data/bad_shards", "data/read_samples"):
        history = {(m.step, m.value) for m in client.get_metric_history(summary["mlflow_run_id"], key)}
        assert history == {(step, r[key]) for step, r in logged.items()}, key


FULL_DISK = """
set -u
mount -t tmpfs -o size=8m tmpfs "$DISK" || exit 90
"$PYTHON" -m train --config "$CONFIG" --run.out_dir="$DISK/run" &
trainer=$!
while [ ! -d "$DISK/run/checkpoints/step-00000020" ]; do
    kill -0 $trainer 2>/dev/null || break
    sleep 0.05
done
head -c 64M /dev/zero > "$DISK/filler" 2>/dev/null  # fill the disk up (head stops at ENOSPC)
wait $trainer
echo "trainer exit $?"
cp -r "$DISK/run/checkpoints" "$KEEP"  # the tmpfs goes with this namespace: keep what is left for the test
"""


def test_a_full_disk_is_reported_as_such_and_the_previous_checkpoint_stays(small_shards, tmp_path):
    """A real full filesystem: a tmpfs of 8 MiB, mounted in a private mount namespace (unshare), filled
    up while the trainer runs; its next checkpoint write meets ENOSPC."""
    disk, keep = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=1m tmpfs {disk}"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private tmpfs mount here (unshare --user --mount: {probe.stderr.strip()[:200]})")
    config = tiny_config(small_shards, tmp_path, max_steps=100000, checkpoint_interval_steps=20,
                         log_interval_steps=100000)  # the checkpoint is the only write after the disk fills
    from train.config import config_to_dict

    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(config)))
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", FULL_DISK], cwd=REPO,
        env=subprocess_env(DISK=str(disk), KEEP=str(keep), CONFIG=str(tmp_path / "config.json"),
                           PYTHON=str(VENV_BIN / "python")), capture_output=True, text=True, timeout=300)
    assert "trainer exit 1" in result.stdout, (result.stdout, result.stderr[-3000:])
    error = result.stderr.strip().splitlines()[-1]
    assert f"[rank 0] ERROR train: no space left on device writing checkpoint {disk}/run/checkpoints/step-00000040" \
        in error, result.stderr[-3000:]
    assert "previous checkpoints" in error and "intact" in error
    assert sorted(p.name for p in keep.iterdir()) == ["step-00000020"]  # no half-written directory left
    assert load_checkpoint(keep)["step"] == 20
