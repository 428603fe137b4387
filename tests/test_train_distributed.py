"""Real torchrun jobs (gloo): two "nodes" match one node, and a killed worker is restarted and resumes."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import REPO, VENV_BIN, free_port, subprocess_env

pytestmark = pytest.mark.slow


def train_flags(shards: Path, out: Path, **run: object) -> list[str]:
    flags = {"data.shards": shards, "data.batch_size": 16, "data.num_workers": 0, "data.eval_batch_size": 60,
             "model.widths": "8,16", "model.hidden_dim": 32, "model.latent_dim": 4,
             "optim.warmup_steps": 2, "run.out_dir": out / "run", "run.log_interval_steps": 1,
             "run.eval_interval_steps": 1000, "run.checkpoint_interval_steps": 1000,
             "run.final_iwae_samples": 0, "run.precision": "fp32", "run.system_metrics": "false",
             "run.tracking_uri": f"sqlite:///{out}/mlflow.db", "run.experiment": "dist-test"}
    flags.update({f"run.{k}": v for k, v in run.items()})
    return [f"--{k}={v}" for k, v in flags.items()]


def losses(out: Path) -> dict[int, float]:
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/neg_elbo"] for r in map(json.loads, lines) if "train/neg_elbo" in r}


def summaries(stdout: str) -> list[dict]:
    return sorted((json.loads(line) for line in stdout.splitlines() if line.startswith("{")),
                  key=lambda s: s["rank"])


def test_two_nodes_match_one_node_with_two_processes(small_shards, tmp_path):
    torchrun = str(VENV_BIN / "torchrun")
    single = tmp_path / "single"
    one_node = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "train",
                               *train_flags(small_shards, single, max_steps=12)],
                              cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert one_node.returncode == 0, one_node.stderr[-3000:]

    multi = tmp_path / "multi"
    port = free_port()
    nodes = [subprocess.Popen([torchrun, "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                               f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes", "-m", "train",
                               *train_flags(small_shards, multi, max_steps=12)],
                              cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [node.communicate(timeout=300) for node in nodes]
    for node, (_, stderr) in zip(nodes, results):
        assert node.returncode == 0, stderr[-3000:]  # both agents exit cleanly: no gloo abort at exit
    ranks = sorted(s["rank"] for out, _ in results for s in summaries(out))
    assert ranks == [0, 1] and all(s["world_size"] == 2 for out, _ in results for s in summaries(out))

    expected, got = losses(single), losses(multi)
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    torch.testing.assert_close(torch.tensor([got[s] for s in sorted(got)]),
                               torch.tensor([expected[s] for s in sorted(expected)]), rtol=1e-5, atol=1e-4)


def test_kill_9_of_a_worker_is_restarted_and_resumes_into_the_same_run(small_shards, tmp_path):
    out = tmp_path
    process = subprocess.Popen(
        [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--max-restarts=2", "-m", "train",
         *train_flags(small_shards, out, max_steps=150, checkpoint_interval_steps=20, log_interval_steps=5)],
        cwd=REPO, env=subprocess_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = out / "run" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (checkpoints / "step-00000020").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    workers = [p for p in psutil.Process(process.pid).children(recursive=True)
               if p.environ().get("RANK") == "1"]
    assert len(workers) == 1
    workers[0].kill()  # SIGKILL rank 1 mid-run
    killed_at = max(int(p.name.split("-")[1]) for p in checkpoints.iterdir() if p.name.startswith("step-"))
    stdout, stderr = process.communicate(timeout=400)
    assert process.returncode == 0, stderr[-4000:]
    assert [s["steps"] for s in summaries(stdout)] == [150, 150]
    resumed = [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", stderr)]
    assert resumed and resumed[0] >= killed_at >= 20, stderr[-3000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("dist-test").experiment_id])
    assert len(runs) == 1, "the restarted job continues the same MLflow run"
    assert runs[0].info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "train/neg_elbo")}
    assert steps == set(range(5, 151, 5)), sorted(set(range(5, 151, 5)) - steps)  # no gap


def rank_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The trainer processes torchrun started (its direct children that carry a RANK)."""
    return [p for p in psutil.Process(launcher.pid).children() if "RANK" in p.environ()]


def wait_for_metrics(process: subprocess.Popen, out: Path, lines: int, timeout_s: float = 240) -> None:
    metrics = out / "run" / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while not (metrics.exists() and metrics.read_text().count("\n") >= lines):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.1)


def test_sigterm_to_torchrun_saves_at_the_current_step_and_exits_143_with_loader_workers(small_shards, tmp_path):
    """Kubernetes' preemption path: SIGTERM to the launcher; torchrun signals each trainer's whole process
    group, DataLoader workers included. `python -m train.launch` is torchrun with the exit status 143."""
    process = subprocess.Popen(
        [str(VENV_BIN / "python"), "-m", "train.launch", "--standalone", "--nproc_per_node=2", "-m", "train",
         *train_flags(small_shards, tmp_path, max_steps=100000), "--data.num_workers=2"],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_metrics(process, tmp_path, lines=3)
        process.send_signal(signal.SIGTERM)  # kill -TERM <torchrun>
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr[-4000:]
    done = summaries(stdout)
    assert [s["stopped_by"] for s in done] == ["sigterm", "sigterm"], stderr[-4000:]
    steps = done[0]["steps"]
    assert done[1]["steps"] == steps >= 3
    from train.checkpoint import latest_checkpoint, load_checkpoint

    newest = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert newest is not None and newest.name == f"step-{steps:08d}"  # the step they stopped at
    assert load_checkpoint(newest)["position"]["step"] == steps
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == steps and last["data/skipped_samples"] == 0 and last["data/read_samples"] >= 2 * 16 * steps


def test_kill_9_of_torchrun_stops_its_ranks_and_a_second_trainer_is_refused(small_shards, tmp_path):
    """torchrun SIGKILLed alone: its trainers (in sessions of their own) must not train on unsupervised.
    While they run, a second trainer on the same run directory is refused."""
    flags = train_flags(small_shards, tmp_path, max_steps=100000)
    process = subprocess.Popen([str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "train",
                                *flags], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    ranks: list[psutil.Process] = []
    try:
        wait_for_metrics(process, tmp_path, lines=2)
        ranks = rank_processes(process)
        assert len(ranks) == 2
        rank0 = next(p for p in ranks if p.environ()["RANK"] == "0")
        second = subprocess.run([str(VENV_BIN / "python"), "-m", "train", *flags, "--run.max_steps=1"],
                                cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=180)
        assert second.returncode == 1, second.stderr[-3000:]
        assert f"is in use by another trainer (pid {rank0.pid} on " in second.stderr, second.stderr[-3000:]

        process.kill()  # kill -9 <torchrun>, and nothing else
        process.wait(timeout=30)
        _, alive = psutil.wait_procs(ranks, timeout=90)
        assert not alive, f"ranks still running 90 s after torchrun died: {[p.pid for p in alive]}"
        stdout, stderr = process.communicate(timeout=60)
    finally:
        for rank in ranks:
            if rank.is_running():
                rank.kill()
    # they took the SIGTERM path: a checkpoint at the step they reached, and the lock is free again
    done = summaries(stdout)
    assert [s["stopped_by"] for s in done] == ["sigterm", "sigterm"], stderr[-4000:]
    from train.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == f"step-{done[0]['steps']:08d}"
    from train.run_lock import RunDirLock

    RunDirLock(tmp_path / "run").release()  # free again: raises RunDirInUseError otherwise
