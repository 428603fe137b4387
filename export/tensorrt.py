"""Serialized TensorRT engines from an export, through the TensorRT Python API.

One engine per graph and precision, with one optimisation profile (min/opt/max batch). Engines
are specific to the GPU model and TensorRT version that built them: both are written to
model.json next to the file names. Without the `tensorrt` package or an NVIDIA GPU this stops with
an error that says which is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

from export.model_card import METADATA_FILE, read_model_json


class TensorRTUnavailable(RuntimeError):
    """TensorRT engines cannot be built here; the message says what is missing."""


def nvidia_gpu_present() -> bool:
    """True when the NVIDIA driver exposes a device (onnxruntime-gpu lists CUDA either way)."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def require_tensorrt():
    """The tensorrt module, or TensorRTUnavailable naming everything that is missing."""
    missing = []
    trt = None
    try:
        import tensorrt as trt
    except ImportError as error:
        missing.append(f"the `tensorrt` Python package ({error}; pip install tensorrt)")
    if not nvidia_gpu_present():
        missing.append("an NVIDIA GPU (no /dev/nvidiactl or /proc/driver/nvidia/gpus: driver not loaded)")
    if missing:
        raise TensorRTUnavailable("python -m export tensorrt needs " + " and ".join(missing))
    return trt


def _engine_source(model_dir: Path, metadata: dict, part: str, precision: str, strongly_typed: bool) -> Path:
    """The ONNX file an engine is built from.

    A strongly typed network (TensorRT 10.x optional, 11 the only kind) computes in the types of
    the ONNX graph, so an fp16 engine needs the export's fp16 variant.
    """
    if precision == "fp16" and strongly_typed:
        variant = metadata.get("variants", {}).get("fp16")
        if not variant:
            raise ValueError(f"{model_dir}: a strongly typed fp16 engine needs the fp16 ONNX files; "
                             f"export with --precision fp32,fp16")
        return model_dir / variant[part]["file"]
    return model_dir / metadata[part]["file"]


def build_engine(trt, onnx_path: Path, engine_path: Path, precision: str, batch: tuple[int, int, int],
                 workspace_mib: int) -> Path:
    """Parse `onnx_path`, build one engine with a min/opt/max batch profile, write it."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (batch[0], *rest), (batch[1], *rest), (batch[2], *rest))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path.write_bytes(bytes(serialized))
    return engine_path


def build_engines(model_dir: str | Path, *, precisions: tuple[str, ...] = ("fp16", "fp32"),
                  batch: tuple[int, int, int] = (1, 64, 1024), workspace_mib: int = 1024) -> list[Path]:
    """Engines for encoder and decoder at each precision in model_dir; model.json lists them."""
    model_dir = Path(model_dir)
    metadata = read_model_json(model_dir)  # a wrong directory is reported before a missing GPU
    trt = require_tensorrt()
    import torch  # only for the device name recorded beside the engines

    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    built, listing = [], {}
    for precision in precisions:
        files = {}
        for part in ("encoder", "decoder"):
            source = _engine_source(model_dir, metadata, part, precision, strongly_typed)
            engine = build_engine(trt, source, model_dir / f"{part}.{precision}.plan", precision, batch, workspace_mib)
            files[part] = {"file": engine.name, "source": source.name, **{k: metadata[part][k] for k in ("inputs", "outputs")}}
            built.append(engine)
        listing[precision] = files
    metadata["tensorrt"] = {"engines": listing, "profile_batch": {"min": batch[0], "opt": batch[1], "max": batch[2]},
                            "tensorrt_version": trt.__version__, "strongly_typed": strongly_typed,
                            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown"}
    temporary = model_dir / f".{METADATA_FILE}.tmp"
    temporary.write_text(json.dumps(metadata, indent=2) + "\n")
    temporary.replace(model_dir / METADATA_FILE)
    return built
