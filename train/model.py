"""A convolutional VAE: encode(x) -> DiagonalGaussian, decode(z) -> Bernoulli logits."""

from __future__ import annotations

import math

import torch
from torch import nn

from train.config import ModelConfig

# exp(logvar) outside [e^-30, e^20] only ever comes from a diverging step; clamping keeps the KL
# and the reparameterised sample finite so the non-finite guard sees the real cause.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), the posterior `encode` returns."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised z = mean + std * eps, differentiable in mean and logvar."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per item, summed over latent dimensions (nats), in fp32."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) per item (nats)."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return -0.5 * torch.sum(
            math.log(2 * math.pi) + logvar + (z.float() - mean).pow(2) / logvar.exp(), dim=1)


class ConvVAE(nn.Module):
    """Two stride-2 convolutions down, a dense bottleneck, two transposed convolutions up."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        width1, width2 = config.widths
        side = config.image_size // 4
        self.feature_shape = (width2, side, side)
        features = width2 * side * side
        self.encoder = nn.Sequential(
            nn.Conv2d(config.channels, width1, 4, stride=2, padding=1), nn.SiLU(),  # (B, w1, S/2, S/2)
            nn.Conv2d(width1, width2, 4, stride=2, padding=1), nn.SiLU(),           # (B, w2, S/4, S/4)
            nn.Flatten(),
            nn.Linear(features, config.hidden_dim), nn.SiLU(),
            nn.Linear(config.hidden_dim, 2 * config.latent_dim),                    # (B, 2 * latent)
        )
        self.decoder_dense = nn.Sequential(
            nn.Linear(config.latent_dim, config.hidden_dim), nn.SiLU(),
            nn.Linear(config.hidden_dim, features), nn.SiLU(),
        )
        self.decoder_conv = nn.Sequential(
            nn.ConvTranspose2d(width2, width1, 4, stride=2, padding=1), nn.SiLU(),  # (B, w1, S/2, S/2)
            nn.ConvTranspose2d(width1, config.channels, 4, stride=2, padding=1),    # (B, C, S, S) logits
        )

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images in [0, 1], (B, C, H, W) -> q(z|x)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent) -> Bernoulli logits (B, C, H, W)."""
        features = self.decoder_dense(z).view(-1, *self.feature_shape)
        return self.decoder_conv(features)

    def image_mean(self, params: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters from `decode` -> the image mean E[x|z] in [0, 1]."""
        return torch.sigmoid(params)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


def build_model(config: ModelConfig) -> ConvVAE:
    """The model a ModelConfig describes."""
    return ConvVAE(config)
