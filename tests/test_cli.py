"""Every entry point explains itself, lists its subcommands, and exits with the same codes:
0 success, 1 runtime failure, 2 usage error, 143 preempted (tests/test_train_checkpoint.py)."""

import importlib
import subprocess
import sys

import pytest

from pipeline import __version__
from pipeline.cli import EXIT_FAILURE, EXIT_USAGE, MissingExtraError, require
from tests.conftest import REPO, VENV_BIN, subprocess_env


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "python"), *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ["pipeline", "train", "export", "serve"])
def test_help_explains_each_stage(module):
    result = run("-m", module, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower() and len(result.stdout) > 200


def vae(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The `vae` console script of this venv (PYTHONPATH puts this checkout's vae_cli first)."""
    return subprocess.run([str(VENV_BIN / "vae"), *args], cwd=REPO, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=120)


def test_vae_console_script_dispatches():
    result = vae("pipeline", "--help")
    assert result.returncode == 0 and "shards" in result.stdout
    assert vae("nonsense").returncode == EXIT_USAGE
    assert vae().returncode == EXIT_USAGE


def test_vae_version_is_the_package_version():
    result = vae("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"vae-pipeline {__version__}"


def test_vae_help_lists_the_stages_and_the_exit_codes():
    result = vae("--help")
    assert result.returncode == 0
    for word in ("pipeline", "train", "export", "serve", "doctor", "2 usage error", "143 preempted"):
        assert word in result.stdout, word


SUBCOMMANDS = {
    "pipeline": ("shards", "verify", "inspect", "index"),
    "export": ("onnx", "tensorrt", "triton", "register", "resolve"),
    "serve": ("generate", "reconstruct", "encode", "score", "interpolate", "traverse", "http"),
}


@pytest.mark.parametrize("stage", sorted(SUBCOMMANDS))
def test_each_stage_help_lists_its_subcommands(stage):
    result = vae(stage, "--help")
    assert result.returncode == 0, result.stderr
    for command in SUBCOMMANDS[stage]:
        assert f"\n    {command} " in result.stdout, f"vae {stage} --help does not list {command}:\n{result.stdout}"
        with pytest.raises(SystemExit) as done:  # each subcommand's own help, in-process (fast)
            importlib.import_module(f"{stage}.__main__").build_parser().parse_args([command, "--help"])
        assert done.value.code == 0, command


def test_export_without_a_command_is_the_onnx_command(tmp_path, capsys):
    """`python -m export --checkpoint ...` (the documented form) still works beside the subcommands."""
    from export.__main__ import main

    argv = ["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")]
    assert main(argv) == EXIT_FAILURE
    bare = capsys.readouterr().err
    assert main(["onnx", *argv]) == EXIT_FAILURE
    assert "no checkpoint" in bare and bare == capsys.readouterr().err


USAGE_ERRORS = {
    "pipeline": ["shards", "--source", "digits"],  # --out missing
    "train": ["--no.such_field=1"],
    "export": ["--checkpoint", "x"],  # --out missing
    "serve": ["generate", "--model"],  # no value
}


@pytest.mark.parametrize("stage", sorted(USAGE_ERRORS))
def test_a_wrong_command_line_exits_2_in_every_stage(stage):
    result = vae(stage, *USAGE_ERRORS[stage])
    assert result.returncode == EXIT_USAGE, (result.returncode, result.stderr)
    assert vae(stage, "--no-such-flag").returncode == EXIT_USAGE


def runtime_failures(tmp) -> dict[str, tuple[list[str], str]]:
    """Per stage: a command line that is well formed but fails while running, and what the error names."""
    return {
        "pipeline": (["shards", "--source", f"{tmp}/nowhere", "--out", f"{tmp}/out"], "nowhere"),
        "train": ([f"--data.shards={tmp}/nowhere", f"--run.out_dir={tmp}/run"], "nowhere"),
        "export": (["--checkpoint", str(tmp), "--out", f"{tmp}/m"], "no checkpoint"),
        "serve": (["generate", "--model", str(tmp), "--out", f"{tmp}/s.png"], "model.json"),
    }


@pytest.mark.parametrize("stage", ["pipeline", "train", "export", "serve"])
def test_a_failure_while_running_exits_1_in_every_stage(stage, tmp_path):
    argv, named = runtime_failures(tmp_path)[stage]
    result = vae(stage, *argv)
    assert result.returncode == EXIT_FAILURE, (result.returncode, result.stderr)
    # "error: ..." (argparse-style) or a log line "... ERROR train: ..."
    assert "error" in result.stderr.lower() and named in result.stderr and "Traceback" not in result.stderr


def test_doctor_shows_where_each_stage_comes_from():
    result = vae("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in ("pipeline", "train", "export", "serve"):
        assert f"{stage:<9} {REPO / stage}  ok" in result.stdout


def test_doctor_and_dispatch_refuse_a_shadowing_package(tmp_path):
    """A same-named package earlier on sys.path (here PYTHONPATH; also the current directory) wins
    `import train`: doctor names it and `vae train` refuses to run it."""
    impostor = tmp_path / "train"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("")
    (impostor / "__main__.py").write_text("print('the wrong train')\n")
    path = f"{tmp_path}:{REPO}"
    doctor = vae("doctor", PYTHONPATH=path)
    assert doctor.returncode == EXIT_FAILURE and f"CLASH: `import train` loads {impostor}" in doctor.stdout
    run_it = vae("train", "--help", PYTHONPATH=path)
    assert run_it.returncode == EXIT_FAILURE and "the wrong train" not in run_it.stdout
    assert str(impostor) in run_it.stderr


def test_doctor_names_another_distribution_that_writes_the_same_folder(tmp_path):
    """Two distributions with a top-level `serve` in one site-packages overwrite each other's files."""
    info = tmp_path / "serve_other-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: serve-other\nVersion: 1.0\n")
    (info / "RECORD").write_text("serve/__init__.py,,\nserve_other-1.0.dist-info/RECORD,,\n")
    doctor = vae("doctor", PYTHONPATH=f"{REPO}:{tmp_path}")
    assert doctor.returncode == EXIT_FAILURE
    assert "CLASH: serve-other also install(s) files" in doctor.stdout


def test_a_missing_extra_is_named_with_its_install_command(tmp_path):
    with pytest.raises(MissingExtraError, match=r"the feature needs no_such_module_x.*vae-pipeline\[analysis\]"):
        require("no_such_module_x.sub", "analysis", "the feature")
    # a module that is there but whose own import is broken is that error, not a missing extra
    (tmp_path / "broken_dep_x.py").write_text("import no_such_module_y\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ModuleNotFoundError) as error:
            require("broken_dep_x", "analysis", "the feature")
        assert not isinstance(error.value, MissingExtraError) and error.value.name == "no_such_module_y"
    finally:
        sys.path.remove(str(tmp_path))


def test_train_reports_every_config_problem_and_exits_nonzero():
    result = run("-m", "train", "--model.image_size=30", "--data.batch_size=x")
    assert result.returncode == EXIT_USAGE
    assert "model.image_size" in result.stderr and "data.batch_size" in result.stderr
