"""The negative ELBO, per image in nats, and the training objective built on it (fp32).

The likelihood's part, -log p(x|z), is the model's `likelihood` object (train.likelihood).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.likelihood import Bernoulli, Likelihood
from train.model import DiagonalGaussian


@dataclass
class LossTerms:
    """Per-image terms (B,) in nats: recon = -log p(x|z), kl = KL(q(z|x) || p(z))."""

    recon: torch.Tensor
    kl: torch.Tensor

    def negative_elbo(self, beta: float = 1.0) -> torch.Tensor:
        return self.recon + beta * self.kl


def vae_loss(params: torch.Tensor, x: torch.Tensor, posterior: DiagonalGaussian,
             likelihood: Likelihood = Bernoulli()) -> LossTerms:
    """Reconstruction and KL terms for a batch (`likelihood`: the model's, `model.likelihood`)."""
    return LossTerms(recon=likelihood.nll(params, x), kl=posterior.kl())


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
