"""onnxruntime sessions over an exported model directory: no torch anywhere in serve/.

`VAERuntime` owns the model card, the providers and the encoder and decoder sessions, checked against the
card and run once before anything is served; the operations users call live in `serve.ops`. Work is split
into chunks of `batch_size` rows; on CUDA, inputs and outputs go through I/O binding so each chunk makes one
copy each way.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.model_card import PARAMS_PER_CHANNEL, ModelDirError, read_model_card
from serve.likelihoods import negative_log_likelihood

# TensorRT first, then CUDA, then CPU: the fastest provider that can run here wins.
DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
PROVIDER_ALIASES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                    "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def nvidia_gpu_present() -> bool:
    """True when the NVIDIA driver exposes a device (onnxruntime-gpu lists CUDA either way)."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def parse_providers(text: str) -> tuple[str, ...]:
    """'tensorrt,cuda,cpu' (or full provider names) -> provider names, in order."""
    names = tuple(PROVIDER_ALIASES.get(item.strip().lower(), item.strip()) for item in text.split(",") if item.strip())
    if not names:
        raise ValueError(f"expected a comma-separated provider list like 'cuda,cpu', got {text!r}")
    return names


def choose_providers(preferred: tuple[str, ...]) -> list[str]:
    """`preferred` filtered to what is installed and usable here, CPU always last."""
    available = set(ort.get_available_providers())
    gpu = nvidia_gpu_present()
    chosen = [p for p in preferred if p in available and (gpu or p not in GPU_PROVIDERS)]
    return chosen if "CPUExecutionProvider" in chosen else [*chosen, "CPUExecutionProvider"]


@dataclass(frozen=True)
class RuntimeOptions:
    """How the sessions run."""

    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    """Execution providers in order of preference; unusable ones are dropped, CPU is always last."""
    batch_size: int = 0
    """Rows per device call (0: 4096 on a GPU, 512 on the CPU; see `VAERuntime.tune_batch_size`)."""
    intra_op_threads: int = 0
    """Threads inside one operator (0: onnxruntime's default, one per core)."""
    inter_op_threads: int = 0
    """Threads across independent operators (0: onnxruntime's default)."""
    io_binding: bool | None = None
    """Bind inputs/outputs to device buffers (None: on CUDA only)."""
    spinning: bool = True
    """Let idle onnxruntime threads spin (lowest latency); off frees the cores for CPU work beside it."""
    variant: str = ""
    """A variant listed in model.json "variants" (e.g. "fp16"); '' uses the default fp32 graphs."""


class NonFiniteOutput(RuntimeError):
    """A graph produced NaN/Inf (or pixels outside [0, 1]): the model is broken, not the request."""

    def __init__(self, message: str, graph: str) -> None:
        super().__init__(message)
        self.graph = graph


def check_outputs(graph: str, names: list[str], arrays: list[np.ndarray]) -> None:
    """Raise NonFiniteOutput unless every output is finite and every `image` lies in [0, 1]."""
    for name, array in zip(names, arrays):
        if not array.size:
            continue
        low, high = float(array.min()), float(array.max())  # NaN propagates to both; an Inf shows at one end
        if not (math.isfinite(low) and math.isfinite(high)):
            rows = int((~np.isfinite(array.reshape(len(array), -1))).any(axis=1).sum()) if array.ndim else 1
            raise NonFiniteOutput(f"the {graph} graph's output {name!r} holds NaN or Inf in {rows} of "
                                  f"{len(array)} rows: the model cannot answer this input", graph)
        if name == "image" and (low < 0.0 or high > 1.0):
            raise NonFiniteOutput(f"the {graph} graph's output 'image' lies in [{low:.4g}, {high:.4g}], "
                                  "not in [0, 1]: the model is broken", graph)


def _dims(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


class _Graph:
    """One onnxruntime session: casts inputs to its dtype, runs in chunks, returns float32."""

    def __init__(self, name: str, path: Path, options: ort.SessionOptions, providers: list[str],
                 io_binding: bool | None):
        self.name = name
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input = self.session.get_inputs()[0]
        self.input_dtype = ORT_DTYPES.get(self.input.type, np.float32)
        self.output_names = [o.name for o in self.session.get_outputs()]
        on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.io_binding = on_cuda if io_binding is None else io_binding
        self.device = "cuda" if on_cuda else "cpu"

    def shape_problems(self, path: Path, expected_input: tuple, expected_outputs: dict[str, tuple]) -> list[str]:
        """How the graph's declared input and output shapes differ from what model.json says.

        Expected shapes leave the batch axis out; a symbolic (named) axis in the graph matches any size."""
        def differs(shape, expected) -> bool:
            return len(shape) != len(expected) + 1 or any(
                isinstance(actual, int) and actual != want for actual, want in zip(shape[1:], expected))

        problems = []
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or self.input.type not in ORT_DTYPES:
            problems.append(f"{path.name}: expected one float input, got "
                            f"{[(i.name, i.type) for i in inputs]}")
        elif differs(self.input.shape, expected_input):
            problems.append(f"{path.name}: input {self.input.name!r} has shape {_dims(self.input.shape)}, "
                            f"model.json says (batch, {', '.join(map(str, expected_input))})")
        outputs = {o.name: o for o in self.session.get_outputs()}
        for name, expected in expected_outputs.items():
            if name not in outputs:
                problems.append(f"{path.name}: no output {name!r} (it has {sorted(outputs)})")
            elif outputs[name].type not in ORT_DTYPES or differs(outputs[name].shape, expected):
                problems.append(f"{path.name}: output {name!r} is {outputs[name].type} {_dims(outputs[name].shape)}, "
                                f"model.json says float (batch, {', '.join(map(str, expected))})")
        return problems

    def run(self, array: np.ndarray, outputs: list[str], batch_size: int, check: bool = True) -> list[np.ndarray]:
        """Outputs `outputs` for every row of `array`, computed `batch_size` rows at a time.

        `check`: raise NonFiniteOutput when an output is not finite (the HTTP service checks per request)."""
        array = np.ascontiguousarray(array, dtype=self.input_dtype)
        parts = [self._run_chunk(array[start:start + batch_size], outputs)
                 for start in range(0, len(array), batch_size)] or [self._run_chunk(array, outputs)]
        results = [np.concatenate([part[i] for part in parts]).astype(np.float32, copy=False)
                   for i in range(len(outputs))]
        if check:
            check_outputs(self.name, outputs, results)
        return results

    def _run_chunk(self, chunk: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        if not self.io_binding:
            return self.session.run(outputs, {self.input.name: chunk})
        # One host->device copy in, outputs left on the device until copied back once.
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input.name, ort.OrtValue.ortvalue_from_numpy(chunk, self.device, 0))
        for name in outputs:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


class VAERuntime:
    """Encoder and decoder sessions plus the model card (model.json) they were checked against."""

    def __init__(self, model_dir: str | Path, providers: tuple[str, ...] | None = None,
                 intra_op_threads: int = 0, options: RuntimeOptions | None = None) -> None:
        options = options or RuntimeOptions()
        if providers is not None or intra_op_threads:
            options = RuntimeOptions(**{**options.__dict__, **({"providers": tuple(providers)} if providers else {}),
                                        **({"intra_op_threads": intra_op_threads} if intra_op_threads else {})})
        card = read_model_card(model_dir)  # checked before anything is allocated from it
        files = card.files(options.variant)
        self.model_dir = card.model_dir
        self.options = options
        self.card = card
        self.metadata = card.metadata
        self.latent_dim = card.latent_dim
        self.image_shape = card.image_shape  # (C, H, W)
        self.likelihood = card.likelihood
        self.likelihood_params = card.likelihood_params
        ort.set_default_logger_severity(3)  # a failed GPU provider is reported through `provider`
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not options.spinning:
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        chosen = choose_providers(options.providers)
        try:
            self.encoder = _Graph("encoder", files.encoder, session_options, chosen, options.io_binding)
            self.decoder = _Graph("decoder", files.decoder, session_options, chosen, options.io_binding)
        except Exception as error:  # onnxruntime raises its own types for a corrupt or foreign file
            raise ModelDirError(f"{card.model_dir}: onnxruntime cannot load the graphs: {error}") from error
        on_gpu = self.provider in GPU_PROVIDERS
        self.batch_size = options.batch_size or (4096 if on_gpu else 512)
        self._check_graphs(files)
        self.self_check()

    def _check_graphs(self, files) -> None:
        """The graphs' own declared shapes against model.json: a mismatch is refused at load, not per request."""
        channels, height, width = self.image_shape
        latent = (self.latent_dim,)
        params_channels = PARAMS_PER_CHANNEL[self.likelihood] * channels
        problems = (self.encoder.shape_problems(files.encoder, self.image_shape, {"mean": latent, "logvar": latent})
                    + self.decoder.shape_problems(files.decoder, latent, {
                        "params": (params_channels, height, width), "image": self.image_shape}))
        if problems:
            raise ModelDirError(f"{self.model_dir}: the ONNX graphs do not match model.json:\n  - "
                                + "\n  - ".join(problems))

    def self_check(self, rows: int = 8) -> None:
        """Run both graphs and the likelihood once on fixed inputs; a model that cannot answer them
        (NaN or Inf, pixels outside [0, 1], a likelihood that does not fit its params) is refused.
        This is what "ready" means: the model answers correctly, not merely that it loaded."""
        z = np.random.default_rng(0).standard_normal((rows, self.latent_dim), dtype=np.float32)
        z[0] = 0.0
        try:
            params, image = self.decoder.run(z, ["params", "image"], self.batch_size)
            x = np.concatenate([image, np.full_like(image[:1], 0.5)])
            mean, logvar = self.encoder.run(x, ["mean", "logvar"], self.batch_size)
            nll = negative_log_likelihood(self.likelihood, params, image, self.likelihood_params)
        except (NonFiniteOutput, ValueError) as error:
            raise ModelDirError(f"{self.model_dir}: the model fails its self-check on {rows} fixed latents: "
                                f"{error}") from error
        if not np.isfinite(nll).all():
            raise ModelDirError(f"{self.model_dir}: the model fails its self-check: the {self.likelihood} "
                                f"likelihood of its own decoded images is not finite")

    @property
    def provider(self) -> str:
        """The provider the sessions actually run on (onnxruntime falls back silently)."""
        return self.decoder.session.get_providers()[0]

    def tune_batch_size(self, candidates: tuple[int, ...] = (64, 256, 1024, 4096), seconds: float = 0.5) -> int:
        """Time the decoder at each candidate batch size and keep the fastest per image."""
        best, best_rate = self.batch_size, 0.0
        for size in candidates:
            z = np.zeros((size, self.latent_dim), np.float32)
            self.decoder.run(z, ["image"], size)  # warm-up
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds / len(candidates):
                self.decoder.run(z, ["image"], size)
                count += size
            rate = count / (time.perf_counter() - started)
            if rate > best_rate:
                best, best_rate = size, rate
        self.batch_size = best
        return best

