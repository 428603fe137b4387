"""Likelihoods p(x|z) as objects: each knows its parameter layout, how the decoder's output bias
starts, its negative log-likelihood, the image mean and the constants an export writes into
model.json (`likelihood_params`). `likelihood_for(model_config)` picks one by its config name.

Parameter layouts (the contract export/ and serve/ build on; pixels x are in [0, 1]):
  bernoulli:            params = logits (B, C, H, W)
  gaussian:             params = mean (B, C, H, W); sigma is the constant model.gaussian_sigma
  gaussian_learned:     params = [mean, log_sigma] on the channel axis (B, 2C, H, W)
  discretized_logistic: params = [mean, log_scale] on the channel axis (B, 2C, H, W), 8-bit bins of
                        width 1/255 centred on k/255; the edge bins extend to -inf / +inf (PixelCNN++).
serve/likelihoods.py holds the numpy twins under the same names (tests/test_serve_runtime.py pins them).
NLLs are per image (B,) in nats, always reduced in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from train.config import ModelConfig

# Log-scale bounds: below e^-7 a pixel's density spikes and one bin's rounding error dominates the
# loss (PixelCNN++ uses the same floor); above e^3 a unit-range pixel carries no information.
LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 3.0
HALF_BIN = 0.5 / 255.0


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) per image: binary cross-entropy on logits summed over pixels (fp32).

    Logits rather than probabilities: autocast refuses `binary_cross_entropy` on CUDA, and the
    logits form is stable where sigmoid saturates.
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none")
    return bce.flatten(1).sum(dim=1)


def gaussian_nll(mean: torch.Tensor, log_sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """-log N(x; mean, sigma^2) per image, summed over pixels (a density: nats, not a probability)."""
    mean, x = mean.float(), x.float()
    log_sigma = log_sigma.float() if isinstance(log_sigma, torch.Tensor) else torch.tensor(log_sigma)
    nll = 0.5 * ((x - mean) * torch.exp(-log_sigma)).pow(2) + log_sigma + 0.5 * math.log(2 * math.pi)
    return nll.flatten(1).sum(dim=1)


def discretized_logistic_nll(mean: torch.Tensor, log_scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log P(x) per image for 8-bit pixels x = k/255 under a logistic discretised into 256 bins."""
    mean, x = mean.float(), x.float()
    log_scale = log_scale.float().clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
    inv_scale = torch.exp(-log_scale)
    centred = x - mean
    upper = (centred + HALF_BIN) * inv_scale
    lower = (centred - HALF_BIN) * inv_scale
    log_cdf_upper = F.logsigmoid(upper)                # log sigmoid(upper), for the x = 0 bin
    log_one_minus_cdf_lower = -F.softplus(lower)       # log (1 - sigmoid(lower)), for the x = 1 bin
    mass = torch.sigmoid(upper) - torch.sigmoid(lower)
    # When a bin's mass underflows, use the density at its centre times the bin width instead
    # (log pdf(c) = c - log_scale - 2 softplus(c)); it is what the difference tends to.
    middle = centred * inv_scale
    log_pdf_mid = middle - log_scale - 2.0 * F.softplus(middle) + math.log(2 * HALF_BIN)
    log_mass = torch.where(mass > 1e-5, torch.log(mass.clamp_min(1e-12)), log_pdf_mid)
    log_prob = torch.where(x < HALF_BIN, log_cdf_upper,
                           torch.where(x > 1 - HALF_BIN, log_one_minus_cdf_lower, log_mass))
    return -log_prob.flatten(1).sum(dim=1)


class Likelihood:
    """p(x|z) for images of C channels, given the decoder's parameters (B, params_per_channel * C, H, W)."""

    name: ClassVar[str]
    params_per_channel: ClassVar[int] = 1

    def param_channels(self, channels: int) -> int:
        """Channels `decode` returns for `channels`-channel images."""
        return self.params_per_channel * channels

    def init_output_bias(self, bias: torch.Tensor, channels: int) -> None:
        """Start the decoder's last bias where this likelihood trains well (default: as PyTorch left it)."""

    def constrain(self, params: torch.Tensor) -> torch.Tensor:
        """Bounds applied inside `decode`, so what consumers (and the export) see is what the loss used."""
        return params

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) per image (B,) in nats, fp32."""
        raise NotImplementedError

    def image_mean(self, params: torch.Tensor) -> torch.Tensor:
        """Parameters -> pixel means E[x|z] clipped to [0, 1] (the mode for the logistic)."""
        raise NotImplementedError

    def constants(self) -> dict[str, float]:
        """Constants of p(x|z) that are not in `decode`'s output: model.json's likelihood_params."""
        return {}

    @classmethod
    def from_config(cls, config: ModelConfig) -> Likelihood:
        return cls()


def _start_at_mid_grey(bias: torch.Tensor, channels: int) -> None:
    # the mean at mid-grey and the scale (when learned) at about e^-2 = 1/8, not at the edges of [0, 1]
    with torch.no_grad():
        bias.zero_()
        bias[:channels] = 0.5
        bias[channels:] = -2.0


@dataclass(frozen=True)
class Bernoulli(Likelihood):
    name = "bernoulli"

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return bernoulli_nll(params, x)

    def image_mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)


@dataclass(frozen=True)
class Gaussian(Likelihood):
    """Fixed standard deviation `sigma` (pixels in [0, 1])."""

    sigma: float = 0.1
    name = "gaussian"

    @classmethod
    def from_config(cls, config: ModelConfig) -> Gaussian:
        return cls(sigma=config.gaussian_sigma)

    def init_output_bias(self, bias: torch.Tensor, channels: int) -> None:
        _start_at_mid_grey(bias, channels)

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return gaussian_nll(params, math.log(self.sigma), x)

    def image_mean(self, params: torch.Tensor) -> torch.Tensor:
        return params.clamp(0.0, 1.0)

    def constants(self) -> dict[str, float]:
        return {"sigma": self.sigma}


class _MeanAndLogScale(Likelihood):
    """Layouts of [mean, log_scale] on the channel axis, the log-scale bounded in `constrain`."""

    params_per_channel = 2

    def init_output_bias(self, bias: torch.Tensor, channels: int) -> None:
        _start_at_mid_grey(bias, channels)

    def constrain(self, params: torch.Tensor) -> torch.Tensor:
        mean, log_scale = params.chunk(2, dim=1)
        return torch.cat([mean, log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)], dim=1)

    def image_mean(self, params: torch.Tensor) -> torch.Tensor:
        return params.chunk(2, dim=1)[0].clamp(0.0, 1.0)


@dataclass(frozen=True)
class LearnedGaussian(_MeanAndLogScale):
    name = "gaussian_learned"

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mean, log_sigma = params.chunk(2, dim=1)
        return gaussian_nll(mean, log_sigma.float().clamp(LOG_SCALE_MIN, LOG_SCALE_MAX), x)


@dataclass(frozen=True)
class DiscretizedLogistic(_MeanAndLogScale):
    name = "discretized_logistic"

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mean, log_scale = params.chunk(2, dim=1)
        return discretized_logistic_nll(mean, log_scale, x)

    def constants(self) -> dict[str, float]:
        return {"bin_width": 1 / 255}


# model.likelihood names -> classes; serve.likelihoods.LIKELIHOODS has the same keys.
LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls for cls in (Bernoulli, Gaussian, LearnedGaussian, DiscretizedLogistic)}


def likelihood_for(config: ModelConfig) -> Likelihood:
    """The likelihood a model config names (`model.likelihood`), with its constants."""
    if config.likelihood not in LIKELIHOODS:
        raise ValueError(f"model.likelihood: expected one of {', '.join(LIKELIHOODS)}, got {config.likelihood!r}")
    return LIKELIHOODS[config.likelihood].from_config(config)
