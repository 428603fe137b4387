"""Scoring shared by the likelihood benchmarks: the IWAE bound in nats and bits/dim on a fixed image set,
checkpoints along a run, a fixed-scale discretised logistic around a peer's mean decoder, and grids.

All scores go through train.evaluate.iwae_log_likelihood, so every model in a table is scored by the
same estimator on the same images with the same random numbers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.images import nchw_to_nhwc, save_grid
from pipeline.loader import iter_eval_batches, open_split
from train.evaluate import iwae_log_likelihood, sample_grid_images
from train.likelihood import LOG_SCALE_MAX, LOG_SCALE_MIN, DiscretizedLogistic, discretized_logistic_nll

LN2 = math.log(2.0)


def read_split(shards: str | Path, split: str) -> torch.Tensor:
    """Every image of a split in shard order, uint8 (N, C, H, W)."""
    chunks = [images[mask] for images, _, mask in
              iter_eval_batches(open_split(str(shards), split), batch_size=500, rank=0, world_size=1)]
    return torch.cat(chunks)


def fixed_subset(num_images: int, size: int, seed: int = 0) -> torch.Tensor:
    """Indices of a fixed random subset (the same for every model and checkpoint), sorted."""
    if size >= num_images:
        return torch.arange(num_images)
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def iwae_nats(model: nn.Module, x: torch.Tensor, *, k: int, batch: int = 50, chunk: int = 100,
              seed: int = 7) -> float:
    """Mean IWAE bound -log p(x) (nats per image, an upper bound on the NLL) over float images x in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(x), batch):
            part = x[start:start + batch]
            total -= iwae_log_likelihood(model, part, num_samples=k, chunk=min(chunk, k),
                                         generator=generator).sum().item()
    return total / len(x)


def bits_per_dim(nats_per_image: float, dims_per_image: int) -> float:
    return nats_per_image / (dims_per_image * LN2)


class FixedScaleLogistic(nn.Module):
    """A peer's mean decoder (Bernoulli/MSE-trained, pixel means in [0, 1]) as a discretised logistic
    over 8-bit pixels, centred on its mean with one log-scale for every pixel.

    Exposes what train.evaluate needs (encode, decode -> [mean, log_scale], image_mean, likelihood), so a
    peer is scored by exactly our estimator. `mean_decoder(z)` returns pixel means in [0, 1].
    """

    def __init__(self, net: nn.Module, mean_decoder, log_scale: float) -> None:
        super().__init__()
        self.net, self.mean_decoder, self.log_scale = net, mean_decoder, float(log_scale)
        self.config = dataclasses.replace(net.config, likelihood="discretized_logistic")
        self.likelihood = DiscretizedLogistic()

    def encode(self, x: torch.Tensor):
        return self.net.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        mean = self.mean_decoder(z).float()
        return torch.cat([mean, torch.full_like(mean, self.log_scale)], dim=1)  # (B, 2C, H, W)

    def image_mean(self, params: torch.Tensor) -> torch.Tensor:
        return self.likelihood.image_mean(params)


@torch.no_grad()
def fit_log_scale(net: nn.Module, mean_decoder, x_train: torch.Tensor, seed: int = 3) -> float:
    """The one log-scale that maximises the mean one-sample reconstruction likelihood on training images.

    Generous to the peer: fitted per checkpoint, on data of the training split, over a 0.05 grid of the
    whole range our own decoder may use.
    """
    generator = torch.Generator().manual_seed(seed)
    means = []
    for start in range(0, len(x_train), 250):
        posterior = net.encode(x_train[start:start + 250])
        means.append(mean_decoder(posterior.sample(generator)).float())
    mean = torch.cat(means)
    grid = torch.arange(LOG_SCALE_MIN, LOG_SCALE_MAX + 1e-9, 0.05)
    nll = torch.stack([discretized_logistic_nll(mean, torch.full_like(mean, float(s)), x_train).mean()
                       for s in grid])
    return float(grid[int(nll.argmin())])


def write_grids(model: nn.Module, x: torch.Tensor, prefix: str | Path, seed: int = 0) -> list[str]:
    """PNG grids of 64 samples and of 32 (original, reconstruction) pairs: PREFIX_samples.png, PREFIX_recons.png."""
    samples, pairs = sample_grid_images(model, x[:32], num_samples=64, seed=seed)
    paths = [save_grid(samples, f"{prefix}_samples.png", num_cols=8, scale=3 if x.shape[-1] < 48 else 1),
             save_grid(pairs, f"{prefix}_recons.png", num_cols=8, scale=3 if x.shape[-1] < 48 else 1)]
    return [str(path) for path in paths]


def final_score(model: nn.Module, x_test: torch.Tensor, grid_prefix: str | Path, *, k: int,
                **iwae_options) -> dict:
    """A trained model's held-out IWAE bound (nats and bits/dim), how long scoring took, its size and its
    sample/reconstruction grids: the result row the quality benchmarks share."""
    started = time.monotonic()
    nats = iwae_nats(model, x_test, k=k, **iwae_options)
    return {"test_nats": round(nats, 3), "test_bits_per_dim": round(bits_per_dim(nats, x_test[0].numel()), 4),
            "score_s": round(time.monotonic() - started, 1), "params": sum(p.numel() for p in model.parameters()),
            "grids": write_grids(model, x_test, grid_prefix)}


def peer_net(model_fields: dict) -> nn.Module:
    """Our net with a Bernoulli head (one logit per pixel): the matched net of a peer that decodes pixel means."""
    from train.config import build_config
    from train.model import build_model

    fields = {**model_fields, "likelihood": "bernoulli"}
    return build_model(build_config({"model": fields, "data": {"dynamic_binarization": "off"}}).model)


def nhwc_uint8(x: torch.Tensor) -> np.ndarray:
    return nchw_to_nhwc(x.numpy())
