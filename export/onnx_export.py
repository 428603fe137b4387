"""Export encoder and decoder to ONNX, verify every file against PyTorch, write metadata beside them.

Nothing reaches the output directory unless every requested precision passed: the ONNX checker
with full (strict) shape inference, a scan for random ops, and onnxruntime against PyTorch on real
validation images and on random latents at each verification batch size, with no NaN or Inf.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from export import metadata as meta
from export.model_card import METADATA_FILE, SCORE_STATISTICS_KEY
from export.fp16 import BlockedNode, convert_to_fp16
from export.graphs import DecoderGraph, EncoderGraph
from train.config import TrainConfig, config_to_dict, latent_shape
from train.likelihood import likelihood_for

TOLERANCE_FP32 = 1e-4
TOLERANCE_FP16 = 1e-2
TOLERANCES = {"fp32": TOLERANCE_FP32, "fp16": TOLERANCE_FP16}
VERIFY_BATCH_SIZES = (1, 7, 1024)
# Ops whose output is random: an exported graph must not contain them (noise is sampled outside).
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
              "Bernoulli", "Dropout"}
# Node metadata the dynamo exporter adds that holds absolute paths of this machine: dropped so the
# files are the same wherever they are exported. The layer names ("name_scopes") stay.
DROPPED_NODE_METADATA = {"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node"}


@dataclass(frozen=True)
class ParityReport:
    """Max differences between onnxruntime and PyTorch (fp32) for one precision.

    The image mean (in [0, 1]) is compared in absolute terms; the latent mean and log-variance in
    absolute terms relative to max(1, max |PyTorch value|), so large log-variances are not held to
    a tighter relative bound than small ones. `decoder_params` (logits, means, log-scales: scale
    depends on the likelihood) is reported, not gated.
    """

    encoder_mean: float
    encoder_logvar: float
    decoder_probs: float
    batch_sizes: tuple[int, ...]
    precision: str = "fp32"
    decoder_params: float = 0.0
    rows: tuple[dict, ...] = field(default_factory=tuple)

    @property
    def worst(self) -> float:
        """The largest gated difference."""
        return max(self.encoder_mean, self.encoder_logvar, self.decoder_probs)

    def as_dict(self) -> dict:
        return {"precision": self.precision, "batch_sizes": list(self.batch_sizes),
                "encoder_mean": self.encoder_mean, "encoder_logvar": self.encoder_logvar,
                "decoder_image": self.decoder_probs, "decoder_params": self.decoder_params,
                "worst": self.worst, "rows": list(self.rows)}


class VerificationError(ValueError):
    """An exported graph is not the trained model; nothing was written."""


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


def metadata_for(config: TrainConfig, state: dict, opset: int, weights: str = "ema") -> dict:
    """Everything a consumer of the ONNX files needs, with no torch."""
    config_dict = config_to_dict(config)
    return {
        "format_version": meta.FORMAT_VERSION,
        "latent_dim": config.model.latent_dim,
        "latent_shape": list(latent_shape(config.model)),  # z is (B, latent_dim): reshape to this for spatial use
        "image_shape": [config.model.channels, config.model.image_size, config.model.image_size],
        "channels": config.model.channels,
        "pixel_scaling": meta.PIXEL_SCALING,
        "likelihood": config.model.likelihood,
        "likelihood_params": likelihood_for(config.model).constants(),
        "precision": "fp32",
        "opset": opset,
        "weights": weights,
        "mlflow_run_id": state.get("mlflow_run_id") or "",
        "training_step": int(state.get("step", 0)),
        # the config as the checkpoint stored it: re-resolving it would fold in defaults added later
        "config_sha256": meta.config_sha256(state.get("config") or config_dict),
        "tool_version": meta.tool_version(),
        "exporter": {"torch": torch.__version__, "onnx": onnx.__version__},
        "encoder": {"file": "encoder.onnx", **meta.ENCODER_IO},
        "decoder": {"file": "decoder.onnx", **meta.DECODER_IO},
    }


def check_graph(model: onnx.ModelProto, input_name: str, output_names: list[str], name: str) -> None:
    """onnx.checker (full) + strict shape inference, known io names, no random ops, dynamic batch."""
    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise VerificationError(f"{name}: ONNX checker: {error}") from error
    random_ops = sorted({n.op_type for n in inferred.graph.node} & RANDOM_OPS)
    if random_ops:
        raise VerificationError(f"{name}: graph contains random ops {random_ops}; exported graphs must be deterministic")
    inputs = [i.name for i in inferred.graph.input]
    outputs = [o.name for o in inferred.graph.output]
    if inputs != [input_name] or outputs != output_names:
        raise VerificationError(f"{name}: expected io {[input_name]} -> {output_names}, got {inputs} -> {outputs}")
    for value in [*inferred.graph.input, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param or any(not d.dim_value for d in dims[1:]):
            raise VerificationError(f"{name}: {value.name} should have a symbolic batch axis and fixed other "
                                    f"axes, got {[d.dim_param or d.dim_value for d in dims]}")


def _finalise(model: onnx.ModelProto, props: dict[str, str]) -> onnx.ModelProto:
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key not in DROPPED_NODE_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    model.producer_name, model.producer_version = "vae-pipeline export", meta.tool_version().split()[-1]
    return meta.attach(model, props)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _gated_diff(actual: np.ndarray, expected: np.ndarray, relative: bool) -> float:
    diff = float(np.abs(actual.astype(np.float64) - expected).max())
    return diff / max(1.0, float(np.abs(expected).max())) if relative else diff


def _require_finite(name: str, outputs: dict[str, np.ndarray], batch: int, source: str) -> None:
    for key, value in outputs.items():
        if not np.isfinite(value).all():
            raise VerificationError(f"{name}: output {key!r} has {int((~np.isfinite(value)).sum())} NaN/Inf "
                                    f"values at batch {batch} on {source}")


def verify_parity(model, encoder_path: Path, decoder_path: Path, images: np.ndarray,
                  batch_sizes: tuple[int, ...] = VERIFY_BATCH_SIZES, seed: int = 0,
                  precision: str = "fp32") -> ParityReport:
    """onnxruntime vs PyTorch on real images (encoder), random and real latents (decoder).

    Raises VerificationError on any NaN or Inf in an onnxruntime output.
    """
    encoder, decoder = _session(encoder_path), _session(decoder_path)
    rng = np.random.default_rng(seed)
    worst = {"mean": 0.0, "logvar": 0.0, "image": 0.0, "params": 0.0}
    rows = []
    for batch in batch_sizes:
        x = images[rng.integers(0, len(images), size=batch)].astype(np.float32)  # (B, C, H, W) real
        with torch.no_grad():
            posterior = model.encode(torch.from_numpy(x))
        mean, logvar = encoder.run(None, {"x": x})
        _require_finite(encoder_path.name, {"mean": mean, "logvar": logvar}, batch, "real images")
        row = {"batch": batch, "encoder_mean": _gated_diff(mean, posterior.mean.numpy(), True),
               "encoder_logvar": _gated_diff(logvar, posterior.logvar.numpy(), True)}
        random_z = rng.standard_normal((batch, model.config.latent_dim)).astype(np.float32)
        for source, z in (("random latents", random_z), ("real latents", posterior.mean.numpy())):
            with torch.no_grad():
                params = model.decode(torch.from_numpy(z))
                image = model.image_mean(params)
            onnx_params, onnx_image = decoder.run(None, {"z": z})
            _require_finite(decoder_path.name, {"params": onnx_params, "image": onnx_image}, batch, source)
            key = "random" if source.startswith("random") else "real"
            row[f"decoder_image_{key}"] = _gated_diff(onnx_image, image.numpy(), False)
            row[f"decoder_params_{key}"] = _gated_diff(onnx_params, params.numpy(), False)
        worst["mean"] = max(worst["mean"], row["encoder_mean"])
        worst["logvar"] = max(worst["logvar"], row["encoder_logvar"])
        worst["image"] = max(worst["image"], row["decoder_image_random"], row["decoder_image_real"])
        worst["params"] = max(worst["params"], row["decoder_params_random"], row["decoder_params_real"])
        rows.append(row)
    return ParityReport(worst["mean"], worst["logvar"], worst["image"], tuple(batch_sizes),
                        precision=precision, decoder_params=worst["params"], rows=tuple(rows))


def _fp16_feeds(model, images: np.ndarray, seed: int) -> tuple[list[dict], list[dict]]:
    """Real inputs that decide which layers overflow fp16: images, real and random latents."""
    rng = np.random.default_rng(seed)
    x = images[: 1024].astype(np.float32)
    with torch.no_grad():
        real_z = model.encode(torch.from_numpy(x)).mean.numpy()
    random_z = rng.standard_normal((1024, model.config.latent_dim)).astype(np.float32)
    return [{"x": x}], [{"z": real_z}, {"z": random_z}]


@dataclass(frozen=True)
class ExportResult:
    """Where the files went and how each precision verified."""

    out_dir: Path
    reports: dict[str, ParityReport]
    fp32_layers: dict[str, list[BlockedNode]]
    score_statistics: dict | None = None
    """model.json's anomaly-score statistics (export.score_statistics), None when none could be fitted."""


def _variant_files(precision: str) -> tuple[str, str]:
    if precision == "fp32":
        return "encoder.onnx", "decoder.onnx"
    return f"encoder.{precision}.onnx", f"decoder.{precision}.onnx"


def _raise_parity(report: ParityReport, tolerance: float, out_dir: Path, blocked: list[BlockedNode]) -> None:
    kept = "; layers kept in fp32: " + ", ".join(b.describe() for b in blocked) if blocked else ""
    worst_row = max(report.rows, key=lambda r: max(r["encoder_mean"], r["encoder_logvar"],
                                                   r["decoder_image_random"], r["decoder_image_real"]))
    raise VerificationError(
        f"{report.precision} ONNX does not match PyTorch: max difference {report.worst:.3g} > {tolerance:g} "
        f"(encoder mean {report.encoder_mean:.3g}, logvar {report.encoder_logvar:.3g}, "
        f"decoder image {report.decoder_probs:.3g}; worst at batch {worst_row['batch']}){kept}; "
        f"nothing written to {out_dir}")


def _optimized_variant(model, staging: Path, provider: str, images: np.ndarray,
                       batch_sizes: tuple[int, ...]) -> tuple[ParityReport, dict]:
    """onnxruntime-optimised copies of the fp32 graphs for `provider`, verified against PyTorch."""
    import onnxruntime as ort

    from export.optimize import optimized_copy

    files = tuple(f"{part}.fp32-{provider}-opt.onnx" for part in ("encoder", "decoder"))
    for source, target in zip(_variant_files("fp32"), files):
        optimized_copy(staging / source, staging / target, provider=provider, level="all")
    report = verify_parity(model, staging / files[0], staging / files[1], images, batch_sizes,
                           precision=f"fp32-{provider}-optimized")
    variant = {"precision": "fp32", "io_dtype": "float32", "provider": provider,
               "graph_optimization": "all (onnxruntime " + ort.__version__ + ")",
               "open_with": "graph_optimization_level=ORT_DISABLE_ALL (already optimised)",
               "note": "specific to the onnxruntime version and CPU type that made it",
               "made_on": _cpu_name(), "encoder": {"file": files[0], **meta.ENCODER_IO},
               "decoder": {"file": files[1], **meta.DECODER_IO}}
    return report, variant


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or "unknown"


def _score_statistics(model, images: np.ndarray) -> dict | None:
    """The default anomaly score's statistics on the validation images, or None (serve then falls back to the
    negative ELBO and says so) when they cannot be fitted."""
    from export.score_fit import fit_score_statistics

    try:
        return fit_score_statistics(model, images).to_json()
    except ValueError as error:  # fewer than 2 images, or a score that does not vary on them
        warnings.warn(f"no anomaly-score statistics stored ({error}); serve's default score falls back to the "
                      "negative ELBO", stacklevel=2)
        return None


def export_verified(model, config: TrainConfig, state: dict, out_dir: str | Path,
                    validation_images: np.ndarray, *, precisions: tuple[str, ...] = ("fp32",),
                    opset: int = 20, tolerances: dict[str, float] | None = None,
                    weights: str = "ema", batch_sizes: tuple[int, ...] = VERIFY_BATCH_SIZES,
                    guard_fp16_overflow: bool = True, optimize_for: tuple[str, ...] = ()) -> ExportResult:
    """Write the fp32 graphs (always: they are the defaults) and any extra precisions to out_dir,
    with model.json, only if every file verifies. `validation_images`: float32 (N, C, H, W) in [0, 1].

    `optimize_for` ('cpu', 'cuda') adds onnxruntime-optimised fp32 copies, verified like the rest.
    """
    unknown = sorted(set(precisions) - set(TOLERANCES))
    if unknown:
        raise ValueError(f"unknown precision {unknown}; expected some of {sorted(TOLERANCES)}")
    tolerances = {**TOLERANCES, **(tolerances or {})}
    if "cuda" in optimize_for:
        from export.tensorrt import nvidia_gpu_present

        if not nvidia_gpu_present():
            raise ValueError("--optimize cuda needs an NVIDIA GPU (onnxruntime would silently optimise for the CPU)")
    images = np.asarray(validation_images, dtype=np.float32)
    image_shape = (config.model.channels, config.model.image_size, config.model.image_size)
    if images.ndim != 4 or images.shape[1:] != image_shape or not len(images):
        raise ValueError(f"validation images: expected (N, {', '.join(map(str, image_shape))}), got {images.shape}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        model = model.eval().float()
        side, channels = config.model.image_size, config.model.channels
        metadata = metadata_for(config, state, opset, weights)
        _export(EncoderGraph(model), torch.rand(2, channels, side, side), "x", meta.ENCODER_IO["outputs"],
                staging / "raw-encoder.onnx", opset)
        _export(DecoderGraph(model), torch.randn(2, config.model.latent_dim), "z", meta.DECODER_IO["outputs"],
                staging / "raw-decoder.onnx", opset)
        graphs = {"encoder": onnx.load(str(staging / "raw-encoder.onnx")),
                  "decoder": onnx.load(str(staging / "raw-decoder.onnx"))}
        for raw in ("raw-encoder.onnx", "raw-decoder.onnx"):
            (staging / raw).unlink()
        encoder_feeds, decoder_feeds = _fp16_feeds(model, images, seed=1) if "fp16" in precisions else ([], [])
        reports: dict[str, ParityReport] = {}
        fp32_layers: dict[str, list[BlockedNode]] = {}
        variants = {}
        for precision in ("fp32", *[p for p in precisions if p != "fp32"]):
            blocked: list[BlockedNode] = []
            files = _variant_files(precision)
            for (part, graph), file, feeds in zip(graphs.items(), files, (encoder_feeds, decoder_feeds)):
                io = meta.ENCODER_IO if part == "encoder" else meta.DECODER_IO
                if precision == "fp16":
                    graph, kept = convert_to_fp16(graph, feeds, guard_overflow=guard_fp16_overflow)
                    blocked += kept
                    graph.graph.name = f"{part}_fp16"
                graph = _finalise(graph, meta.onnx_metadata(metadata, precision))
                check_graph(graph, io["inputs"][0], io["outputs"], f"{precision} {file}")
                onnx.save(graph, str(staging / file))
            report = verify_parity(model, staging / files[0], staging / files[1], images, batch_sizes,
                                   precision=precision)
            if not report.worst <= tolerances[precision]:
                _raise_parity(report, tolerances[precision], out_dir, blocked)
            reports[precision], fp32_layers[precision] = report, blocked
            if precision != "fp32":
                variants[precision] = {
                    "precision": precision, "io_dtype": "float32",
                    "encoder": {"file": files[0], **meta.ENCODER_IO},
                    "decoder": {"file": files[1], **meta.DECODER_IO},
                    "fp32_layers": [b.describe() for b in blocked],
                }
        for provider in optimize_for:
            report, variant = _optimized_variant(model, staging, provider, images, batch_sizes)
            if not report.worst <= tolerances["fp32"]:
                _raise_parity(report, tolerances["fp32"], out_dir, [])
            reports[f"fp32-{provider}-optimized"] = report
            variants[f"fp32-{provider}-optimized"] = variant
        metadata["parity_max_abs_diff"] = reports["fp32"].worst
        metadata["verification"] = {
            "batch_sizes": list(batch_sizes), "tolerances": {p: tolerances.get(p, tolerances["fp32"]) for p in reports},
            "num_real_images": int(len(images)),
            **{p: {k: v for k, v in r.as_dict().items() if k != "precision"} for p, r in reports.items()}}
        metadata["variants"] = variants
        metadata[SCORE_STATISTICS_KEY] = _score_statistics(model, images)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in staging.iterdir():
            path.replace(out_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out_dir, reports, fp32_layers, metadata[SCORE_STATISTICS_KEY])


def export_model(model, config: TrainConfig, state: dict, out_dir: str | Path,
                 validation_images: np.ndarray, *, opset: int = 20,
                 tolerance: float = TOLERANCE_FP32) -> tuple[Path, ParityReport]:
    """fp32 only (the version-1 API): (out_dir, fp32 parity report)."""
    result = export_verified(model, config, state, out_dir, validation_images, opset=opset,
                             tolerances={"fp32": tolerance})
    return result.out_dir, result.reports["fp32"]
