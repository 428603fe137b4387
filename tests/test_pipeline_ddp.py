"""Uneven shards under a real 2-process torchrun: both ranks take the same steps, nothing hangs."""

from __future__ import annotations

import json
import subprocess

import pytest

from pipeline.loader import open_split
from pipeline.shards import write_shards
from tests.conftest import VENV_BIN, subprocess_env


@pytest.mark.slow
def test_torchrun_on_three_uneven_shards_does_not_hang(digit_slice, tmp_path):
    shards = tmp_path / "shards"
    write_shards(digit_slice, shards, samples_per_shard=400, progress=False)  # 400, 400, 280
    assert open_split(str(shards), "train").counts == [400, 400, 280]
    command = ["timeout", "-k", "10", "240", str(VENV_BIN / "torchrun"), "--standalone",
               "--nproc_per_node=2", "-m", "train", f"--data.shards={shards}",
               f"--run.out_dir={tmp_path}/run", "--data.batch_size=32", "--data.num_workers=2",
               # 1,080 / (32 x 2) = 16 batches per epoch: 40 steps cross two epoch boundaries
               "--run.max_steps=40", "--run.eval_interval_steps=40", "--run.log_interval_steps=10",
               "--run.checkpoint_interval_steps=40", "--optim.warmup_steps=5", "--run.precision=fp32",
               f"--run.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=subprocess_env(PYTHONWARNINGS="ignore,default::UserWarning"))
    assert result.returncode != 124, "torchrun hung (killed by timeout)\n" + result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resampling shards" in result.stderr  # 3 shards < 4 streams is said, not hidden
    summaries = sorted((json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")),
                       key=lambda s: s["rank"])
    assert [s["rank"] for s in summaries] == [0, 1]
    assert summaries[0]["steps"] == summaries[1]["steps"] == 40
    assert summaries[0]["epochs"] == summaries[1]["epochs"]
