"""A convolutional VAE: encode(x) -> DiagonalGaussian, decode(z) -> likelihood parameters.

`save_pretrained(dir)` / `VAE.from_pretrained(dir)` keep a model as model.safetensors (the weights,
data only) and config.json (its ModelConfig), as Hugging Face models do.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from train.config import ModelConfig, latent_shape
from train.likelihood import Likelihood, likelihood_for

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

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
    the posterior object and, through `likelihood`, bounded parameters and image means."""

    config: ModelConfig
    likelihood: Likelihood
    encoder: nn.Module
    num_param_channels: int
    latent_shape: tuple[int, ...]
    """(latent_dim,) for a dense latent, (C, h, w) for a spatial one (z is always passed flattened)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.likelihood = likelihood_for(config)
        self.num_param_channels = self.likelihood.param_channels(config.channels)
        self.latent_shape = latent_shape(config)

    def _init_output_bias(self, last: nn.Conv2d | nn.ConvTranspose2d) -> None:
        self.likelihood.init_output_bias(last.bias, self.config.channels)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images in [0, 1], (B, C, H, W) -> q(z|x)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode_features(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent) -> likelihood parameters (B, C or 2C, H, W); layouts in train.likelihood."""
        return self.likelihood.constrain(self.decode_features(z))

    def image_mean(self, params: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters from `decode` -> the image mean E[x|z] in [0, 1]."""
        return self.likelihood.image_mean(params)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write DIR/model.safetensors (weights) and DIR/config.json (the ModelConfig); returns DIR.

        Each file is written under a temporary name and renamed, so a reader never sees half of one.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()}
        temporary = directory / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
        save_file(weights, str(temporary), metadata={"format": "pt"})
        os.replace(temporary, directory / WEIGHTS_FILE)
        temporary = directory / f".{CONFIG_FILE}.tmp-{os.getpid()}"
        temporary.write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        os.replace(temporary, directory / CONFIG_FILE)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VAE:
        """The model `save_pretrained` wrote to DIR, in eval mode; bad files are a ValueError naming them."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from train.config import ConfigError, config_from_dict

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(f"{directory}: expected {CONFIG_FILE} and {WEIGHTS_FILE} "
                                    "(a directory written by save_pretrained)")
        try:
            config = config_from_dict({"model": json.loads(config_path.read_text())}).model
        except (json.JSONDecodeError, ConfigError, TypeError, AttributeError) as error:
            raise ValueError(f"{config_path}: not a model config ({error})") from error
        model = build_model(config)
        if not isinstance(model, cls):
            raise TypeError(f"{config_path} describes a {type(model).__name__}, not a {cls.__name__}")
        try:
            model.load_state_dict(load_file(str(weights_path)))
        except (SafetensorError, RuntimeError) as error:
            raise ValueError(f"{weights_path} does not hold the weights {config_path} describes: {error}") from error
        return model.eval()


class ConvVAE(VAE):
    """Two stride-2 convolutions down (with optional blocks at each resolution), a dense
    bottleneck, and the mirror image up to the likelihood's parameters (the `conv` preset)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        width1, width2 = config.widths
        depth, residual = config.blocks_per_stage, config.residual
        side = config.image_size // 4
        self.feature_shape = (width2, side, side)
        features = width2 * side * side
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
