"""MLflow registry round trip against a real `mlflow server` process on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, VENV_BIN, free_port, subprocess_env, wait_until_healthy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(trained_run, tmp_path_factory):
    """A tracking server over a copy of the training run's store, so the training run exists there."""
    work = tmp_path_factory.mktemp("registry-server")
    shutil.copyfile(trained_run.parent / "mlflow.db", work / "mlflow.db")
    port = free_port()
    log = open(work / "server.log", "w")
    process = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{work}/mlflow.db", "--artifacts-destination", str(work / "artifacts")],
        cwd=work, env=subprocess_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), stdout=log,
        stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(f"{url}/health", process, 120, work / "server.log")
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.close()


def _same_files(left, right) -> None:
    metadata = json.loads((left / "model.json").read_text())
    names = ["model.json", metadata["encoder"]["file"], metadata["decoder"]["file"],
             *(v[p]["file"] for v in metadata["variants"].values() for p in ("encoder", "decoder"))]
    for name in names:
        assert (right / name).read_bytes() == (left / name).read_bytes(), name


def test_registry_round_trip(exported_model_fp16, mlflow_server, tmp_path, capsys):
    import mlflow
    from mlflow import MlflowClient

    from export.__main__ import main
    from export.model_uri import resolve_model_dir, tracking_context
    from export.registry import register_export

    metadata = json.loads((exported_model_fp16 / "model.json").read_text())
    run_id = metadata["mlflow_run_id"]
    first = register_export(exported_model_fp16, "vae-digits", alias="champion", tracking_uri=mlflow_server)
    assert main(["register", "--model", str(exported_model_fp16), "--name", "vae-digits",
                 "--tracking-uri", mlflow_server]) == 0
    assert "models:/vae-digits/2" in capsys.readouterr().out

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    versions = sorted(client.search_model_versions("name='vae-digits'"), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2"] and first.version == "1"
    assert all(v.run_id == run_id for v in versions)
    assert versions[0].tags["config_sha256"] == metadata["config_sha256"]
    assert json.loads(versions[0].tags["latent_dim"]) == 16
    assert client.get_model_version_by_alias("vae-digits", "champion").version == "1"
    # the training run holds the export as artifacts
    logged = {a.path for a in client.list_artifacts(run_id, "export")}
    assert {"export/model.json", "export/encoder.onnx", "export/decoder.onnx", "export/decoder.fp16.onnx"} <= logged

    by_version = resolve_model_dir("models:/vae-digits/2", dst=tmp_path / "v2", tracking_uri=mlflow_server)
    by_alias = resolve_model_dir("models:/vae-digits@champion", dst=tmp_path / "champion",
                                 tracking_uri=mlflow_server)
    for resolved in (by_version, by_alias):
        _same_files(exported_model_fp16, resolved)
    assert main(["resolve", "models:/vae-digits@champion", "--tracking-uri", mlflow_server,
                 "--dst", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "extra_files" / "model.json").is_file()

    # the ONNX flavour: signature, input example, and a pyfunc that generates like decoder.onnx
    import onnxruntime as ort

    with tracking_context(mlflow_server):
        pyfunc = mlflow.pyfunc.load_model("models:/vae-digits@champion")
    inputs = pyfunc.metadata.get_input_schema().inputs
    assert [(i.name, i.shape) for i in inputs] == [("z", (-1, 16))]
    assert [o.name for o in pyfunc.metadata.get_output_schema().inputs] == ["params", "image"]
    assert (tmp_path / "v2" / "input_example.json").is_file()
    z = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    predicted = pyfunc.predict({"z": z})
    session = ort.InferenceSession(str(by_version / "decoder.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(predicted["image"], session.run(None, {"z": z})[1], atol=1e-6)


def test_resolver_errors_name_the_problem(tmp_path, mlflow_server):
    from export.model_uri import resolve_model_dir

    with pytest.raises(FileNotFoundError, match="no model.json"):
        resolve_model_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="models:/no-such-model/1"):
        resolve_model_dir("models:/no-such-model/1", dst=tmp_path / "x", tracking_uri=mlflow_server)


def test_register_without_the_training_run_is_a_clear_error(exported_model, mlflow_server, capsys):
    from export.__main__ import main

    assert main(["register", "--model", str(exported_model), "--name", "vae-x", "--tracking-uri",
                 f"sqlite:///{exported_model.parent}/empty.db"]) == 1
    assert "training run" in capsys.readouterr().err


def test_registry_module_imports_no_torch():
    code = "import sys, export.registry; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
