"""The negative ELBO, per image in nats, always reduced in fp32."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from train.model import DiagonalGaussian


@dataclass
class LossTerms:
    """Per-image terms (B,) in nats: recon = -log p(x|z), kl = KL(q(z|x) || p(z))."""

    recon: torch.Tensor
    kl: torch.Tensor

    def negative_elbo(self, beta: float = 1.0) -> torch.Tensor:
        return self.recon + beta * self.kl


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) per image: binary cross-entropy on logits summed over pixels (fp32).

    Logits rather than probabilities: autocast refuses `binary_cross_entropy` on CUDA, and the
    logits form is stable where sigmoid saturates.
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none")
    return bce.flatten(1).sum(dim=1)


def vae_loss(logits: torch.Tensor, x: torch.Tensor, posterior: DiagonalGaussian) -> LossTerms:
    """Reconstruction and KL terms for a batch."""
    return LossTerms(recon=bernoulli_nll(logits, x), kl=posterior.kl())
