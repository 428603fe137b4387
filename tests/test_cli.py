"""Every entry point explains itself and fails with a clear, non-zero error on bad input."""

import subprocess

import pytest

from tests.conftest import REPO, VENV_BIN, subprocess_env


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "python"), *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ["pipeline", "train", "export", "serve"])
def test_help_explains_each_stage(module):
    result = run("-m", module, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower() and len(result.stdout) > 200


def test_vae_console_script_dispatches():
    result = subprocess.run([str(VENV_BIN / "vae"), "pipeline", "--help"], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "shards" in result.stdout
    assert subprocess.run([str(VENV_BIN / "vae"), "nonsense"], capture_output=True).returncode == 2


def test_train_reports_every_config_problem_and_exits_nonzero():
    result = run("-m", "train", "--model.image_size=30", "--data.batch_size=x")
    assert result.returncode == 2
    assert "model.image_size" in result.stderr and "data.batch_size" in result.stderr


def test_train_on_missing_shards_names_the_directory(tmp_path):
    result = run("-m", "train", f"--data.shards={tmp_path}/nowhere", f"--run.out_dir={tmp_path}/run")
    assert result.returncode != 0 and "nowhere" in result.stderr


def test_export_of_missing_checkpoint_is_a_clear_error(tmp_path):
    result = run("-m", "export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "m"))
    assert result.returncode == 1 and "no checkpoint" in result.stderr


def test_serve_without_model_json_is_a_clear_error(tmp_path):
    result = run("-m", "serve", "generate", "--model", str(tmp_path), "--out", str(tmp_path / "s.png"))
    assert result.returncode == 1 and "model.json" in result.stderr
