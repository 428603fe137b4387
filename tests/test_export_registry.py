"""MLflow registry round trip against a real `mlflow server` process on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import (REPO, VENV_BIN, free_port, stop_process_group, subprocess_env,
                            wait_until_healthy)

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


@pytest.fixture(scope="module")
def registered(exported_model_fp16, mlflow_server):
    """The export registered twice: by `register_export` (alias champion), then by the CLI; (first, CLI output)."""
    from export.__main__ import main
    from export.registry import register_export

    first = register_export(exported_model_fp16, "vae-digits", alias="champion", tracking_uri=mlflow_server)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["register", "--model", str(exported_model_fp16), "--name", "vae-digits",
                     "--tracking-uri", mlflow_server]) == 0
    return first, printed.getvalue()


def test_registry_round_trip(exported_model_fp16, mlflow_server, registered, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from export.__main__ import main
    from export.model_uri import resolve_model_dir, tracking_context

    metadata = json.loads((exported_model_fp16 / "model.json").read_text())
    run_id = metadata["mlflow_run_id"]
    first, printed = registered
    assert "models:/vae-digits/2 and models:/vae-digits-pyfunc/2" in printed

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    versions = sorted(client.search_model_versions("name='vae-digits'"), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2"] and first.onnx.version == "1"
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


def _libraries_mapped(pid: int) -> set[str]:
    """Shared objects mapped into the process `pid` and its descendants (what it has imported natively)."""
    import psutil

    parent = psutil.Process(pid)
    found = set()
    for process in [parent, *parent.children(recursive=True)]:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            found.update(line.split()[-1] for line in Path(f"/proc/{process.pid}/maps").read_text().splitlines()
                         if line.rstrip().endswith(".so") or ".so." in line)
    return found


def test_pyfunc_encodes_samples_and_scores_in_process_and_over_invocations(
        exported_model_fp16, mlflow_server, registered, tmp_path):
    """models:/vae-digits-pyfunc@champion: load_model in this process, and `mlflow models serve` as a real
    process answering /invocations without torch; both agree with the runtime on the export directory."""
    import httpx
    import mlflow
    import pandas as pd

    from export.model_uri import resolve_model_dir, tracking_context
    from serve import ops
    from serve.runtime import RuntimeOptions, VAERuntime

    uri = "models:/vae-digits-pyfunc@champion"
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:  # started first: it loads while this process checks the pyfunc
        server = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
             "-p", str(port)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # `mlflow models serve` runs `uvicorn` from PATH: the venv's, as an activated venv would
            env=subprocess_env(MLFLOW_TRACKING_URI=mlflow_server, PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"))
    try:
        cpu = RuntimeOptions(providers=("CPUExecutionProvider",))
        direct = ops.Direct(VAERuntime(exported_model_fp16, options=cpu))
        seeds = [3, 5, 7]
        expected_images = direct.run(ops.decode, np.concatenate([ops.prior_latents(direct.card, 1, s) for s in seeds]))
        expected = direct.run(ops.score, expected_images, num_samples=2, seed=1, maps=True)
        expected_mean = direct.run(ops.encode, expected_images).mean

        # the registered version carries the export itself, so `serve --model` takes the pyfunc's URI too
        assert (resolve_model_dir(uri, dst=tmp_path / "dl", tracking_uri=mlflow_server) / "model.json").is_file()
        path_before = list(sys.path)
        try:
            with tracking_context(mlflow_server):
                model = mlflow.pyfunc.load_model(uri, model_config={"providers": "cpu"})
        finally:
            sys.path[:] = path_before  # the model's code/ folder would otherwise shadow serve/ for later tests
        assert model.metadata.get_params_schema().params[0].name == "op"
        images = model.predict(pd.DataFrame({"seed": seeds}), params={"op": "sample"})["image"]
        np.testing.assert_allclose(images, expected_images, atol=1e-6)
        rows = pd.DataFrame({"x": list(images)})
        np.testing.assert_allclose(model.predict(rows, params={"op": "encode"})["mean"], expected_mean, atol=1e-5)
        with_maps = model.predict(rows, params={"op": "score", "num_samples": 2, "seed": 1, "maps": True})
        np.testing.assert_allclose(with_maps["score"], expected.scores, rtol=1e-5)
        assert set(with_maps["kind"]) == {expected.kind} == {"excess_mse"}  # the card's default, as the CLI's
        np.testing.assert_allclose(with_maps["maps"], expected.maps, rtol=1e-5)
        with pytest.raises(mlflow.exceptions.MlflowException, match="op 'score': needs a column 'x'"):
            model.predict(pd.DataFrame({"seed": seeds}), params={"op": "score"})
        with pytest.raises(mlflow.exceptions.MlflowException, match="params.op must be one of"):
            model.predict(pd.DataFrame({"seed": seeds}), params={"op": "train"})

        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(f"{url}/ping", server, 120, log_path)

        def invoke(body: dict) -> httpx.Response:
            return httpx.post(f"{url}/invocations", json=body, timeout=60)

        sampled = invoke({"dataframe_records": [{"seed": s} for s in seeds], "params": {"op": "sample"}})
        assert sampled.status_code == 200, sampled.text
        np.testing.assert_allclose(np.asarray(sampled.json()["predictions"]["image"]), expected_images, atol=1e-6)
        records = [{"x": image.tolist()} for image in expected_images]
        scored = invoke({"dataframe_records": records, "params": {"op": "score", "num_samples": 2, "seed": 1}})
        assert scored.status_code == 200, scored.text
        np.testing.assert_allclose(scored.json()["predictions"]["score"], expected.scores, rtol=1e-5)
        assert scored.json()["predictions"]["kind"] == ["excess_mse"] * len(expected.scores)
        encoded = invoke({"dataframe_records": records, "params": {"op": "encode"}})
        np.testing.assert_allclose(np.asarray(encoded.json()["predictions"]["mean"]), expected_mean, atol=1e-5)
        refused = invoke({"dataframe_records": [{"seed": 1}], "params": {"op": "score"}})
        assert refused.status_code == 400 and "needs a column 'x'" in refused.json()["message"]

        # no torch in the serving processes; onnxruntime shows the check sees the process that loaded the model
        mapped = _libraries_mapped(server.pid)
        assert any("onnxruntime" in path for path in mapped), sorted(mapped)[:20]
        assert not [path for path in mapped if "libtorch" in path or "/torch/" in path]
    finally:
        stop_process_group(server)


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
