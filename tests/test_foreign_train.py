"""Training on foreign WebDatasets end to end: real torchrun (2 ranks x 2 workers, gloo) on an indexed
webdataset.TarWriter set (equal batches, exact resume) and on one with no manifest (approximate
epochs, uneven shards, no hang); and over s3:// from a real S3-compatible server (moto_server) on
127.0.0.1, with a shard deleted from the bucket mid-run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.index import index_shards
from tests.conftest import REPO, VENV_BIN, free_port, subprocess_env
from tests.test_foreign import colour_digits, write_foreign

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rgb_digits(digit_slice):
    order = np.random.default_rng(1).permutation(len(digit_slice.labels))
    return colour_digits(digit_slice.images[order]), digit_slice.labels[order].astype(np.int64)


def train_flags(shards: str, out: Path, *extra: str) -> list[str]:
    return [f"--data.shards={shards}", "--model.image_size=28", "--model.channels=3",
            "--model.widths=8,16", "--model.hidden_dim=32", "--model.latent_dim=4",
            "--optim.warmup_steps=2", "--run.precision=fp32", "--run.system_metrics=false",
            "--run.log_interval_steps=1", "--run.eval_interval_steps=1000", "--run.final_iwae_samples=0",
            f"--run.out_dir={out}/run", f"--run.tracking_uri=sqlite:///{out}/mlflow.db", *extra]


def torchrun(*flags: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    command = ["timeout", "-k", "10", "240", str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2",
               "-m", "train", *flags]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                            env=env or subprocess_env())
    assert result.returncode != 124, "torchrun hung (killed by timeout)\n" + result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def summaries(stdout: str) -> list[dict]:
    return sorted((json.loads(line) for line in stdout.splitlines() if line.startswith("{")),
                  key=lambda s: s["rank"])


def metrics(out: Path, key: str) -> dict[int, float]:
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def test_indexed_foreign_set_under_torchrun_equal_batches_and_exact_resume(rgb_digits, tmp_path):
    images, labels = rgb_digits
    shards = tmp_path / "shards"
    write_foreign(shards, images[:432], labels[:432], ext="jpg", label="cls", per_shard=48)  # 8 train + 1 val
    index_shards(str(shards), progress=False)
    # 384 samples / (24 x 2 ranks) = 8 batches per epoch; 12 steps cross an epoch boundary
    flags = ("--data.batch_size=24", "--data.num_workers=2", "--run.max_steps=12",
             "--run.checkpoint_interval_steps=6")
    straight = tmp_path / "straight"
    first = summaries(torchrun(*train_flags(str(shards), straight), *flags, cwd=tmp_path).stdout)
    assert [s["rank"] for s in first] == [0, 1]
    assert first[0]["steps"] == first[1]["steps"] == 12 and first[0]["epochs"] == first[1]["epochs"] == 1.5
    expected = metrics(straight, "train/neg_elbo")
    assert sorted(expected) == list(range(1, 13))
    assert metrics(straight, "data/skipped_samples") == {s: 0.0 for s in range(1, 13)}

    resumed = tmp_path / "resumed"  # a job that starts from the straight run's step-6 checkpoint
    shutil.copytree(straight / "run" / "checkpoints" / "step-00000006",
                    resumed / "run" / "checkpoints" / "step-00000006")
    torchrun(*train_flags(str(shards), resumed), *flags, cwd=tmp_path)
    got = metrics(resumed, "train/neg_elbo")
    assert sorted(got) == list(range(7, 13))
    torch.testing.assert_close(torch.tensor([got[s] for s in range(7, 13)]),
                               torch.tensor([expected[s] for s in range(7, 13)]), rtol=1e-6, atol=1e-5)


def test_no_manifest_uneven_shards_under_torchrun_trains_without_hanging(rgb_digits, tmp_path):
    images, labels = rgb_digits
    shards = tmp_path / "shards"
    # 100, 100, 100, 37 training samples (uneven; 4 shards for 4 streams) and a 60-sample shard to validate
    for number, (start, stop) in enumerate([(0, 100), (100, 200), (200, 300), (300, 337), (337, 397)]):
        write_foreign(shards / str(number), images[start:stop], labels[start:stop], ext="webp", label="json",
                      per_shard=100, suffix=".tar")
        (shards / str(number) / "000000.tar").rename(shards / f"{number:06d}.tar")
    spec = f"{shards}/{{000000..000004}}.tar"
    result = torchrun(*train_flags(spec, tmp_path), "--data.samples_per_epoch=320", "--data.label_key=json:label",
                      "--data.batch_size=32", "--data.num_workers=2", "--run.max_steps=12", cwd=tmp_path)
    done = summaries(result.stdout)
    # 320 / (32 x 2) = 5 batches per approximate epoch: 12 steps are 2.4 epochs on both ranks
    assert [s["steps"] for s in done] == [12, 12] and [s["epochs"] for s in done] == [2.4, 2.4]
    assert "validating on" in result.stderr and "000004.tar (held out" in result.stderr


# ---------------------------------------------------------------- S3 (a real server on 127.0.0.1)

@pytest.fixture()
def s3_server(tmp_path, monkeypatch):
    """moto's standalone S3-compatible server; the endpoint and keys in the environment, as in production."""
    port = free_port()
    log = open(tmp_path / "moto.log", "w")
    server = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    settings = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start: {(tmp_path / 'moto.log').read_text()[-2000:]}")
                time.sleep(0.2)
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        yield settings
    finally:
        server.terminate()
        server.wait(10)
        log.close()


def upload(folder: Path, bucket: str, prefix: str):
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return client


def test_s3_reads_the_same_bytes_and_samples_as_local_disk(rgb_digits, tmp_path, s3_server):
    from pipeline.data import open_train_val
    from pipeline.loader import iter_eval_batches
    from pipeline.urls import open_url

    images, labels = rgb_digits
    local = tmp_path / "local"
    write_foreign(local, images[:160], labels[:160], ext="jpg", label="cls", per_shard=40, suffix=".tar.gz")
    upload(local, "faces", "v1")
    with open_url("s3://faces/v1/000001.tar.gz") as stream:
        assert stream.read() == (local / "000001.tar.gz").read_bytes()
    manifest, where = index_shards("s3://faces/v1/", progress=False, workers=2)  # a prefix is listed
    assert where == "s3://faces/v1/manifest.json" and manifest.num_samples("train") == 120
    index_shards(str(local), progress=False)
    for location in (str(local), "s3://faces/v1/{000000..000002}.tar.gz"):
        train, _ = open_train_val(location, image_shape=(28, 28, 3))
        assert train.counts == [40, 40, 40]
        batches = list(iter_eval_batches(train, batch_size=40, rank=0, world_size=1))
        if location.startswith("s3"):
            for (x1, y1, _), (x2, y2, _) in zip(batches, local_batches):
                assert x1.equal(x2) and y1.equal(y2)
        local_batches = batches


def test_training_over_s3_survives_a_shard_deleted_mid_run(rgb_digits, tmp_path, s3_server):
    images, labels = rgb_digits
    local = tmp_path / "local"
    write_foreign(local, images[:300], labels[:300], ext="jpg", label="cls", per_shard=50)  # 5 train + 1 val
    client = upload(local, "faces", "v2")
    assert subprocess.run([sys.executable, "-m", "pipeline", "index", "s3://faces/v2/{000000..000005}.tar",
                           "--workers", "2", "--quiet"], env=subprocess_env(**s3_server), cwd=REPO,
                          capture_output=True, text=True, timeout=120).returncode == 0
    out = tmp_path / "run"
    # 250 samples / 25 = 10 batches an epoch; 40 steps = 4 epochs, each re-reading every shard.
    # The vanished shard costs its 50 samples once in each of the 2 worker processes: within 200.
    command = [sys.executable, "-m", "train", *train_flags("s3://faces/v2", tmp_path), "--data.batch_size=25",
               "--data.num_workers=2", "--run.max_steps=40", "--run.checkpoint_interval_steps=1000",
               "--data.max_bad_samples=200"]
    env = subprocess_env(**s3_server, PYTHONWARNINGS="ignore,default::UserWarning")  # DataWarnings shown
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        metrics_file = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 8):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.2)
        client.delete_object(Bucket="faces", Key="v2/000003.tar")  # gone from the bucket mid-run
        stdout, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert json.loads(stdout.splitlines()[-1])["steps"] == 40
    bad = metrics(tmp_path, "data/bad_shards")
    assert bad[40] >= 1 and metrics(tmp_path, "data/skipped_samples")[40] >= 50  # counted, named, not fatal
    assert "000003.tar" in stderr and "cannot open" in stderr


def test_a_model_trained_on_a_foreign_set_exports_with_its_images(rgb_digits, tmp_path):
    from export.__main__ import main as export_main
    from train.config import parse_args
    from train.distributed import DistContext
    from train.trainer import run_training

    images, labels = rgb_digits
    shards = tmp_path / "shards"
    write_foreign(shards, images[:200], labels[:200], ext="png", label="txt", per_shard=50)
    index_shards(str(shards), progress=False, label_key="txt")  # class names from the txt members
    config = parse_args(train_flags(str(shards), tmp_path, "--data.batch_size=50", "--data.num_workers=0",
                                    "--run.max_steps=6", "--run.checkpoint_interval_steps=6"))
    run_training(config, DistContext(0, 1, 0, torch.device("cpu"), "gloo"))
    # export verifies ONNX against PyTorch on validation images read and fitted as training read them
    assert export_main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "model")]) == 0
    assert json.loads((tmp_path / "model" / "model.json").read_text())["image_shape"] == [3, 28, 28]
