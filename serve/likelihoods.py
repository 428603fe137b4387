"""Per-image negative log-likelihoods -log p(x|z) in numpy, one per layout the decoder can emit.

The layouts are train's (see the likelihood names in model.json):
  bernoulli:            params = logits (B, C, H, W)
  gaussian:             params = mean (B, C, H, W), fixed sigma in likelihood_params["sigma"]
  gaussian_learned:     params (B, 2C, H, W) = [mean, log_sigma] on the channel axis
  discretized_logistic: params (B, 2C, H, W) = [mean in [0, 1], log_scale]; 256 bins of width 1/255,
                        the edge bins extending to -inf / +inf (PixelCNN++ style)
Every function returns nats per pixel (B, C, H, W), computed in float64; `negative_log_likelihood` sums
them per image, `pixel_negative_log_likelihood` keeps them (the anomaly maps of `serve.ops.score`).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from export.model_card import PARAMS_PER_CHANNEL  # noqa: F401  (the layouts' channel counts, with the names)

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
BIN_HALF_WIDTH = 0.5 / 255.0


def _softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + e^x) without overflow."""
    return np.logaddexp(0.0, x)


def _split_channels(params: np.ndarray, x: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    channels = x.shape[1]
    if params.shape[1] != 2 * channels or params.shape[2:] != x.shape[2:]:
        raise ValueError(f"{name}: expected params of shape (B, {2 * channels}, {x.shape[2]}, {x.shape[3]}) "
                         f"for images {x.shape}, got {params.shape}")
    return params[:, :channels], params[:, channels:]


def bernoulli_nll(params: np.ndarray, x: np.ndarray, **_: float) -> np.ndarray:
    """Binary cross-entropy on logits: softplus(l) - x l, stable for any logit."""
    logits = params.astype(np.float64)
    return _softplus(logits) - x * logits


def gaussian_nll(params: np.ndarray, x: np.ndarray, *, sigma: float = 1.0, **_: float) -> np.ndarray:
    """Gaussian with a fixed sigma from model.json."""
    if not sigma > 0:
        raise ValueError(f"gaussian likelihood: sigma must be > 0, got {sigma}")
    mean = params.astype(np.float64)
    return 0.5 * ((x - mean) / sigma) ** 2 + math.log(sigma) + HALF_LOG_2PI


def gaussian_learned_nll(params: np.ndarray, x: np.ndarray, **_: float) -> np.ndarray:
    """Gaussian whose per-pixel log sigma is the second half of the channels."""
    mean, log_sigma = _split_channels(params.astype(np.float64), x, "gaussian_learned")
    return 0.5 * ((x - mean) * np.exp(-log_sigma)) ** 2 + log_sigma + HALF_LOG_2PI


def _log_sigmoid_difference(upper: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """log(sigmoid(upper) - sigmoid(lower)) for upper > lower, exact without cancellation.

    sigmoid(a) - sigmoid(b) = e^a (1 - e^(b-a)) / ((1 + e^a)(1 + e^b)).
    """
    return upper + np.log(-np.expm1(lower - upper)) - _softplus(upper) - _softplus(lower)


def discretized_logistic_nll(params: np.ndarray, x: np.ndarray, **_: float) -> np.ndarray:
    """8-bit discretised logistic: -log P(bin of x); bins at 0 and 1 extend to -inf and +inf."""
    mean, log_scale = _split_channels(params.astype(np.float64), x, "discretized_logistic")
    x = np.rint(np.clip(x, 0.0, 1.0) * 255.0) / 255.0  # the pixel's 8-bit bin centre
    inv_scale = np.exp(-log_scale)
    upper = inv_scale * (x - mean + BIN_HALF_WIDTH)
    lower = inv_scale * (x - mean - BIN_HALF_WIDTH)
    with np.errstate(divide="ignore"):  # only a zero-width scale reaches log(0); it reads -inf
        log_probability = np.where(
            x <= 0.0, -_softplus(-upper),                        # log sigmoid(upper): the 0 bin
            np.where(x >= 1.0, -_softplus(lower),                # log (1 - sigmoid(lower)): the 255 bin
                     _log_sigmoid_difference(upper, lower)))
    return -log_probability


LIKELIHOODS: dict[str, Callable[..., np.ndarray]] = {
    "bernoulli": bernoulli_nll,
    "gaussian": gaussian_nll,
    "gaussian_learned": gaussian_learned_nll,
    "discretized_logistic": discretized_logistic_nll,
}

assert set(LIKELIHOODS) == set(PARAMS_PER_CHANNEL), "the model card and serve must know the same likelihoods"


def pixel_negative_log_likelihood(name: str, params: np.ndarray, x: np.ndarray,
                                  likelihood_params: dict | None = None) -> np.ndarray:
    """-log p(x|z) per pixel (B, C, H, W) in nats for the likelihood `name` named in model.json."""
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r} in model.json; serve knows {sorted(LIKELIHOODS)}")
    if params.shape[0] != x.shape[0]:
        raise ValueError(f"{params.shape[0]} parameter sets for {x.shape[0]} images")
    return LIKELIHOODS[name](params, x.astype(np.float64), **(likelihood_params or {}))


def negative_log_likelihood(name: str, params: np.ndarray, x: np.ndarray,
                            likelihood_params: dict | None = None) -> np.ndarray:
    """-log p(x|z) per image (B,) in nats: the per-pixel values summed."""
    nll = pixel_negative_log_likelihood(name, params, x, likelihood_params)
    return nll.reshape(nll.shape[0], -1).sum(axis=1)
