"""Every operation of a served model, written once: sample, decode, encode, reconstruct, interpolate,
traverse and score.

Each runs against a `Device`: `encode(x) -> (mean, logvar)` and `decode(z) -> (params, image)` on checked
float32 arrays, giving the graphs' raw outputs, plus `offload(function, *args)` for CPU work that must not
hold up an event loop. The HTTP service passes a device that goes through its dynamic batchers; the command
line passes `Direct`, which calls the runtime's sessions in the calling thread. Operations are coroutines so
that one body serves both; `Direct` never suspends, so `run` drives an operation on it without an event loop.

Inputs are checked here and only here (shapes, values, sizes, the latent magnitude), so the service and the
command line refuse the same inputs with the same words: `InvalidInput` (a ValueError) says what is wrong,
and which HTTP status answers it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, Protocol

import numpy as np

from export.model_card import ModelCard
from export.score_statistics import COMBINATIONS, compute_base_scores
from pipeline.images import png_code_nats
from serve.likelihoods import negative_log_likelihood, pixel_negative_log_likelihood
from serve.runtime import NonFiniteOutput, VAERuntime, check_outputs

# The same clamp train applies to the posterior's log-variance (train.model.LOGVAR_MIN/MAX).
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
LOG_2PI = math.log(2.0 * math.pi)
MAX_ABS_LATENT = 1e4
"""Largest latent magnitude decoded: the prior is N(0, I); such values only overflow the decoder."""
SCORE_METHODS = ("elbo", "iwae")
COMPLEXITY_CORRECTIONS = ("none", "png")
SCORE_KINDS = ("auto", "likelihood", *COMBINATIONS)
"""What `score` returns: "auto" (the model card's default), the likelihood bound, or a named combination."""
SCORE_KIND_HELP = (
    "auto: the model's default, the combination its export standardised on validation images (png_mse for 8-bit "
    "and Gaussian likelihoods, excess_mse for Bernoulli; measured in BENCHMARKS.md), or the likelihood, with a "
    "warning, for models exported without it; likelihood: the negative ELBO (or IWAE bound) in nats, which ranks "
    "simple inputs (e.g. digits to a clothing model) as normal; png_mse / excess_mse: z(neg ELBO - PNG nats, or "
    "- the pixels' Bernoulli entropy) + z(reconstruction squared error)")
"""The choices of `kind`, explained once for the command line's --help and the HTTP API's documentation."""


class InvalidInput(ValueError):
    """Input the caller must fix; `status` is the HTTP status that answers it."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class TooLarge(InvalidInput):
    """Input past a size limit (HTTP 413)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 413)


@dataclass(frozen=True)
class Limits:
    """Sizes one call may ask for (None: no limit, the command line's default)."""

    max_items: int | None = None
    """Most images, latents or interpolation steps in one call."""
    max_score_samples: int | None = None
    """Most z samples per image when scoring."""

    def check_count(self, count: int, what: str) -> None:
        if self.max_items is not None and count > self.max_items:
            raise TooLarge(f"too many {what}: {count} > {self.max_items} per request")

    @property
    def max_score_rows(self) -> int | None:
        """Most decoder rows (images x samples) one score call may run."""
        return None if self.max_items is None else 8 * self.max_items


UNLIMITED = Limits()


class Device(Protocol):
    """Runs the two graphs on checked float32 arrays; outputs are raw (checked and clamped by the operations)."""

    card: ModelCard

    async def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    async def decode(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    async def offload(self, function: Callable[..., Any], *args: Any) -> Any: ...


class Direct:
    """The command line's device: the runtime's sessions, called in this thread, `runtime.batch_size` rows a call."""

    def __init__(self, runtime: VAERuntime) -> None:
        self.runtime = runtime
        self.card = runtime.card

    async def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, logvar = self.runtime.encoder.run(x, ["mean", "logvar"], self.runtime.batch_size, check=False)
        return mean, logvar

    async def decode(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        params, image = self.runtime.decoder.run(z, ["params", "image"], self.runtime.batch_size, check=False)
        return params, image

    async def offload(self, function: Callable[..., Any], *args: Any) -> Any:
        return function(*args)

    def run(self, operation: Callable[..., Coroutine], *args: Any, **kwargs: Any) -> Any:
        """`operation(self, *args, **kwargs)`, synchronously: `Direct(runtime).run(ops.sample, 16, seed=3)`."""
        return run(operation(self, *args, **kwargs))


def run(operation: Coroutine) -> Any:
    """The result of an operation on `Direct`, which never suspends, so no event loop is needed."""
    try:
        operation.send(None)
    except StopIteration as finished:
        return finished.value
    operation.close()
    raise RuntimeError("the operation waited on something: run it on an event loop (await it), not with run()")


# ---------------------------------------------------------------- input checks

def check_images(card: ModelCard, x: np.ndarray) -> np.ndarray:
    """A float batch (B, C, H, W) in [0, 1] as float32; the error names what is wrong."""
    x = np.asarray(x)
    channels, height, width = card.image_shape
    if x.ndim != 4:
        raise InvalidInput(f"expected images of shape (B, {channels}, {height}, {width}), got {x.shape}")
    if x.shape[1] != channels:
        raise InvalidInput(f"expected {channels} channel{'s' if channels > 1 else ''}, got {x.shape[1]} "
                         f"(images of shape {x.shape})")
    if tuple(x.shape[2:]) != (height, width):
        raise InvalidInput(f"expected {height}x{width} images, got {x.shape[2]}x{x.shape[3]}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)) or x.dtype == np.bool_:
        raise InvalidInput(f"expected float pixels in [0, 1], got {x.dtype}")
    if np.issubdtype(x.dtype, np.integer):
        raise InvalidInput(f"expected float pixels in [0, 1], got {x.dtype} (divide uint8 pixels by 255)")
    if len(x) == 0:
        raise InvalidInput("images: empty batch")
    if not np.isfinite(x).all():
        raise InvalidInput("images contain NaN or Inf")
    if x.min() < 0.0 or x.max() > 1.0:
        raise InvalidInput(f"pixel values must lie in [0, 1], got [{x.min():.4g}, {x.max():.4g}]")
    return x.astype(np.float32, copy=False)


def checked_images(card: ModelCard, x: np.ndarray, limits: Limits) -> np.ndarray:
    """`check_images` after the count limit (a batch too large is refused before its pixels are looked at)."""
    x = np.asarray(x)
    if x.ndim:
        limits.check_count(len(x), "images")
    return check_images(card, x)


def checked_latents(card: ModelCard, z: np.ndarray, limits: Limits) -> np.ndarray:
    """`check_latents` after the count limit."""
    z = np.asarray(z)
    if z.ndim:
        limits.check_count(len(z), "latents")
    return check_latents(card, z)


def check_latents(card: ModelCard, z: np.ndarray) -> np.ndarray:
    """Latents (B, latent) as float32, finite and within +-MAX_ABS_LATENT."""
    z = np.asarray(z)
    if z.ndim != 2 or z.shape[1] != card.latent_dim:
        raise InvalidInput(f"expected latents of shape (B, {card.latent_dim}), got {z.shape}")
    if not np.issubdtype(z.dtype, np.floating) and not np.issubdtype(z.dtype, np.integer):
        raise InvalidInput(f"expected float latents, got {z.dtype}")
    if len(z) == 0:
        raise InvalidInput("z: empty batch")
    if not np.isfinite(z).all():
        raise InvalidInput("latents contain NaN or Inf")
    if np.abs(z).max() > MAX_ABS_LATENT:
        raise InvalidInput(f"z: values must lie within +-{MAX_ABS_LATENT:g}, got {np.abs(z).max():.4g}")
    return np.ascontiguousarray(z, dtype=np.float32)


def one_image(card: ModelCard, x: np.ndarray, name: str) -> np.ndarray:
    """One image (C, H, W), given as (C, H, W) or (1, C, H, W)."""
    x = np.asarray(x)
    if x.size != math.prod(card.image_shape):
        raise InvalidInput(f"{name}: expected one image of shape {card.image_shape}, got {x.shape}")
    return x.reshape(card.image_shape)


def max_input_pixels(card: ModelCard) -> int:
    """Largest image (width x height) decoded from bytes: serving resizes nothing, so anything much bigger than
    the model's own image size is refused from its header, before a pixel is decoded (a 1.4 MB PNG can declare
    13,000 x 13,000)."""
    _, height, width = card.image_shape
    return 4 * height * width


def image_from_bytes(card: ModelCard, data: bytes) -> np.ndarray:
    """PNG/JPEG/... bytes -> (H, W, C) uint8 of the model's size; InvalidInput says what is wrong (TooLarge when
    the header declares too many pixels)."""
    from pipeline.images import ImageTooLargeError, decode_image

    channels, height, width = card.image_shape
    try:
        image = decode_image(data, channels=channels, max_pixels=max_input_pixels(card))
    except ImageTooLargeError as error:
        raise TooLarge(str(error)) from error
    except ValueError as error:
        raise InvalidInput(str(error)) from error
    if image.shape[:2] != (height, width):
        raise InvalidInput(f"expected {height}x{width} pixels, got {image.shape[0]}x{image.shape[1]}")
    return image


# ---------------------------------------------------------------- the graphs, checked per call

async def _encode(device: Device, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, logvar = await device.encode(x)
    check_outputs("encoder", ["mean", "logvar"], [mean, logvar])  # a NaN for one input fails only its own call
    return mean, np.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


async def _decode(device: Device, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    params, image = await device.decode(z)
    check_outputs("decoder", ["params", "image"], [params, image])
    return params, image


@dataclass(frozen=True)
class Posterior:
    """q(z|x) of a batch: a diagonal Gaussian per image."""

    mean: np.ndarray
    """(B, latent)."""
    logvar: np.ndarray
    """(B, latent), clamped as in training."""

    def sample(self, seed: int | None = 0) -> np.ndarray:
        """z ~ q(z|x), (B, latent), one seeded stream."""
        eps = np.random.default_rng(seed).standard_normal(self.mean.shape).astype(np.float32)
        return self.mean + np.exp(0.5 * self.logvar) * eps


# ---------------------------------------------------------------- the operations

def prior_latents(card: ModelCard, num: int, seed: int | None = 0, temperature: float = 1.0) -> np.ndarray:
    """z ~ N(0, temperature^2 I), (num, latent); one seed, one stream, whatever the chunking."""
    if num < 1:
        raise InvalidInput(f"number of samples must be >= 1, got {num}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise InvalidInput(f"temperature must be a finite number >= 0, got {temperature}")
    z = np.random.default_rng(seed).standard_normal((num, card.latent_dim), dtype=np.float32)
    return z * np.float32(temperature)


async def sample(device: Device, num: int, seed: int | None = 0, temperature: float = 1.0,
                 limits: Limits = UNLIMITED) -> np.ndarray:
    """`num` new images (B, C, H, W) from z ~ N(0, temperature^2 I), reproducible per seed."""
    if limits.max_items is not None and num > limits.max_items:
        raise TooLarge(f"too many images: n={num} > {limits.max_items} per request")
    _, images = await _decode(device, prior_latents(device.card, num, seed, temperature))
    return images


async def decode(device: Device, z: np.ndarray, limits: Limits = UNLIMITED) -> np.ndarray:
    """Latents (B, latent) -> image means in [0, 1], (B, C, H, W)."""
    _, images = await _decode(device, checked_latents(device.card, z, limits))
    return images


async def decode_params(device: Device, z: np.ndarray, limits: Limits = UNLIMITED) -> np.ndarray:
    """Latents (B, latent) -> the likelihood parameters of p(x|z) (layouts in serve.likelihoods)."""
    params, _ = await _decode(device, checked_latents(device.card, z, limits))
    return params


async def encode(device: Device, x: np.ndarray, limits: Limits = UNLIMITED) -> Posterior:
    """Images (B, C, H, W) in [0, 1] -> q(z|x)."""
    return Posterior(*await _encode(device, checked_images(device.card, x, limits)))


async def reconstruct(device: Device, x: np.ndarray, limits: Limits = UNLIMITED) -> np.ndarray:
    """The decoded posterior mean of each image, (B, C, H, W)."""
    posterior = await encode(device, x, limits)
    _, images = await _decode(device, posterior.mean)
    return images


def interpolate_latents(z_a: np.ndarray, z_b: np.ndarray, steps: int, mode: str = "linear") -> np.ndarray:
    """`steps` latents from z_a to z_b inclusive, (steps, latent): straight line, or slerp (great circle)."""
    if steps < 2:
        raise InvalidInput(f"steps must be >= 2, got {steps}")
    if mode not in ("linear", "slerp"):
        raise InvalidInput(f"mode must be 'linear' or 'slerp', got {mode!r}")
    t = np.linspace(0.0, 1.0, steps)[:, None]
    z_a, z_b = np.asarray(z_a, np.float64), np.asarray(z_b, np.float64)
    if mode == "slerp":
        norms = np.linalg.norm(z_a) * np.linalg.norm(z_b)
        omega = math.acos(float(np.clip(z_a @ z_b / norms, -1.0, 1.0))) if norms > 0 else 0.0
        if omega > 1e-6:  # nearly parallel vectors: slerp tends to the straight line
            return ((np.sin((1 - t) * omega) * z_a + np.sin(t * omega) * z_b) / math.sin(omega)).astype(np.float32)
    return ((1 - t) * z_a + t * z_b).astype(np.float32)


async def interpolate(device: Device, x: np.ndarray, steps: int = 8, mode: str = "linear",
                      limits: Limits = UNLIMITED) -> np.ndarray:
    """Decoded path between the posterior means of two images x = (a, b): (steps, C, H, W), endpoints included."""
    limits.check_count(steps, "steps")
    x = checked_images(device.card, x, limits)
    if len(x) != 2:
        raise InvalidInput(f"interpolate takes exactly 2 images (a, b), got {len(x)}")
    mean, _ = await _encode(device, x)
    _, images = await _decode(device, interpolate_latents(mean[0], mean[1], steps, mode))
    return images


def traverse_latents(z: np.ndarray, dims: list[int] | None, value_range: tuple[float, float], steps: int,
                     latent_dim: int) -> np.ndarray:
    """(len(dims), steps, latent): z with dimension d set to each value in linspace(range, steps)."""
    dims = list(range(latent_dim)) if dims is None else list(dims)
    bad = [d for d in dims if not 0 <= d < latent_dim]
    if bad or not dims:
        raise InvalidInput(f"latent dimensions must lie in [0, {latent_dim}), got {dims}")
    if steps < 2:
        raise InvalidInput(f"steps must be >= 2, got {steps}")
    low, high = value_range
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise InvalidInput(f"range must be two finite numbers low < high, got {value_range}")
    grid = np.repeat(np.asarray(z, np.float32)[None, None], len(dims), 0).repeat(steps, 1)
    for row, d in enumerate(dims):
        grid[row, :, d] = np.linspace(low, high, steps)
    return grid


async def traverse(device: Device, x: np.ndarray, dims: list[int] | None = None,
                   value_range: tuple[float, float] = (-3.0, 3.0), steps: int = 9,
                   limits: Limits = UNLIMITED) -> np.ndarray:
    """Vary each latent dimension in `dims` over `value_range` around the posterior mean of one image x:
    (len(dims), steps, C, H, W)."""
    card = device.card
    posterior = await encode(device, one_image(card, x, "traverse")[None], limits)
    z = traverse_latents(posterior.mean[0], dims, value_range, steps, card.latent_dim).reshape(-1, card.latent_dim)
    images = await decode(device, z, limits)  # checked: a range past MAX_ABS_LATENT is refused like /v1/decode
    return images.reshape(-1, steps, *card.image_shape)


@dataclass(frozen=True)
class Scores:
    """Anomaly scores of a batch, and where in each image they come from."""

    scores: np.ndarray
    """(B,) higher = more anomalous: nats for kind "likelihood", a sum of z-scores for a combination."""
    maps: np.ndarray | None = None
    """(B, H, W) nats per pixel: -log p(x|z) summed over channels, averaged over the z samples (the ELBO's
    reconstruction term, pixel by pixel; each map sums to that term whatever the score)."""
    kind: str = "likelihood"
    """The score computed ("auto" resolved)."""
    warning: str | None = None
    """Why "auto" fell back to the likelihood, for the caller to pass on."""


def score_noise(num_images: int, num_samples: int, latent_dim: int, seed: int) -> np.ndarray:
    """eps for `score`: (num_samples, B, latent), one seeded stream."""
    if num_samples < 1:
        raise InvalidInput(f"num_samples must be >= 1, got {num_samples}")
    return np.random.default_rng(seed).standard_normal((num_samples, num_images, latent_dim), dtype=np.float32)


def bound_from_parts(nll: np.ndarray, mean: np.ndarray, logvar: np.ndarray, eps: np.ndarray, method: str) -> np.ndarray:
    """Negative ELBO or IWAE bound per image (B,) from -log p(x|z_k) (K, B), the posterior and its noise eps."""
    if method not in SCORE_METHODS:
        raise InvalidInput(f"method must be one of {SCORE_METHODS}, got {method!r}")
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


def score_from_parts(x: np.ndarray, mean: np.ndarray, logvar: np.ndarray, eps: np.ndarray, params: np.ndarray,
                     method: str, likelihood: str, likelihood_params: dict) -> np.ndarray:
    """`bound_from_parts` from the decoder's params for z_k (K*B, ...) rather than from -log p(x|z_k)."""
    num_samples, num_images = eps.shape[:2]
    x_repeated = np.broadcast_to(x[None], (num_samples, *x.shape)).reshape(-1, *x.shape[1:])
    nll = negative_log_likelihood(likelihood, params, x_repeated, likelihood_params).reshape(num_samples, num_images)
    return bound_from_parts(nll, mean, logvar, eps, method)


def _finite_scores(scores: np.ndarray) -> np.ndarray:
    if not np.isfinite(scores).all():
        raise NonFiniteOutput(f"{int((~np.isfinite(scores)).sum())} of {len(scores)} scores are not finite: the "
                              "decoder's likelihood parameters do not fit these images", "score")
    return scores


def resolve_score_kind(card: ModelCard, kind: str, complexity: str = "none") -> tuple[str, str | None]:
    """The score `kind` asks for on this model, and a warning when "auto" had to fall back.

    "auto" is the card's default combination (standardised at export; see export.score_statistics) unless the
    caller asked for a complexity-corrected likelihood, or the model was exported without statistics: then
    "likelihood", the bound itself, which ranks simpler inputs as *less* anomalous whatever their class."""
    if kind not in SCORE_KINDS:
        raise InvalidInput(f"score kind must be one of {SCORE_KINDS}, got {kind!r}")
    if complexity not in COMPLEXITY_CORRECTIONS:
        raise InvalidInput(f"complexity must be one of {COMPLEXITY_CORRECTIONS}, got {complexity!r}")
    statistics = card.score_statistics
    if kind == "auto":
        if complexity != "none":
            return "likelihood", None
        if statistics is None:
            return "likelihood", ("this model was exported without anomaly-score statistics, so scores are the "
                                  "negative ELBO, which ranks simple inputs as normal; re-export it to get the "
                                  "default score")
        return statistics.default, None
    if kind != "likelihood":
        if complexity != "none":
            raise InvalidInput(f"complexity={complexity!r} applies to kind='likelihood' only, not {kind!r}")
        if statistics is None or not statistics.supports(kind):
            raise InvalidInput(f"score kind {kind!r} needs statistics this model's card lacks (has: "
                               f"{sorted(statistics.standardiser.means) if statistics else 'none'}); re-export it")
    return kind, None


async def score(device: Device, x: np.ndarray, num_samples: int = 1, method: str = "elbo", seed: int = 0,
                complexity: str = "none", maps: bool = False, limits: Limits = UNLIMITED,
                kind: str = "auto") -> Scores:
    """Anomaly score per image, higher = more anomalous (`resolve_score_kind` picks what "auto" means).

    kind="likelihood": the negative ELBO in nats averaged over `num_samples` draws of z ~ q(z|x) ("elbo"), or
    the importance-weighted bound -log mean_k p(x,z_k)/q(z_k|x) ("iwae"); complexity="png" subtracts each
    image's PNG code length (pipeline.images.png_code_nats). A combination (e.g. "png_mse"): the sum of base
    scores' z-scores under the statistics export stored in the card. `maps`: per-pixel maps too (`Scores`)."""
    kind, warning = resolve_score_kind(device.card, kind, complexity)
    if method not in SCORE_METHODS:
        raise InvalidInput(f"method must be one of {SCORE_METHODS}, got {method!r}")
    if limits.max_score_samples is not None and num_samples > limits.max_score_samples:
        raise InvalidInput(f"num_samples={num_samples} > {limits.max_score_samples}")
    card = device.card
    x = checked_images(card, x, limits)
    if limits.max_score_rows is not None and len(x) * num_samples > limits.max_score_rows:
        raise TooLarge(f"{len(x)} images x num_samples={num_samples} exceeds {limits.max_score_rows} decoder rows")
    eps = score_noise(len(x), num_samples, card.latent_dim, seed)
    mean, logvar = await _encode(device, x)
    z = mean[None] + np.exp(0.5 * logvar)[None] * eps  # (K, B, latent)
    params, _ = await _decode(device, z.reshape(-1, card.latent_dim))
    x_repeated = np.broadcast_to(x[None], (num_samples, *x.shape)).reshape(-1, *x.shape[1:])
    pixel_nll = pixel_negative_log_likelihood(card.likelihood, params, x_repeated, card.likelihood_params)
    pixel_nll = pixel_nll.reshape(num_samples, len(x), *x.shape[1:])  # (K, B, C, H, W)
    scores = bound_from_parts(pixel_nll.reshape(num_samples, len(x), -1).sum(axis=2), mean, logvar, eps, method)
    # PNG encoding (Pillow releases the GIL) off the event loop and the device thread
    if kind != "likelihood":
        _, reconstruction = await _decode(device, mean)
        base = await device.offload(compute_base_scores, COMBINATIONS[kind], scores, x, reconstruction)
        scores = card.score_statistics.apply(base, kind)
    elif complexity == "png":
        scores = scores - await device.offload(png_code_nats, x)
    return Scores(scores, pixel_nll.mean(axis=0).sum(axis=1) if maps else None, kind, warning)
