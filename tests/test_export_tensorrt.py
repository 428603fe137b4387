"""TensorRT engines: a clear error where they cannot be built; real engines on a GPU."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from export.tensorrt import nvidia_gpu_present


def _tensorrt_installed() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def test_missing_tensorrt_or_gpu_is_named(exported_model, capsys):
    from export.__main__ import main

    if _tensorrt_installed() and nvidia_gpu_present():
        pytest.skip("tensorrt and a GPU are both here: nothing is missing")
    before = (exported_model / "model.json").read_text()
    assert main(["tensorrt", "--model", str(exported_model)]) == 1
    error = capsys.readouterr().err
    assert "python -m export tensorrt needs" in error
    assert ("`tensorrt` Python package" in error) == (not _tensorrt_installed())
    assert ("NVIDIA GPU" in error) == (not nvidia_gpu_present())
    assert (exported_model / "model.json").read_text() == before
    assert not list(exported_model.glob("*.plan"))


def test_tensorrt_on_a_directory_without_an_export_says_so(tmp_path, capsys):
    from export.__main__ import main

    assert main(["tensorrt", "--model", str(tmp_path)]) == 1
    assert "no model.json" in capsys.readouterr().err


def test_bad_profile_is_rejected(exported_model, capsys):
    from export.__main__ import main

    with pytest.raises(SystemExit):
        main(["tensorrt", "--model", str(exported_model), "--batch", "64,1,1024"])
    assert "MIN <= OPT <= MAX" in capsys.readouterr().err


@pytest.mark.gpu
def test_engines_match_onnxruntime(exported_model_fp16, tmp_path):
    """Build fp32 and fp16 engines and run them (through torch's CUDA memory) against onnxruntime."""
    import shutil

    import onnxruntime as ort
    import torch

    trt = pytest.importorskip("tensorrt")
    if not (nvidia_gpu_present() and torch.cuda.is_available()):
        pytest.skip("needs an NVIDIA GPU with CUDA")
    from export.tensorrt import build_engines

    model_dir = tmp_path / "model"
    shutil.copytree(exported_model_fp16, model_dir)
    engines = build_engines(model_dir, precisions=("fp32", "fp16"), batch=(1, 64, 256))
    assert sorted(e.name for e in engines) == sorted(f"{p}.{q}.plan" for p in ("encoder", "decoder")
                                                     for q in ("fp32", "fp16"))
    listing = json.loads((model_dir / "model.json").read_text())["tensorrt"]
    assert listing["profile_batch"] == {"min": 1, "opt": 64, "max": 256}

    z = np.random.default_rng(0).standard_normal((37, 16)).astype(np.float32)
    reference = ort.InferenceSession(str(model_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])
    _, expected = reference.run(None, {"z": z})
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for precision, tolerance in (("fp32", 1e-3), ("fp16", 1e-2)):
        engine = runtime.deserialize_cuda_engine((model_dir / f"decoder.{precision}.plan").read_bytes())
        context = engine.create_execution_context()
        context.set_input_shape("z", z.shape)
        tensors = {"z": torch.from_numpy(z).cuda()}
        for name in ("params", "image"):
            tensors[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
        for name, tensor in tensors.items():
            context.set_tensor_address(name, tensor.data_ptr())
        assert context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        assert np.abs(tensors["image"].cpu().numpy() - expected).max() <= tolerance, precision
