"""The two deterministic graphs that leave the project: encoder and decoder."""

from __future__ import annotations

import torch
from torch import nn

from train.model import VAE


class EncoderGraph(nn.Module):
    """x in [0, 1], (B, C, H, W) -> (mean, logvar), each (B, latent). No sampling inside."""

    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.model.encode(x)
        return posterior.mean, posterior.logvar


class DecoderGraph(nn.Module):
    """z, (B, latent) -> (likelihood parameters, image mean in [0, 1]); Bernoulli: (logits, probs)."""

    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.model.decode(z)
        return params, self.model.image_mean(params)
