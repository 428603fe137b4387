"""Likelihoods p(x|z) and the negative ELBO, per image in nats, always reduced in fp32.

Parameter layouts (the contract export/ and serve/ build on; pixels x are in [0, 1]):
  bernoulli:            params = logits (B, C, H, W)
  gaussian:             params = mean (B, C, H, W); sigma is the constant model.gaussian_sigma
  gaussian_learned:     params = [mean, log_sigma] on the channel axis (B, 2C, H, W)
  discretized_logistic: params = [mean, log_scale] on the channel axis (B, 2C, H, W), 8-bit bins of
                        width 1/255 centred on k/255; the edge bins extend to -inf / +inf (PixelCNN++).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Log-scale bounds: below e^-7 a pixel's density spikes and one bin's rounding error dominates the
# loss (PixelCNN++ uses the same floor); above e^3 a unit-range pixel carries no information.
from train.model import LOG_SCALE_MAX, LOG_SCALE_MIN, DiagonalGaussian

HALF_BIN = 0.5 / 255.0


@dataclass
class LossTerms:
    """Per-image terms (B,) in nats: recon = -log p(x|z), kl = KL(q(z|x) || p(z))."""

    recon: torch.Tensor
    kl: torch.Tensor

    def negative_elbo(self, beta: float = 1.0) -> torch.Tensor:
        return self.recon + beta * self.kl


def param_channels(likelihood: str, channels: int) -> int:
    """Channels `decode` returns for a likelihood over `channels`-channel images."""
    return 2 * channels if likelihood in ("gaussian_learned", "discretized_logistic") else channels


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


def reconstruction_nll(params: torch.Tensor, x: torch.Tensor, likelihood: str = "bernoulli",
                       gaussian_sigma: float = 0.1) -> torch.Tensor:
    """-log p(x|z) per image (B,) in nats, fp32, for any likelihood's parameter layout."""
    if likelihood == "bernoulli":
        return bernoulli_nll(params, x)
    if likelihood == "gaussian":
        return gaussian_nll(params, math.log(gaussian_sigma), x)
    mean, log_scale = params.chunk(2, dim=1)
    if likelihood == "gaussian_learned":
        return gaussian_nll(mean, log_scale.float().clamp(LOG_SCALE_MIN, LOG_SCALE_MAX), x)
    if likelihood == "discretized_logistic":
        return discretized_logistic_nll(mean, log_scale, x)
    raise ValueError(f"unknown likelihood {likelihood!r}")


def image_mean(params: torch.Tensor, likelihood: str = "bernoulli") -> torch.Tensor:
    """Likelihood parameters -> pixel means E[x|z] clipped to [0, 1] (the mode for the logistic)."""
    if likelihood == "bernoulli":
        return torch.sigmoid(params)
    if likelihood == "gaussian":
        return params.clamp(0.0, 1.0)
    return params.chunk(2, dim=1)[0].clamp(0.0, 1.0)


def vae_loss(params: torch.Tensor, x: torch.Tensor, posterior: DiagonalGaussian,
             likelihood: str = "bernoulli", gaussian_sigma: float = 0.1) -> LossTerms:
    """Reconstruction and KL terms for a batch."""
    return LossTerms(recon=reconstruction_nll(params, x, likelihood, gaussian_sigma), kl=posterior.kl())


def training_objective(terms: LossTerms, posterior: DiagonalGaussian, *, beta: float,
                       free_bits: float) -> torch.Tensor:
    """Mean over the batch of recon + beta * KL, the KL floored per latent unit when free bits are on.

    Free bits (Kingma et al. 2016): each unit's batch-mean KL below `free_bits` nats costs nothing,
    so the optimiser cannot win by collapsing units to the prior early on.
    """
    if free_bits <= 0:
        return terms.negative_elbo(beta).mean()
    kl_per_unit = posterior.kl_per_unit().mean(dim=0)  # (latent,)
    return terms.recon.mean() + beta * kl_per_unit.clamp_min(free_bits).sum()
