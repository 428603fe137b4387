"""ONNX export: parity at every batch size and precision, metadata, determinism, loud failures."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

BATCH_SIZES = (1, 7, 1024)
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "fp32-cpu-optimized": 1e-4}


def _session(model):
    """A CPU session on a path or a serialized model."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def reference(trained_run, small_shards):
    """The checkpoint in PyTorch and every real validation image, float32 (N, C, H, W) in [0, 1]."""
    from pipeline.images import nhwc_to_nchw, to_unit_float
    from pipeline.loader import open_split
    from pipeline.shards import read_shard_images
    from train import load_checkpoint, load_model
    from train.config import config_from_dict

    model, state = load_model(trained_run), load_checkpoint(trained_run)
    config = config_from_dict(state["config"])
    val = open_split(str(small_shards), "val")
    images = np.concatenate([read_shard_images(url, val.manifest.image_shape)[0] for url in val.urls])
    return model, config, state, nhwc_to_nchw(to_unit_float(images)).astype(np.float32)


def _files(model_dir, precision):
    metadata = json.loads((model_dir / "model.json").read_text())
    entry = metadata if precision == "fp32" else metadata["variants"][precision]
    return model_dir / entry["encoder"]["file"], model_dir / entry["decoder"]["file"]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "fp32-cpu-optimized"])
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_onnxruntime_matches_pytorch(exported_model_fp16, reference, precision, batch):
    model, config, _, images = reference
    encoder_path, decoder_path = _files(exported_model_fp16, precision)
    encoder, decoder = _session(encoder_path), _session(decoder_path)
    rng = np.random.default_rng(batch)
    x = images[rng.integers(0, len(images), size=batch)]
    z = rng.standard_normal((batch, config.model.latent_dim)).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(x))
        expected_image = model.image_mean(model.decode(torch.from_numpy(z))).numpy()
    mean, logvar = encoder.run(None, {"x": x})
    _, image = decoder.run(None, {"z": z})
    assert mean.shape == (batch, config.model.latent_dim) and image.shape == (batch, *images.shape[1:])
    assert mean.dtype == image.dtype == np.float32  # fp16 files keep float32 inputs and outputs
    for value in (mean, logvar, image):
        assert np.isfinite(value).all()
    assert np.abs(image - expected_image).max() <= TOLERANCE[precision]
    for actual, expected in ((mean, posterior.mean.numpy()), (logvar, posterior.logvar.numpy())):
        scale = max(1.0, float(np.abs(expected).max()))
        assert np.abs(actual - expected).max() <= TOLERANCE[precision] * scale


def test_fp16_files_really_compute_in_fp16(exported_model_fp16):
    for path in _files(exported_model_fp16, "fp16"):
        graph = onnx.load(str(path)).graph
        kinds = {init.data_type for init in graph.initializer if init.dims and np.prod(init.dims) > 16}
        assert kinds == {onnx.TensorProto.FLOAT16}, path.name
        assert path.stat().st_size < 0.6 * (path.parent / path.name.replace(".fp16", "")).stat().st_size


def test_metadata_round_trip(exported_model_fp16, reference):
    from export.metadata import ONNX_METADATA_KEYS, read_onnx_metadata
    from train.config import config_to_dict

    _, config, state, _ = reference
    metadata = json.loads((exported_model_fp16 / "model.json").read_text())
    expected_hash = hashlib.sha256(json.dumps(state["config"], sort_keys=True).encode()).hexdigest()
    assert state["config"]["model"] == config_to_dict(config)["model"]
    assert metadata["latent_dim"] == config.model.latent_dim
    assert metadata["image_shape"] == [config.model.channels, config.model.image_size, config.model.image_size]
    assert metadata["channels"] == config.model.channels
    assert metadata["likelihood"] == config.model.likelihood and isinstance(metadata["likelihood_params"], dict)
    assert metadata["pixel_scaling"] == "uint8 / 255 -> [0, 1]"
    assert metadata["mlflow_run_id"] == state["mlflow_run_id"] != ""
    assert metadata["training_step"] == state["step"] == 300
    assert metadata["config_sha256"] == expected_hash
    assert metadata["weights"] == ("ema" if state.get("ema") else "raw")
    assert metadata["tool_version"].startswith("vae-pipeline ")
    assert metadata["encoder"] == {"file": "encoder.onnx", "inputs": ["x"], "outputs": ["mean", "logvar"]}
    assert metadata["decoder"] == {"file": "decoder.onnx", "inputs": ["z"], "outputs": ["params", "image"]}
    verification = metadata["verification"]
    for precision in ("fp32", "fp16", "fp32-cpu-optimized"):
        assert [row["batch"] for row in verification[precision]["rows"]] == list(BATCH_SIZES)
        assert verification[precision]["worst"] <= TOLERANCE[precision]
        for path in _files(exported_model_fp16, precision):
            props = read_onnx_metadata(path)
            assert props["precision"] == precision.split("-")[0]
            assert {k: props[k] for k in ONNX_METADATA_KEYS} == {k: metadata[k] for k in ONNX_METADATA_KEYS}
            # onnxruntime reads the same metadata_props (what a consumer without onnx sees)
            custom = _session(path).get_modelmeta().custom_metadata_map
            assert json.loads(custom["config_sha256"]) == expected_hash
            assert json.loads(custom["latent_dim"]) == config.model.latent_dim


def test_encoder_is_deterministic(exported_model, reference):
    _, _, _, images = reference
    graph = onnx.load(str(exported_model / "encoder.onnx")).graph
    assert not {n.op_type for n in graph.node} & {"RandomNormal", "RandomNormalLike", "RandomUniform",
                                                  "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
    x = images[:64]
    first, second = _session(exported_model / "encoder.onnx"), _session(exported_model / "encoder.onnx")
    run_a, run_b, run_c = first.run(None, {"x": x}), second.run(None, {"x": x}), first.run(None, {"x": x})
    for a, b, c in zip(run_a, run_b, run_c):
        assert np.array_equal(a, b) and np.array_equal(a, c)


def test_checkpoint_that_does_not_match_its_config_is_a_clear_error(trained_run, small_shards, tmp_path, capsys):
    from export.__main__ import main
    from train.checkpoint import resolve_checkpoint

    state = torch.load(resolve_checkpoint(trained_run), map_location="cpu", weights_only=True)
    state["config"]["model"]["latent_dim"] = 8  # the weights were trained with 16
    torch.save(state, tmp_path / "state.pt")
    code = main(["--checkpoint", str(tmp_path / "state.pt"), "--out", str(tmp_path / "model"),
                 "--shards", str(small_shards)])
    error = capsys.readouterr().err
    assert code == 1
    assert "does not match" in error and "size mismatch" in error, error
    assert not (tmp_path / "model").exists()


def test_a_model_that_fails_verification_is_not_written(trained_run, small_shards, tmp_path, capsys):
    from export.__main__ import main

    out = tmp_path / "exports" / "model"
    code = main(["--checkpoint", str(trained_run), "--out", str(out), "--shards", str(small_shards),
                 "--tolerance", "1e-12"])
    error = capsys.readouterr().err
    assert code == 1
    assert "fp32 ONNX does not match PyTorch" in error and "nothing written" in error, error
    assert list((tmp_path / "exports").iterdir()) == []  # no model, no staging directory left behind


def test_fp16_keeps_overflowing_layers_in_fp32(exported_model):
    """A decoder whose hidden features exceed fp16's range: converted naively it gives NaN/Inf or
    wrong images; with the guard the overflowing layers stay fp32 and the images match."""
    from export.fp16 import FP16_MAX, convert_to_fp16

    graph = onnx.load(str(exported_model / "decoder.onnx"))
    scales = {"model.decoder_dense.2.weight": 1e5, "model.decoder_dense.2.bias": 1e5,
              "model.decoder_conv.0.weight": 1e-5}
    for init in graph.graph.initializer:
        if init.name in scales:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * scales.pop(init.name), init.name))
    assert scales == {}, f"initializers not found: {scales}"
    z = np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32)
    feeds = [{"z": z}]
    probe = onnx.ModelProto()
    probe.CopyFrom(graph)
    _, expected = _session(probe.SerializeToString()).run(None, {"z": z})
    assert np.isfinite(expected).all()

    naive, none_kept = convert_to_fp16(graph, feeds, guard_overflow=False)
    _, naive_image = _session(naive.SerializeToString()).run(None, {"z": z})
    assert none_kept == []
    assert not np.isfinite(naive_image).all() or np.abs(naive_image - expected).max() > 1e-2

    guarded, kept = convert_to_fp16(graph, feeds)
    _, image = _session(guarded.SerializeToString()).run(None, {"z": z})
    assert np.isfinite(image).all() and np.abs(image - expected).max() <= 1e-2
    layers = {b.layer for b in kept}
    assert "model.decoder_dense.2" in layers and all(b.max_abs > FP16_MAX / 4 for b in kept)
    assert "model.decoder_conv.2" not in layers  # layers in range still run in fp16


def test_export_from_an_mlflow_run_id(trained_run, small_shards, tmp_path, capsys):
    from export.__main__ import main
    from train.checkpoint import load_checkpoint

    run_id = load_checkpoint(trained_run)["mlflow_run_id"]
    uri = f"sqlite:///{trained_run.parent}/mlflow.db"
    code = main(["--run", run_id, "--tracking-uri", uri, "--out", str(tmp_path / "model"),
                 "--shards", str(small_shards)])
    assert code == 0, capsys.readouterr().err
    metadata = json.loads((tmp_path / "model" / "model.json").read_text())
    assert metadata["mlflow_run_id"] == run_id and metadata["training_step"] == 300
    assert main(["--run", "0" * 32, "--tracking-uri", uri, "--out", str(tmp_path / "other")]) == 1
    assert "0" * 32 in capsys.readouterr().err


@pytest.mark.parametrize("likelihood, channels, constants", [
    ("gaussian", 1, {"sigma": 0.2}), ("gaussian_learned", 2, {}),
    ("discretized_logistic", 2, {"bin_width": 1 / 255})])
def test_every_likelihood_exports_its_layout_and_constants(likelihood, channels, constants, reference, tmp_path):
    """model.json names the likelihood and its constants; `params` has the layout train defines."""
    from export.metadata import read_onnx_metadata
    from export.onnx_export import export_verified
    from train.config import build_config
    from train.model import build_model

    _, _, _, images = reference
    config = build_config({"model": {"likelihood": likelihood, "gaussian_sigma": 0.2}})
    torch.manual_seed(0)
    model = build_model(config.model).eval()  # untrained: layout and constants, not quality
    result = export_verified(model, config, {"step": 0}, tmp_path / "model", images, batch_sizes=(1, 7))
    assert result.reports["fp32"].worst <= TOLERANCE["fp32"]
    metadata = json.loads((tmp_path / "model" / "model.json").read_text())
    assert metadata["likelihood"] == likelihood and metadata["likelihood_params"] == constants
    assert constants == model.likelihood.constants()
    assert read_onnx_metadata(tmp_path / "model" / "decoder.onnx")["likelihood_params"] == constants
    params, image = _session(tmp_path / "model" / "decoder.onnx").run(None, {"z": np.zeros((3, 16), np.float32)})
    assert params.shape == (3, channels, 28, 28) and image.shape == (3, 1, 28, 28)
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_a_checkpoint_never_chooses_a_command_to_run(trained_run, small_shards, tmp_path, capsys):
    """The checkpoint's stored data.shards is someone else's text: a pipe: command in it is refused."""
    import subprocess

    from export.__main__ import checkpoint_shards, main
    from tests.conftest import REPO, VENV_BIN, subprocess_env
    from train.checkpoint import resolve_checkpoint

    marker = tmp_path / "MARKER"
    state = torch.load(resolve_checkpoint(trained_run), map_location="cpu", weights_only=True)
    state["config"]["data"]["shards"] = f"pipe:touch {marker}; cat {small_shards}/val-000000.tar"
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    torch.save(state, checkpoint / "state.pt")
    result = subprocess.run([str(VENV_BIN / "python"), "-m", "export", "--checkpoint", str(checkpoint),
                             "--out", str(tmp_path / "model")], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert not marker.exists(), "the checkpoint's command ran"
    assert result.returncode == 1, result.stderr[-2000:]
    assert "pipe:touch" in result.stderr and "pass --shards" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "model").exists()

    # the user names the data: exported, and the output says where the images came from
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "model"),
                 "--shards", str(small_shards)]) == 0
    assert f"validation images from {small_shards} (--shards)" in capsys.readouterr().out
    assert not marker.exists()

    # a pipe: command in the checkpoint's data.val_shards (read beside data.shards) is refused the same way
    state["config"]["data"]["shards"] = str(small_shards)
    state["config"]["data"]["val_shards"] = f"pipe:touch {marker}; cat {small_shards}/val-000000.tar"
    torch.save(state, checkpoint / "state.pt")
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "model2")]) == 1
    assert not marker.exists() and not (tmp_path / "model2").exists()

    # what a checkpoint may name: places that are read (object stores go through fsspec, no program);
    # never a program (pipe:, or webdataset gopen's sftp/scp/ais... which start one)
    for location in (str(small_shards), f"{small_shards}/val-{{000000..000001}}.tar",
                     "https://example.com/shards", "file:///data/shards", "s3://bucket/shards",
                     "gs://bucket/shards/val-000000.tar"):
        assert checkpoint_shards(location) == location
    for location in (f"{small_shards}/a.tar::pipe:touch {marker}", f"{{pipe:touch {marker},a}}.tar",
                     "sftp://host/shards", "scp://host/shards/val-000000.tar", ""):
        with pytest.raises(ValueError, match="pass --shards"):
            checkpoint_shards(location)
