"""The Triton model repository, parsed with Triton's own protobuf definitions (tritonclient)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnxruntime as ort
import pytest

tritonclient = pytest.importorskip("tritonclient")


@pytest.fixture(scope="module")
def pb2():
    """tritonclient's model_config_pb2, loaded by path: `tritonclient.grpc` itself needs grpcio."""
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(path: Path, pb2):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), pb2.ModelConfig())  # strict: unknown fields raise


def _io(entries):
    return [(e.name, e.data_type, list(e.dims)) for e in entries]


def test_gpu_repository_field_by_field(exported_model, tmp_path, pb2):
    from export.__main__ import main

    repo = tmp_path / "repo"
    assert main(["triton", "--model", str(exported_model), "--out", str(repo), "--max-batch-size", "512",
                 "--instances", "2", "--queue-delay-us", "250"]) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["vae_decoder", "vae_encoder"]
    fp32 = pb2.DataType.Value("TYPE_FP32")
    expected_io = {
        "vae_encoder": ([("x", fp32, [1, 28, 28])], [("mean", fp32, [16]), ("logvar", fp32, [16])]),
        "vae_decoder": ([("z", fp32, [16])], [("params", fp32, [1, 28, 28]), ("image", fp32, [1, 28, 28])]),
    }
    for name, (inputs, outputs) in expected_io.items():
        config = _parse(repo / name / "config.pbtxt", pb2)
        assert config.name == name
        assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
        assert config.max_batch_size == 512
        assert _io(config.input) == inputs and _io(config.output) == outputs
        assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
        assert list(config.dynamic_batching.preferred_batch_size) == [64, 256]
        assert config.dynamic_batching.max_queue_delay_microseconds == 250
        assert len(config.instance_group) == 1
        group = config.instance_group[0]
        assert group.count == 2 and group.kind == pb2.ModelInstanceGroup.Kind.KIND_GPU
        accelerators = config.optimization.execution_accelerators
        assert len(accelerators.gpu_execution_accelerator) == 1 and not accelerators.cpu_execution_accelerator
        trt = accelerators.gpu_execution_accelerator[0]
        assert trt.name == "tensorrt"
        assert trt.parameters["precision_mode"] == "FP16"
        assert int(trt.parameters["max_workspace_size_bytes"]) == 1 << 30
        assert trt.parameters["trt_engine_cache_enable"] == "1"
        # the version directory holds the exported file unchanged, and its io is what the config says
        model_file = repo / name / "1" / "model.onnx"
        part = name.removeprefix("vae_")
        assert model_file.read_bytes() == (exported_model / f"{part}.onnx").read_bytes()
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        assert [(i.name, i.shape[1:]) for i in session.get_inputs()] == [(n, d) for n, _, d in inputs]
        assert [(o.name, o.shape[1:]) for o in session.get_outputs()] == [(n, d) for n, _, d in outputs]
        assert (repo / name / "model.json").is_file()


def test_cpu_repository_has_no_gpu_accelerator(exported_model, tmp_path, pb2):
    from export.triton import write_repository

    configs = write_repository(exported_model, tmp_path / "repo", prefix="digits", kind="cpu", max_batch_size=32)
    assert [c.parent.name for c in configs] == ["digits_encoder", "digits_decoder"]
    for path in configs:
        config = _parse(path, pb2)
        assert config.max_batch_size == 32 and list(config.dynamic_batching.preferred_batch_size) == [32]
        assert config.instance_group[0].kind == pb2.ModelInstanceGroup.Kind.KIND_CPU
        assert not config.HasField("optimization")


def test_bad_repository_arguments_are_errors(exported_model, tmp_path, capsys):
    from export.__main__ import main

    assert main(["triton", "--model", str(exported_model), "--out", str(tmp_path / "r"), "--max-batch-size", "0"]) == 1
    assert "max_batch_size >= 1" in capsys.readouterr().err
    assert main(["triton", "--model", str(tmp_path), "--out", str(tmp_path / "r")]) == 1
    assert "no model.json" in capsys.readouterr().err
