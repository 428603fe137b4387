"""scripts/gpu-check.sh on a machine without a GPU: it runs, says the GPU parts are skipped, and writes its JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env

GPU_PRESENT = shutil.which("nvidia-smi") is not None and subprocess.run(
    ["nvidia-smi", "-L"], capture_output=True).returncode == 0
pytestmark = pytest.mark.skipif(GPU_PRESENT, reason="a GPU is present: the script would run its full sizes")


def test_gpu_check_without_a_gpu_skips_gpu_parts_and_writes_json(exported_model, tmp_path):
    out = tmp_path / "results"
    result = subprocess.run(
        [str(REPO / "scripts" / "gpu-check.sh")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=subprocess_env(OUT=str(out), MODEL=str(exported_model), STEPS="generate", PYTHON=sys.executable))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no NVIDIA GPU here: GPU parts are skipped" in result.stdout
    assert "generate: ok" in result.stdout
    generate = json.loads((out / "generate.json").read_text())
    assert generate["provider"] == "CPUExecutionProvider" and generate["num_samples"] == 2000
    assert (out / "gpu-check.log").read_text().count("== generate") == 1
