"""Export encoder and decoder to ONNX, verify them against PyTorch, write metadata beside them."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from export.graphs import DecoderGraph, EncoderGraph
from train.config import TrainConfig, config_to_dict
from train.model import ConvVAE

TOLERANCE_FP32 = 1e-4
METADATA_FILE = "model.json"


@dataclass(frozen=True)
class ParityReport:
    """Max absolute differences between onnxruntime and PyTorch, per graph output."""

    encoder_mean: float
    encoder_logvar: float
    decoder_probs: float
    batch_sizes: tuple[int, ...]

    @property
    def worst(self) -> float:
        return max(self.encoder_mean, self.encoder_logvar, self.decoder_probs)


def _export(module: torch.nn.Module, example: torch.Tensor, input_name: str,
            output_names: list[str], path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter is chatty about internal decompositions
        torch.onnx.export(
            module, (example,), str(path), dynamo=True, external_data=False, opset_version=opset,
            input_names=[input_name], output_names=output_names,
            dynamic_shapes={input_name: {0: torch.export.Dim("batch", min=1, max=1 << 20)}},
            verbose=False, optimize=True,
        )


def metadata_for(config: TrainConfig, state: dict, opset: int) -> dict:
    """Everything a consumer of the ONNX files needs, with no torch."""
    config_dict = config_to_dict(config)
    return {
        "format_version": 1,
        "latent_dim": config.model.latent_dim,
        "image_shape": [config.model.channels, config.model.image_size, config.model.image_size],
        "pixel_scaling": "uint8 / 255 -> [0, 1]",
        "likelihood": config.model.likelihood,
        "precision": "fp32",
        "opset": opset,
        "mlflow_run_id": state.get("mlflow_run_id") or "",
        "training_step": int(state.get("step", 0)),
        "config_sha256": hashlib.sha256(json.dumps(config_dict, sort_keys=True).encode()).hexdigest(),
        "encoder": {"file": "encoder.onnx", "inputs": ["x"], "outputs": ["mean", "logvar"]},
        "decoder": {"file": "decoder.onnx", "inputs": ["z"], "outputs": ["params", "image"]},
    }


def _attach_metadata(path: Path, metadata: dict) -> None:
    model = onnx.load(str(path))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(model, str(path))


def verify_parity(model: ConvVAE, encoder_path: Path, decoder_path: Path, images: np.ndarray,
                  batch_sizes: tuple[int, ...] = (1, 7, 64), seed: int = 0) -> ParityReport:
    """onnxruntime vs PyTorch on real images (encoder) and random latents (decoder)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    encoder = ort.InferenceSession(str(encoder_path), options, providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(decoder_path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = {"mean": 0.0, "logvar": 0.0, "probs": 0.0}
    for batch in batch_sizes:
        x = images[rng.integers(0, len(images), size=batch)].astype(np.float32)
        z = rng.standard_normal((batch, model.config.latent_dim)).astype(np.float32)
        with torch.no_grad():
            posterior = model.encode(torch.from_numpy(x))
            probs = model.image_mean(model.decode(torch.from_numpy(z)))
        mean, logvar = encoder.run(None, {"x": x})
        _, onnx_probs = decoder.run(None, {"z": z})
        worst["mean"] = max(worst["mean"], float(np.abs(mean - posterior.mean.numpy()).max()))
        worst["logvar"] = max(worst["logvar"], float(np.abs(logvar - posterior.logvar.numpy()).max()))
        worst["probs"] = max(worst["probs"], float(np.abs(onnx_probs - probs.numpy()).max()))
    return ParityReport(worst["mean"], worst["logvar"], worst["probs"], tuple(batch_sizes))


def export_model(model: ConvVAE, config: TrainConfig, state: dict, out_dir: str | Path,
                 validation_images: np.ndarray, *, opset: int = 20,
                 tolerance: float = TOLERANCE_FP32) -> tuple[Path, ParityReport]:
    """Write encoder.onnx, decoder.onnx and model.json to out_dir, only if parity holds.

    `validation_images` are real images as float32 (N, C, H, W) in [0, 1].
    """
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".staging")
    staging.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    latent = config.model.latent_dim
    side, channels = config.model.image_size, config.model.channels
    _export(EncoderGraph(model), torch.rand(2, channels, side, side), "x", ["mean", "logvar"],
            staging / "encoder.onnx", opset)
    _export(DecoderGraph(model), torch.randn(2, latent), "z", ["params", "image"],
            staging / "decoder.onnx", opset)
    metadata = metadata_for(config, state, opset)
    for name in ("encoder.onnx", "decoder.onnx"):
        path = staging / name
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        _attach_metadata(path, metadata)
    report = verify_parity(model, staging / "encoder.onnx", staging / "decoder.onnx", validation_images)
    if not report.worst <= tolerance:
        raise ValueError(
            f"ONNX does not match PyTorch: max abs difference {report.worst:.3g} > {tolerance:g} "
            f"(encoder mean {report.encoder_mean:.3g}, logvar {report.encoder_logvar:.3g}, "
            f"decoder probs {report.decoder_probs:.3g}); nothing written to {out_dir}")
    metadata["parity_max_abs_diff"] = report.worst
    (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in staging.iterdir():
        path.replace(out_dir / path.name)
    staging.rmdir()
    return out_dir, report
