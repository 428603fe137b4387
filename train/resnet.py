"""A ResNet VAE in the style of diffusers' AutoencoderKL and VDVAE: stages of residual blocks with
GroupNorm + SiLU, halving the resolution between stages down to a small side derived from the
image size, optional self-attention at the lowest resolution, and a dense latent vector or a
spatial latent (C x s x s, what latent-diffusion models are trained on)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from train.config import ModelConfig, stage_sides
from train.model import VAE

MAX_GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (diffusers' default), fewer where the width is not a multiple of 32."""
    return nn.GroupNorm(math.gcd(MAX_GROUPS, channels), channels, eps=1e-6)


def stage_widths(widths: tuple[int, ...], num_stages: int) -> list[int]:
    """Channels at each stage, full resolution first; the last width repeats for further stages."""
    return [widths[min(i, len(widths) - 1)] for i in range(num_stages)]


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))) at constant width (widths change in Down/Upsample).

    The last convolution starts at zero so a block starts as the identity, which keeps deep stacks
    trainable without a warm-up (VDVAE's scaled-down last layer, taken to zero).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(width), nn.Conv2d(width, width, 3, padding=1)
        self.norm2, self.conv2 = group_norm(width), nn.Conv2d(width, width, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class SelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map (AutoencoderKL's mid-block).

    Written as matmul + softmax rather than scaled_dot_product_attention: it exports to plain ONNX
    ops every runtime has, and at the lowest resolution (16-64 tokens) the fused kernel gains nothing.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = group_norm(width)
        self.qkv = nn.Conv2d(width, 3 * width, 1)
        self.out = nn.Conv2d(width, width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, width, height, breadth = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).chunk(3, dim=1)            # each (B, W, HW)
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(width), -1)  # (B, HW, HW)
        h = (v @ weights.transpose(1, 2)).view(batch, width, height, breadth)
        return x + self.out(h)


class Downsample(nn.Conv2d):
    """3x3 convolution with stride 2 to the next stage's width (even sides in, exactly half out)."""

    def __init__(self, in_width: int, out_width: int) -> None:
        super().__init__(in_width, out_width, 3, stride=2, padding=1)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution to the next stage's width (no checkerboard from
    transposed convolutions; changing width here keeps the big full-size maps at the narrow width)."""

    def __init__(self, in_width: int, out_width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_width, out_width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _blocks(width: int, depth: int) -> list[nn.Module]:
    return [ResnetBlock(width) for _ in range(depth)]


def _mid_block(width: int, attention: bool) -> nn.Sequential:
    """Residual block, optional attention, residual block at the lowest resolution."""
    return nn.Sequential(ResnetBlock(width), *([SelfAttention(width)] if attention else []),
                         ResnetBlock(width))


class ResNetVAE(VAE):
    """Encoder: conv in, per stage N residual blocks then a stride-2 down-sampling, mid block,
    GN + SiLU, then dense layers to (mean, logvar) of a latent vector, or (latent_kind=spatial) a
    3x3 convolution to (mean, logvar) of a C x s x s latent. Decoder: the mirror image with x2
    nearest up-sampling, ending in GN + SiLU + a 3x3 convolution to the likelihood's parameters."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        sides = stage_sides(config.image_size, config.lowest_resolution)
        widths = stage_widths(config.widths, len(sides))
        depth, bottom = config.blocks_per_stage, widths[-1]
        self.feature_shape = (bottom, sides[-1], sides[-1])
        features = bottom * sides[-1] ** 2

        down: list[nn.Module] = [nn.Conv2d(config.channels, widths[0], 3, padding=1)]  # (B, w0, S, S)
        for stage, width in enumerate(widths):
            down += _blocks(width, depth)
            if stage < len(widths) - 1:
                down.append(Downsample(width, widths[stage + 1]))               # (B, w', side/2, side/2)
        if config.latent_kind == "spatial":
            # z is (C, s, s), flattened channel-major at the edges so every consumer of a latent
            # vector (KL, sampling, export, serve) works unchanged; model.json records the shape
            head: list[nn.Module] = [nn.Conv2d(bottom, 2 * config.latent_channels, 3, padding=1),
                                     nn.Flatten()]                              # (B, 2 * C * s * s)
            decoder_in = [nn.Unflatten(1, self.latent_shape),
                          nn.Conv2d(config.latent_channels, bottom, 3, padding=1)]  # (B, w_last, s, s)
        else:
            head = [nn.Flatten(), nn.Linear(features, config.hidden_dim), nn.SiLU(),
                    nn.Linear(config.hidden_dim, 2 * config.latent_dim)]        # (B, 2 * latent)
            decoder_in = [nn.Linear(config.latent_dim, config.hidden_dim), nn.SiLU(),
                          nn.Linear(config.hidden_dim, features),
                          nn.Unflatten(1, self.feature_shape)]                  # (B, w_last, s, s)
        self.encoder = nn.Sequential(*down, _mid_block(bottom, config.attention), group_norm(bottom), nn.SiLU(),
                                     *head)
        self.decoder_in = nn.Sequential(*decoder_in)

        up: list[nn.Module] = [_mid_block(bottom, config.attention)]
        for stage in reversed(range(len(widths))):
            up += _blocks(widths[stage], depth)
            if stage > 0:
                up.append(Upsample(widths[stage], widths[stage - 1]))          # (B, w', 2 side, 2 side)
        last = nn.Conv2d(widths[0], self.num_param_channels, 3, padding=1)     # (B, P, S, S)
        self.decoder_conv = nn.Sequential(*up, group_norm(widths[0]), nn.SiLU(), last)
        self._init_output_bias(last)

    def decode_features(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder_conv(self.decoder_in(z))
