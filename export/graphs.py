"""The two deterministic graphs that leave the project: encoder and decoder."""

from __future__ import annotations

import torch
from torch import nn

from train.model import ConvVAE


class EncoderGraph(nn.Module):
    """x in [0, 1], (B, C, H, W) -> (mean, logvar), each (B, latent). No sampling inside."""

    def __init__(self, model: ConvVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.model.encode(x)
        return posterior.mean, posterior.logvar


class DecoderGraph(nn.Module):
    """z, (B, latent) -> (logits, probs), each (B, C, H, W): Bernoulli parameters and image mean."""

    def __init__(self, model: ConvVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.decode(z)
        return logits, torch.sigmoid(logits)
