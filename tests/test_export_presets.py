"""Every ResNet preset through checkpoint, ONNX export (fp32 and fp16), Triton configs and serve's
runtime, at tiny widths so each takes seconds: the same parity checks as for the original net."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from train.config import build_config, config_to_dict

pytestmark = pytest.mark.slow

# Tiny widths and one block per stage: the preset's kinds of layers (and attention where it has
# it), in seconds rather than minutes of exporting.
TINY = {"widths": [4, 8], "hidden_dim": 16, "latent_dim": 3, "blocks_per_stage": 1}
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
# preset, image size, channels, likelihood: every preset; with the trained 1-channel Bernoulli
# resnet-s below, every likelihood and both channel counts
CASES = [("resnet-s", 32, 3, "gaussian", "dense"), ("resnet-m", 32, 3, "discretized_logistic", "dense"),
         ("resnet-l", 64, 3, "gaussian_learned", "dense"), ("resnet-m", 64, 3, "discretized_logistic", "spatial")]


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def colour_digits(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Real digits (N, 28, 28, 1) uint8 -> float32 (N, C, size, size) in [0, 1]: three different
    digits as R, G, B, padded to a multiple of 32 and enlarged by pixel repetition."""
    x = images[..., 0].astype(np.float32) / 255.0
    x = np.stack([np.roll(x, shift, axis=0) for shift in range(channels)], axis=1)  # (N, C, 28, 28)
    if size != 28:
        x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
        x = x.repeat(size // 32, axis=2).repeat(size // 32, axis=3)
    return np.ascontiguousarray(x[:, :, :size, :size])


def _wake_zero_initialised_layers(model: torch.nn.Module) -> None:
    """Give the layers that start at zero (last conv of each block, attention output) random weights,
    so parity covers what they compute rather than an identity."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module", params=CASES, ids=lambda case: f"{case[0]}-{case[1]}px-{case[2]}ch-{case[3]}-{case[4]}")
def exported_preset(request, mnist5k, tmp_path_factory):
    """A preset model saved as a checkpoint, loaded through train.load_model, exported at fp32 and fp16."""
    from export.onnx_export import export_verified
    from train import load_checkpoint, load_model
    from train.checkpoint import save_checkpoint
    from train.config import config_from_dict
    from train.model import build_model

    preset, size, channels, likelihood, latent_kind = request.param
    work = tmp_path_factory.mktemp(f"preset-{preset}")
    tiny = TINY if latent_kind == "dense" else {k: v for k, v in TINY.items() if k != "latent_dim"}
    config = build_config({"model": {"preset": preset, "image_size": size, "channels": channels,
                                     "likelihood": likelihood, "latent_kind": latent_kind,
                                     "latent_channels": 2, **tiny},
                           "data": {"dynamic_binarization": "off"}})
    torch.manual_seed(0)
    model = build_model(config.model)
    _wake_zero_initialised_layers(model)
    save_checkpoint(work / "checkpoints", 1, {"model": model.state_dict(), "config": config_to_dict(config)})
    loaded, state = load_model(work / "checkpoints"), load_checkpoint(work / "checkpoints")
    loaded_config = config_from_dict(state["config"])
    assert loaded_config == config and type(loaded) is type(model)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    picks = np.random.default_rng(0).permutation(len(mnist5k.images))[:300]
    images = colour_digits(mnist5k.images[picks], size, channels)
    if likelihood == "bernoulli":
        images = (images > 0.5).astype(np.float32)
    result = export_verified(loaded, loaded_config, state, work / "model", images, precisions=("fp32", "fp16"),
                             weights="raw", batch_sizes=(1, 7, 64))
    return loaded, loaded_config, images, result


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_matches_pytorch_for_every_preset(exported_preset, precision):
    model, config, images, result = exported_preset
    assert result.reports[precision].worst <= TOLERANCE[precision]
    metadata = json.loads((result.out_dir / "model.json").read_text())
    entry = metadata if precision == "fp32" else metadata["variants"][precision]
    encoder = _session(result.out_dir / entry["encoder"]["file"])
    decoder = _session(result.out_dir / entry["decoder"]["file"])
    rng = np.random.default_rng(1)
    x = images[rng.integers(0, len(images), size=5)]
    z = rng.standard_normal((5, config.model.latent_dim)).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(x))
        expected_params = model.decode(torch.from_numpy(z))
        expected_image = model.image_mean(expected_params).numpy()
    mean, logvar = encoder.run(None, {"x": x})
    params, image = decoder.run(None, {"z": z})
    assert mean.shape == (5, config.model.latent_dim) and image.shape == x.shape
    assert params.shape == tuple(expected_params.shape)
    assert np.abs(image - expected_image).max() <= TOLERANCE[precision]
    for actual, expected in ((mean, posterior.mean.numpy()), (logvar, posterior.logvar.numpy())):
        assert np.abs(actual - expected).max() <= TOLERANCE[precision] * max(1.0, float(np.abs(expected).max()))
    assert metadata["image_shape"] == [config.model.channels, config.model.image_size, config.model.image_size]
    assert metadata["likelihood"] == config.model.likelihood and metadata["latent_dim"] == config.model.latent_dim
    side = 4  # TINY's lowest resolution: a spatial latent is 2 channels x 4 x 4
    expected_shape = [2, side, side] if config.model.latent_kind == "spatial" else [config.model.latent_dim]
    assert metadata["latent_shape"] == expected_shape and np.prod(expected_shape) == config.model.latent_dim
    # every likelihood, colour or grey, gets the default anomaly score's statistics (Bernoulli its own combination)
    assert metadata["anomaly_score"]["default"] == ("excess_mse" if config.model.likelihood == "bernoulli" else "png_mse")
    assert metadata["anomaly_score"]["num_images"] == len(images) and min(metadata["anomaly_score"]["stds"].values()) > 0


def test_triton_repository_for_every_preset(exported_preset, tmp_path):
    from google.protobuf import text_format

    tritonclient = pytest.importorskip("tritonclient")
    import importlib.util
    from pathlib import Path

    from export.triton import write_repository

    _, config, _, result = exported_preset
    spec = importlib.util.spec_from_file_location(
        "triton_model_config_pb2", Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py")
    pb2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb2)
    image = [config.model.channels, config.model.image_size, config.model.image_size]
    params = [2 * config.model.channels if config.model.likelihood in ("gaussian_learned", "discretized_logistic")
              else config.model.channels, *image[1:]]
    latent = [config.model.latent_dim]
    expected = {"vae_encoder": ([("x", image)], [("mean", latent), ("logvar", latent)]),
                "vae_decoder": ([("z", latent)], [("params", params), ("image", image)])}
    for path in write_repository(result.out_dir, tmp_path / "repo", kind="gpu", max_batch_size=64):
        parsed = text_format.Parse(path.read_text(), pb2.ModelConfig())
        inputs, outputs = expected[parsed.name]
        assert [(i.name, list(i.dims)) for i in parsed.input] == inputs
        assert [(o.name, list(o.dims)) for o in parsed.output] == outputs
        assert parsed.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"


@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_serve_runtime_matches_pytorch_for_every_preset(exported_preset, variant):
    from serve import ops
    from serve.ops import Direct, score_noise
    from serve.runtime import RuntimeOptions, VAERuntime

    model, config, images, result = exported_preset
    runtime = VAERuntime(result.out_dir, options=RuntimeOptions(providers=("CPUExecutionProvider",),
                                                                variant="" if variant == "fp32" else variant))
    tolerance = TOLERANCE[variant]
    x = images[:6]
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(x))
        reconstruction = model.image_mean(model.decode(posterior.mean)).numpy()
    np.testing.assert_allclose(Direct(runtime).run(ops.reconstruct, x), reconstruction, atol=tolerance)
    samples = Direct(runtime).run(ops.sample, 4, seed=2)
    assert samples.shape == (4, *x.shape[1:]) and 0 <= samples.min() and samples.max() <= 1
    assert Direct(runtime).run(ops.interpolate, x[:2], steps=3).shape == (3, *x.shape[1:])
    # the anomaly score (negative ELBO) against the training loss on the same noise
    num_samples, seed = 3, 4
    eps = torch.from_numpy(score_noise(len(x), num_samples, config.model.latent_dim, seed))
    with torch.no_grad():
        z = posterior.mean + posterior.std * eps                                 # (K, B, latent)
        params = model.decode(z.reshape(-1, config.model.latent_dim))
        x_repeated = torch.from_numpy(x).repeat(num_samples, 1, 1, 1)
        nll = model.likelihood.nll(params, x_repeated)
        expected = nll.reshape(num_samples, len(x)).double().mean(0) + posterior.kl().double()
    score = Direct(runtime).run(ops.score, x, num_samples, "elbo", seed, kind="likelihood").scores
    np.testing.assert_allclose(score, expected.numpy(), rtol=1e-3 if variant == "fp32" else 5e-2)


def test_a_trained_preset_through_trainer_export_cli_registry_and_serve(small_shards, tmp_path, real_digits):
    """resnet-s trained by the real trainer on digits, then the same commands a user runs."""
    from export.__main__ import main as export_main
    from export.model_uri import resolve_model_dir
    from export.registry import register_export
    from serve import ops
    from serve.ops import Direct
    from serve.runtime import RuntimeOptions, VAERuntime
    from train import load_checkpoint, load_model
    from train.config import config_from_dict
    from train.distributed import DistContext
    from train.resnet import ResNetVAE
    from train.trainer import run_training

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    config = build_config({
        "data": {"shards": str(small_shards), "batch_size": 32, "num_workers": 0},
        "model": {"preset": "resnet-s", **TINY},
        "optim": {"warmup_steps": 5},
        "run": {"out_dir": str(tmp_path / "run"), "max_steps": 20, "eval_interval_steps": 20,
                "log_interval_steps": 10, "checkpoint_interval_steps": 20, "precision": "fp32",
                "final_iwae_samples": 0, "tracking_uri": tracking, "system_metrics": False},
    })
    summary = run_training(config, DistContext(0, 1, 0, torch.device("cpu"), "gloo"))
    assert summary["steps"] == 20
    model, state = load_model(tmp_path / "run"), load_checkpoint(tmp_path / "run")
    loaded_config = config_from_dict(state["config"])
    assert isinstance(model, ResNetVAE) and loaded_config.model == config.model
    # the finished run also left its model as model.safetensors + config.json: the same weights
    pretrained = ResNetVAE.from_pretrained(tmp_path / "run" / "model")
    assert pretrained.config == model.config and not pretrained.training
    for key, value in model.state_dict().items():
        assert torch.equal(pretrained.state_dict()[key], value), key
    assert loaded_config.model.preset == "resnet-s" and loaded_config.model.attention is False

    out = tmp_path / "model"
    assert export_main(["--checkpoint", str(tmp_path / "run"), "--out", str(out),
                        "--shards", str(small_shards)]) == 0  # fp16: the cases above
    metadata = json.loads((out / "model.json").read_text())
    assert metadata["image_shape"] == [1, 28, 28] and metadata["latent_dim"] == 3
    assert metadata["verification"]["fp32"]["worst"] <= TOLERANCE["fp32"]

    runtime = VAERuntime(out, options=RuntimeOptions(providers=("CPUExecutionProvider",)))
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(real_digits))
        expected = model.image_mean(model.decode(posterior.mean)).numpy()
    np.testing.assert_allclose(Direct(runtime).run(ops.reconstruct, real_digits), expected, atol=TOLERANCE["fp32"])

    # the ONNX flavour only: the pyfunc is tested in tests/test_export_registry.py
    registered = register_export(out, "vae-resnet-s", alias="candidate", tracking_uri=tracking, pyfunc=False)
    assert registered.onnx.run_id == state["mlflow_run_id"] and registered.pyfunc is None
    resolved = resolve_model_dir("models:/vae-resnet-s@candidate", dst=tmp_path / "resolved", tracking_uri=tracking)
    for name in ("model.json", "encoder.onnx", "decoder.onnx"):
        assert (resolved / name).read_bytes() == (out / name).read_bytes(), name


@pytest.fixture(scope="module")
def real_digits(small_shards) -> np.ndarray:
    """24 real validation digits, float32 (N, 1, 28, 28) in [0, 1]."""
    from pipeline.images import nhwc_to_nchw, to_unit_float
    from pipeline.loader import open_split
    from pipeline.shards import read_shard_images

    val = open_split(str(small_shards), "val")
    images, _ = read_shard_images(val.urls[0], val.manifest.image_shape)
    return nhwc_to_nchw(to_unit_float(images[:24])).astype(np.float32)
