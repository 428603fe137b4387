"""onnxruntime-optimised copies of an exported graph, for one execution provider.

onnxruntime optimises a graph every time it opens a session; an offline copy saves that work at
start-up and is loaded with optimisations off. The copy is specific to the provider it was made
for (and, at the `all` level, to the CPU's instruction set: NCHWc layouts), so it is an extra
variant in model.json, never the default file. bench/inference.py measures whether it helps.
"""

from __future__ import annotations

from pathlib import Path

LEVELS = ("basic", "extended", "all")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def optimized_copy(source: str | Path, target: str | Path, *, provider: str = "cpu", level: str = "extended") -> Path:
    """Write `source` optimised by onnxruntime for `provider` ('cpu' or 'cuda') to `target`.

    A CUDA copy made where no GPU runs would silently be a CPU copy (onnxruntime falls back), so
    it is refused unless the session really runs on CUDA.
    """
    import onnxruntime as ort

    if provider not in PROVIDERS or level not in LEVELS:
        raise ValueError(f"expected provider in {sorted(PROVIDERS)} and level in {LEVELS}, got {provider!r}, {level!r}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    options.optimized_model_filepath = str(target)
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    session = ort.InferenceSession(str(source), options, providers=providers)
    if session.get_providers()[0] != PROVIDERS[provider]:
        Path(target).unlink(missing_ok=True)
        raise RuntimeError(f"cannot make a {provider} copy here: the session runs on {session.get_providers()[0]}")
    return Path(target)


def open_optimized(path: str | Path, provider: str = "cpu", threads: int = 0):
    """A session on an optimised copy, with onnxruntime's own optimisations off (already done)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    return ort.InferenceSession(str(path), options, providers=providers)
