"""A Triton Inference Server model repository from an export: the same ONNX files, Triton's configs.

    REPO/PREFIX_encoder/config.pbtxt, 1/model.onnx, model.json
    REPO/PREFIX_decoder/config.pbtxt, 1/model.onnx, model.json

Each config.pbtxt (protobuf text format of Triton's `inference.ModelConfig`) names the onnxruntime
backend, the io tensors without the batch axis, `max_batch_size`, dynamic batching, an instance
group, and on GPU the TensorRT execution accelerator (onnxruntime's TensorRT provider, with an
engine cache). Written as text here, so exporting needs no Triton package; the tests parse it
with Triton's own protobuf definitions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx

from export.model_card import METADATA_FILE, read_model_json

ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                  onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32"}


def _io(value: onnx.ValueInfoProto) -> tuple[str, str, list[int]]:
    """(name, Triton data type, dims without the batch axis) of a graph input or output."""
    tensor = value.type.tensor_type
    dims = [d.dim_value for d in tensor.shape.dim[1:]]
    if any(d <= 0 for d in dims):
        raise ValueError(f"{value.name}: Triton needs fixed non-batch dims, got {dims}")
    return value.name, ONNX_TO_TRITON[tensor.elem_type], dims


def _tensor_block(kind: str, entries: list[tuple[str, str, list[int]]]) -> str:
    items = ",\n".join(f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'
                       for name, dtype, dims in entries)
    return f"{kind} [\n{items}\n]"


def model_config_text(name: str, graph: onnx.ModelProto, *, max_batch_size: int, instances: int, kind: str,
                      queue_delay_us: int, trt_precision: str, workspace_bytes: int = 1 << 30) -> str:
    """config.pbtxt for one graph."""
    preferred = [b for b in (64, 256, 1024) if b <= max_batch_size] or [max_batch_size]
    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        _tensor_block("input", [_io(v) for v in graph.graph.input]),
        _tensor_block("output", [_io(v) for v in graph.graph.output]),
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
        f"  max_queue_delay_microseconds: {queue_delay_us}\n"
        "}",
        f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_{kind.upper()}\n  }}\n]",
    ]
    if kind == "gpu":
        parameters = {"precision_mode": trt_precision, "max_workspace_size_bytes": str(workspace_bytes),
                      "trt_engine_cache_enable": "1", "trt_engine_cache_path": f"/tmp/triton-trt-cache/{name}"}
        params = "\n".join(f'        parameters {{ key: "{k}" value: "{v}" }}' for k, v in parameters.items())
        lines.append(
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n"
            f'      {{\n        name: "tensorrt"\n{params}\n      }}\n    ]\n  }}\n}}')
    return "\n".join(lines) + "\n"


def write_repository(model_dir: str | Path, repo: str | Path, *, prefix: str = "vae", max_batch_size: int = 1024,
                     instances: int = 1, kind: str = "gpu", queue_delay_us: int = 500,
                     trt_precision: str = "FP16") -> list[Path]:
    """Write (or replace) PREFIX_encoder and PREFIX_decoder in `repo`; returns the config paths."""
    if max_batch_size < 1 or instances < 1 or queue_delay_us < 0:
        raise ValueError(f"expected max_batch_size >= 1, instances >= 1, queue_delay_us >= 0; got "
                         f"{max_batch_size}, {instances}, {queue_delay_us}")
    if kind not in ("gpu", "cpu"):
        raise ValueError(f"kind: expected 'gpu' or 'cpu', got {kind!r}")
    if trt_precision not in ("FP16", "FP32"):
        raise ValueError(f"trt_precision: expected FP16 or FP32, got {trt_precision!r}")
    model_dir, repo = Path(model_dir), Path(repo)
    metadata = read_model_json(model_dir)
    written = []
    for part in ("encoder", "decoder"):
        source = model_dir / metadata[part]["file"]
        graph = onnx.load(str(source))
        name = f"{prefix}_{part}"
        target = repo / name
        if target.exists():
            shutil.rmtree(target)
        (target / "1").mkdir(parents=True)
        shutil.copyfile(source, target / "1" / "model.onnx")
        (target / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        config = target / "config.pbtxt"
        config.write_text(model_config_text(name, graph, max_batch_size=max_batch_size, instances=instances,
                                            kind=kind, queue_delay_us=queue_delay_us, trt_precision=trt_precision))
        written.append(config)
    return written
