"""onnxruntime sessions over an exported model directory: no torch anywhere in serve/.

`VAERuntime` owns the encoder and decoder sessions and every operation users call: sample, decode,
encode, reconstruct, interpolate, traverse and score. Work is split into chunks of `batch_size`
rows; on CUDA, inputs and outputs go through I/O binding so each chunk makes one copy each way.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serve.likelihoods import PARAMS_PER_CHANNEL, negative_log_likelihood
from serve.model_spec import ModelDirError, read_model_spec

# TensorRT first, then CUDA, then CPU: the fastest provider that can run here wins.
DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
PROVIDER_ALIASES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                    "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
# The same clamp train applies to the posterior's log-variance (train.model.LOGVAR_MIN/MAX).
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
LOG_2PI = math.log(2.0 * math.pi)
# Images up to this many times the model's pixel count are decoded (and then refused by size with a clear
# message); bigger ones are refused from their header alone (a 1.4 MB PNG can declare 13,000 x 13,000).
MAX_INPUT_PIXELS_FACTOR = 4
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
    """Encoder and decoder sessions plus the model's metadata (model.json)."""

    def __init__(self, model_dir: str | Path, providers: tuple[str, ...] | None = None,
                 intra_op_threads: int = 0, options: RuntimeOptions | None = None) -> None:
        options = options or RuntimeOptions()
        if providers is not None or intra_op_threads:
            options = RuntimeOptions(**{**options.__dict__, **({"providers": tuple(providers)} if providers else {}),
                                        **({"intra_op_threads": intra_op_threads} if intra_op_threads else {})})
        spec = read_model_spec(model_dir)  # checked before anything is allocated from it
        files = spec.files(options.variant)
        self.model_dir = spec.model_dir
        self.options = options
        self.spec = spec
        self.metadata = spec.metadata
        self.latent_dim = spec.latent_dim
        self.image_shape = spec.image_shape  # (C, H, W)
        self.likelihood = spec.likelihood
        self.likelihood_params = spec.likelihood_params
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
            raise ModelDirError(f"{spec.model_dir}: onnxruntime cannot load the graphs: {error}") from error
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

    # ---------------------------------------------------------------- validation

    def check_images(self, x: np.ndarray) -> np.ndarray:
        """Validate a float batch (B, C, H, W) in [0, 1]; the error names what is wrong."""
        x = np.asarray(x)
        channels, height, width = self.image_shape
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, {channels}, {height}, {width}), got {x.shape}")
        if x.shape[1] != channels:
            raise ValueError(f"expected {channels} channel{'s' if channels > 1 else ''}, got {x.shape[1]} "
                             f"(images of shape {x.shape})")
        if tuple(x.shape[2:]) != (height, width):
            raise ValueError(f"expected {height}x{width} images, got {x.shape[2]}x{x.shape[3]}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)) or x.dtype == np.bool_:
            raise TypeError(f"expected float pixels in [0, 1], got {x.dtype}")
        if np.issubdtype(x.dtype, np.integer):
            raise TypeError(f"expected float pixels in [0, 1], got {x.dtype} (divide uint8 pixels by 255)")
        if not np.isfinite(x).all():
            raise ValueError("images contain NaN or Inf")
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise ValueError(f"pixel values must lie in [0, 1], got [{x.min():.4g}, {x.max():.4g}]")
        return x.astype(np.float32, copy=False)

    @property
    def max_input_pixels(self) -> int:
        """Largest image (width x height) decoded from bytes: serving resizes nothing, so anything much bigger
        than the model's own image size is refused from its header, before a pixel is decoded."""
        _, height, width = self.image_shape
        return MAX_INPUT_PIXELS_FACTOR * height * width

    def image_from_bytes(self, data: bytes) -> np.ndarray:
        """PNG/JPEG/... bytes -> (H, W, C) uint8 of the model's size; ValueError says what is wrong."""
        from pipeline.images import decode_image

        channels, height, width = self.image_shape
        image = decode_image(data, channels=channels, max_pixels=self.max_input_pixels)
        if image.shape[:2] != (height, width):
            raise ValueError(f"expected {height}x{width} pixels, got {image.shape[0]}x{image.shape[1]}")
        return image

    def check_latents(self, z: np.ndarray) -> np.ndarray:
        """Validate latents (B, latent)."""
        z = np.asarray(z)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"expected latents of shape (B, {self.latent_dim}), got {z.shape}")
        if not np.issubdtype(z.dtype, np.floating) and not np.issubdtype(z.dtype, np.integer):
            raise TypeError(f"expected float latents, got {z.dtype}")
        if not np.isfinite(z).all():
            raise ValueError("latents contain NaN or Inf")
        return z.astype(np.float32, copy=False)

    def _one_image(self, x: np.ndarray, name: str) -> np.ndarray:
        x = np.asarray(x)
        if x.size != math.prod(self.image_shape):
            raise ValueError(f"{name}: expected one image of shape {self.image_shape}, got {x.shape}")
        return x.reshape(self.image_shape)

    # ---------------------------------------------------------------- the two graphs

    def encode(self, x: np.ndarray, *, sample: bool = False, seed: int | None = 0
               ) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
        """Images (B, C, H, W) in [0, 1] -> (mean, logvar), each (B, latent); `sample=True`: z ~ q(z|x)."""
        mean, logvar = self.encode_raw(self.check_images(x))
        if not sample:
            return mean, logvar
        eps = np.random.default_rng(seed).standard_normal(mean.shape).astype(np.float32)
        return mean + np.exp(0.5 * logvar) * eps

    def encode_raw(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The encoder graph on checked float32 images; logvar clamped as in training."""
        mean, logvar = self.encoder.run(x, ["mean", "logvar"], self.batch_size)
        return mean, np.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Latents (B, latent) -> image means in [0, 1], (B, C, H, W)."""
        (image,) = self.decoder.run(self.check_latents(z), ["image"], self.batch_size)
        return image

    def decode_params(self, z: np.ndarray) -> np.ndarray:
        """Latents (B, latent) -> the likelihood parameters (layout in serve.likelihoods)."""
        (params,) = self.decoder.run(self.check_latents(z), ["params"], self.batch_size)
        return params

    # ---------------------------------------------------------------- operations

    def sample_latents(self, num: int, seed: int = 0, temperature: float = 1.0) -> np.ndarray:
        """z ~ N(0, temperature^2 I), (num, latent); one seed, one stream, whatever the chunking."""
        if num < 0:
            raise ValueError(f"number of samples must be >= 0, got {num}")
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        z = np.random.default_rng(seed).standard_normal((num, self.latent_dim), dtype=np.float32)
        return z * np.float32(temperature)

    def sample(self, num: int, seed: int = 0, temperature: float = 1.0) -> np.ndarray:
        """`num` new images (B, C, H, W) from z ~ N(0, temperature^2 I), reproducible per seed."""
        return self.decode(self.sample_latents(num, seed, temperature))

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """Decode the posterior mean of each image."""
        mean, _ = self.encode(x)
        return self.decode(mean)

    def interpolate(self, a: np.ndarray, b: np.ndarray, steps: int = 8, mode: str = "linear") -> np.ndarray:
        """Decoded path between the posterior means of images a and b (each (C, H, W) or (1, C, H, W)):
        (steps, C, H, W), endpoints included."""
        x = self.check_images(np.stack([self._one_image(a, "a"), self._one_image(b, "b")]))
        mean, _ = self.encode(x)
        return self.decode(interpolate_latents(mean[0], mean[1], steps, mode))

    def traverse(self, x: np.ndarray, dims: list[int] | None = None, value_range: tuple[float, float] = (-3.0, 3.0),
                 steps: int = 9) -> np.ndarray:
        """Vary each latent dimension in `dims` over `value_range` around the posterior mean of one image x:
        (len(dims), steps, C, H, W)."""
        x = self.check_images(self._one_image(x, "traverse")[None])
        z = traverse_latents(self.encode(x)[0][0], dims, value_range, steps, self.latent_dim)
        return self.decode(z.reshape(-1, self.latent_dim)).reshape(z.shape[0], steps, *self.image_shape)

    def score(self, x: np.ndarray, num_samples: int = 1, method: str = "elbo", seed: int = 0,
              complexity: str = "none") -> np.ndarray:
        """Anomaly score per image (B,) in nats: the negative ELBO averaged over `num_samples` draws of
        z ~ q(z|x) ("elbo"), or the importance-weighted bound -log mean_k p(x,z_k)/q(z_k|x) ("iwae");
        complexity="png" subtracts each image's PNG code length (see `complexity_nats`)."""
        x = self.check_images(x)
        check_complexity(complexity)
        mean, logvar = self.encode_raw(x)
        eps = score_noise(len(x), num_samples, self.latent_dim, seed)
        z = latents_for_score(mean, logvar, eps)
        params = self.decoder.run(z.reshape(-1, self.latent_dim), ["params"], self.batch_size)[0]
        scores = score_from_parts(x, mean, logvar, eps, params, method, self.likelihood, self.likelihood_params)
        return scores - complexity_nats(x) if complexity == "png" else scores

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


# ---------------------------------------------------------------- numpy pieces, shared with the HTTP service

def interpolate_latents(z_a: np.ndarray, z_b: np.ndarray, steps: int, mode: str = "linear") -> np.ndarray:
    """`steps` latents from z_a to z_b inclusive, (steps, latent): straight line, or slerp (great circle)."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    if mode not in ("linear", "slerp"):
        raise ValueError(f"mode must be 'linear' or 'slerp', got {mode!r}")
    t = np.linspace(0.0, 1.0, steps)[:, None]
    z_a, z_b = np.asarray(z_a, np.float64), np.asarray(z_b, np.float64)
    if mode == "slerp":
        norms = np.linalg.norm(z_a) * np.linalg.norm(z_b)
        omega = math.acos(float(np.clip(z_a @ z_b / norms, -1.0, 1.0))) if norms > 0 else 0.0
        if omega > 1e-6:  # nearly parallel vectors: slerp tends to the straight line
            return ((np.sin((1 - t) * omega) * z_a + np.sin(t * omega) * z_b) / math.sin(omega)).astype(np.float32)
    return ((1 - t) * z_a + t * z_b).astype(np.float32)


def traverse_latents(z: np.ndarray, dims: list[int] | None, value_range: tuple[float, float], steps: int,
                     latent_dim: int) -> np.ndarray:
    """(len(dims), steps, latent): z with dimension d set to each value in linspace(range, steps)."""
    dims = list(range(latent_dim)) if dims is None else list(dims)
    bad = [d for d in dims if not 0 <= d < latent_dim]
    if bad or not dims:
        raise ValueError(f"latent dimensions must lie in [0, {latent_dim}), got {dims}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    low, high = value_range
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"range must be two finite numbers low < high, got {value_range}")
    grid = np.repeat(np.asarray(z, np.float32)[None, None], len(dims), 0).repeat(steps, 1)
    for row, d in enumerate(dims):
        grid[row, :, d] = np.linspace(low, high, steps)
    return grid


COMPLEXITY_CORRECTIONS = ("none", "png")


def check_complexity(complexity: str) -> None:
    if complexity not in COMPLEXITY_CORRECTIONS:
        raise ValueError(f"complexity must be one of {COMPLEXITY_CORRECTIONS}, got {complexity!r}")


def complexity_nats(x: np.ndarray) -> np.ndarray:
    """Each image's lossless PNG code length (level 9) in nats, (B,) from (B, C, H, W) floats in [0, 1].

    Likelihood models give simple inputs (little ink, flat regions) high likelihood whatever their
    class, so a negative ELBO partly measures input complexity. Subtracting a generic compressor's code
    length leaves what the model finds unusual beyond that: the input-complexity score of Serra et al.,
    "Input complexity and out-of-distribution detection with likelihood-based generative models"
    (ICLR 2020), with PNG as the compressor.
    """
    from pipeline.images import encode_png, nchw_to_nhwc, to_uint8

    pixels = to_uint8(nchw_to_nhwc(x))
    return np.array([len(encode_png(image, compress_level=9)) * 8 * math.log(2) for image in pixels])


def score_noise(num_images: int, num_samples: int, latent_dim: int, seed: int) -> np.ndarray:
    """eps for `score`: (num_samples, B, latent), one seeded stream."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return np.random.default_rng(seed).standard_normal((num_samples, num_images, latent_dim), dtype=np.float32)


def latents_for_score(mean: np.ndarray, logvar: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """z_k = mean + exp(logvar / 2) eps_k, (K, B, latent)."""
    return mean[None] + np.exp(0.5 * logvar)[None] * eps


def score_from_parts(x: np.ndarray, mean: np.ndarray, logvar: np.ndarray, eps: np.ndarray, params: np.ndarray,
                     method: str, likelihood: str, likelihood_params: dict) -> np.ndarray:
    """Negative ELBO or IWAE bound per image from the encoder outputs, noise and decoder params (K*B, ...)."""
    if method not in ("elbo", "iwae"):
        raise ValueError(f"method must be 'elbo' or 'iwae', got {method!r}")
    num_samples, num_images = eps.shape[:2]
    x_repeated = np.broadcast_to(x[None], (num_samples, *x.shape)).reshape(-1, *x.shape[1:])
    nll = negative_log_likelihood(likelihood, params, x_repeated, likelihood_params).reshape(num_samples, num_images)
    mean, logvar, eps = mean.astype(np.float64), logvar.astype(np.float64), eps.astype(np.float64)
    if method == "elbo":
        kl = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1.0 - logvar, axis=1)  # analytic, (B,)
        return _finite_scores(nll.mean(axis=0) + kl)
    z = mean[None] + np.exp(0.5 * logvar)[None] * eps
    log_prior = -0.5 * np.sum(z ** 2 + LOG_2PI, axis=2)
    log_posterior = -0.5 * np.sum(eps ** 2 + LOG_2PI + logvar[None], axis=2)
    log_weights = -nll + log_prior - log_posterior  # (K, B)
    top = log_weights.max(axis=0)
    return _finite_scores(-(top + np.log(np.mean(np.exp(log_weights - top), axis=0))))


def _finite_scores(scores: np.ndarray) -> np.ndarray:
    if not np.isfinite(scores).all():
        raise NonFiniteOutput(f"{int((~np.isfinite(scores)).sum())} of {len(scores)} scores are not finite: the "
                              "decoder's likelihood parameters do not fit these images", "score")
    return scores
