"""A convolutional VAE: encode(x) -> DiagonalGaussian, decode(z) -> likelihood parameters."""

from __future__ import annotations

import math

import torch
from torch import nn

from train.config import ModelConfig, latent_shape

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

    def kl_per_unit(self) -> torch.Tensor:
        """KL(q || N(0, I)) per item and latent unit (B, latent), in fp32 (for free bits)."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) per item (nats)."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return -0.5 * torch.sum(
            math.log(2 * math.pi) + logvar + (z.float() - mean).pow(2) / logvar.exp(), dim=1)


# Bounds on the log-scale channels of gaussian_learned / discretized_logistic, applied in decode so
# the parameters consumers see are the ones the loss used (see train.loss).
LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 3.0


def _stage(width: int, num_blocks: int, residual: bool) -> list[nn.Module]:
    return [ResidualBlock(width) if residual else PlainBlock(width) for _ in range(num_blocks)]


class PlainBlock(nn.Sequential):
    """3x3 convolution and activation at constant resolution."""

    def __init__(self, width: int) -> None:
        super().__init__(nn.Conv2d(width, width, 3, padding=1), nn.SiLU())


class ResidualBlock(nn.Module):
    """x + conv(act(conv(act(x)))), the last convolution zero-initialised so a block starts as identity."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VAE(nn.Module):
    """What every architecture shares: `encoder` maps images to (B, 2 * latent) posterior
    parameters, `decode_features` maps z to raw likelihood parameters; this class turns those into
    the posterior object, bounds the log-scales and knows the likelihood's constants."""

    config: ModelConfig
    encoder: nn.Module
    num_param_channels: int
    latent_shape: tuple[int, ...]
    """(latent_dim,) for a dense latent, (C, h, w) for a spatial one (z is always passed flattened)."""

    def _init_output_bias(self, last: nn.Conv2d | nn.ConvTranspose2d) -> None:
        if self.config.likelihood in ("gaussian", "gaussian_learned", "discretized_logistic"):
            # start the mean at mid-grey and the scale at about 1/8, not at the edges of [0, 1]
            nn.init.zeros_(last.bias)
            with torch.no_grad():
                last.bias[: self.config.channels] = 0.5
                if self.num_param_channels > self.config.channels:
                    last.bias[self.config.channels:] = -2.0

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images in [0, 1], (B, C, H, W) -> q(z|x)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode_features(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent) -> likelihood parameters (B, C or 2C, H, W); layouts in train.loss."""
        params = self.decode_features(z)
        if self.num_param_channels > self.config.channels:
            mean, log_scale = params.chunk(2, dim=1)
            params = torch.cat([mean, log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)], dim=1)
        return params

    def image_mean(self, params: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters from `decode` -> the image mean E[x|z] in [0, 1]."""
        from train.loss import image_mean

        return image_mean(params, self.config.likelihood)

    def likelihood_params(self) -> dict[str, float]:
        """Constants of the likelihood that are not in `decode`'s output (for model.json)."""
        if self.config.likelihood == "gaussian":
            return {"sigma": self.config.gaussian_sigma}
        if self.config.likelihood == "discretized_logistic":
            return {"bin_width": 1 / 255}
        return {}

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


class ConvVAE(VAE):
    """Two stride-2 convolutions down (with optional blocks at each resolution), a dense
    bottleneck, and the mirror image up to the likelihood's parameters (the `conv` preset)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        from train.loss import param_channels  # loss imports this module; import at build time

        self.config = config
        width1, width2 = config.widths
        depth, residual = config.blocks_per_stage, config.residual
        side = config.image_size // 4
        self.feature_shape = (width2, side, side)
        self.latent_shape = latent_shape(config)
        features = width2 * side * side
        self.num_param_channels = param_channels(config.likelihood, config.channels)
        self.encoder = nn.Sequential(
            nn.Conv2d(config.channels, width1, 4, stride=2, padding=1), nn.SiLU(),  # (B, w1, S/2, S/2)
            *_stage(width1, depth, residual),
            nn.Conv2d(width1, width2, 4, stride=2, padding=1), nn.SiLU(),           # (B, w2, S/4, S/4)
            *_stage(width2, depth, residual),
            nn.Flatten(),
            nn.Linear(features, config.hidden_dim), nn.SiLU(),
            nn.Linear(config.hidden_dim, 2 * config.latent_dim),                    # (B, 2 * latent)
        )
        self.decoder_dense = nn.Sequential(
            nn.Linear(config.latent_dim, config.hidden_dim), nn.SiLU(),
            nn.Linear(config.hidden_dim, features), nn.SiLU(),
        )
        self.decoder_conv = nn.Sequential(
            *_stage(width2, depth, residual),
            nn.ConvTranspose2d(width2, width1, 4, stride=2, padding=1), nn.SiLU(),  # (B, w1, S/2, S/2)
            *_stage(width1, depth, residual),
            nn.ConvTranspose2d(width1, self.num_param_channels, 4, stride=2, padding=1),  # (B, P, S, S)
        )
        self._init_output_bias(self.decoder_conv[-1])

    def decode_features(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder_conv(self.decoder_dense(z).view(-1, *self.feature_shape))


def build_model(config: ModelConfig) -> VAE:
    """The model a ModelConfig describes (`model.architecture`: conv or resnet)."""
    if config.architecture == "resnet":
        from train.resnet import ResNetVAE

        return ResNetVAE(config)
    return ConvVAE(config)
