"""`pip install 'vae-pipeline[serve]'` in a fresh virtualenv serves a real exported model.

The venv is made from scratch (no --system-site-packages: it must prove torch is absent), the
package is built from a copy of this checkout and installed with its [serve] extra at the tested
versions (constraints.txt; pip's cache makes a second run fast). Then, all as real processes run
from outside the checkout: torch, MLflow and scikit-learn cannot be imported, `vae doctor` finds
the installed stages, the serving CLI generates, encodes and scores, optional features name their
extra, and the HTTP service answers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import EXIT_FAILURE
from tests.conftest import REPO, free_port, stop_process_group, wait_until_healthy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SOURCES = ("pyproject.toml", "README.md", "vae_cli.py", "pipeline", "train", "export", "serve")


def clean_env() -> dict[str, str]:
    """This environment without anything that would point Python at the checkout or the dev venv."""
    dropped = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    return {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("MLFLOW_")}


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory) -> Path:
    """bin/ of a fresh venv holding vae-pipeline[serve], built from a copy of the checkout's sources."""
    root = tmp_path_factory.mktemp("install-serve")
    source = root / "src"
    source.mkdir()
    for name in SOURCES:  # what docker/serve.Dockerfile copies: no build/ or egg-info left in the checkout
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--constraint", str(REPO / "constraints.txt"), f"{source}[serve]"],
        cwd=root, env=clean_env(), capture_output=True, text=True, timeout=1000)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shutil.rmtree(source)  # the installed copy in site-packages is all that is left to run
    return venv / "bin"


def run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=300)


def test_the_serve_extra_brings_no_torch_mlflow_or_scikit_learn(serve_venv, tmp_path):
    for module in ("torch", "mlflow", "sklearn", "matplotlib", "pyarrow"):
        result = run(serve_venv, "python", "-c", f"import {module}", cwd=tmp_path)
        assert result.returncode != 0 and f"No module named '{module}'" in result.stderr, module
    listed = run(serve_venv, "python", "-m", "pip", "list", "--format=json", cwd=tmp_path)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names  # never both: they share one folder


def test_doctor_finds_the_installed_stages(serve_venv, tmp_path):
    result = run(serve_venv, "vae", "doctor", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    site = serve_venv.parent / "lib"
    for stage in ("pipeline", "train", "export", "serve"):
        line = next(line for line in result.stdout.splitlines() if line.split()[:1] == [stage])
        assert str(site) in line and line.endswith("ok"), line
    assert "[serve] installed" in result.stdout and "[train] missing torch" in result.stdout
    assert run(serve_venv, "vae", "--version", cwd=tmp_path).stdout.startswith("vae-pipeline ")


def test_serving_cli_runs_from_the_serve_extra(serve_venv, exported_model, small_shards, tmp_path):
    model, shards = str(exported_model), str(small_shards)
    generated = run(serve_venv, "python", "-m", "serve", "generate", "--model", model, "-n", "32", "--seed", "3",
                    "--out", str(tmp_path / "samples"), "--no-progress", "--cpu", cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr
    assert sum(np.load(f).shape[0] for f in sorted((tmp_path / "samples").rglob("*.npy"))) == 32

    encoded = run(serve_venv, "vae", "serve", "encode", "--model", model, "--input", shards,
                  "--out", str(tmp_path / "z.npy"), "--cpu", cwd=tmp_path)
    assert encoded.returncode == 0, encoded.stderr
    latent_dim = json.loads((exported_model / "model.json").read_text())["latent_dim"]
    assert np.load(tmp_path / "z.npy").shape == (120, latent_dim)  # the 120 validation digits

    scored = run(serve_venv, "python", "-m", "serve", "score", "--model", model, "--input", shards,
                 "--out", str(tmp_path / "scores.csv"), "--samples", "2", "--cpu", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert len((tmp_path / "scores.csv").read_text().splitlines()) == 121

    # optional features fail before any work, naming the extra that brings them
    parquet = run(serve_venv, "python", "-m", "serve", "encode", "--model", model, "--input", shards,
                  "--out", str(tmp_path / "z.parquet"), "--cpu", cwd=tmp_path)
    assert parquet.returncode == EXIT_FAILURE and "vae-pipeline[analysis]" in parquet.stderr
    assert "Traceback" not in parquet.stderr and not (tmp_path / "z.parquet").exists()
    registry = run(serve_venv, "python", "-m", "serve", "generate", "--model", "models:/vae@champion",
                   "--out", str(tmp_path / "r.png"), cwd=tmp_path)
    assert registry.returncode == EXIT_FAILURE and "vae-pipeline[registry]" in registry.stderr
    train = run(serve_venv, "vae", "train", "--help", cwd=tmp_path)
    assert train.returncode == EXIT_FAILURE and "vae-pipeline[train]" in train.stderr


def test_http_service_runs_from_the_serve_extra(serve_venv, exported_model, tmp_path):
    import httpx

    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [str(serve_venv / "python"), "-m", "serve", "http", "--model", str(exported_model), "--cpu",
             "--port", str(port), "--threads", "1", "--log-level", "warning"],
            cwd=tmp_path, env=clean_env(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(f"{url}/readyz", process, log_path=log)
        sample = httpx.post(f"{url}/v1/sample", json={"n": 4, "seed": 5}, timeout=30)
        assert sample.status_code == 200, sample.text
        images = sample.json()["images"]
        assert np.asarray(images).shape == tuple(sample.json()["shape"]) and len(images) == 4
        encoded = httpx.post(f"{url}/v1/encode", json={"images": images}, timeout=30)
        assert encoded.status_code == 200, encoded.text
        assert np.isfinite(encoded.json()["mean"]).all() and len(encoded.json()["mean"]) == 4
        bad = httpx.post(f"{url}/v1/sample", json={"n": 0}, timeout=30)
        assert bad.status_code == 422
    finally:
        stop_process_group(process)
    assert process.returncode in (0, -15), log.read_text()[-2000:]
