"""Validation over every sample, distributed across ranks: negative ELBO, an importance-weighted
NLL estimate (IWAE bound), active latent units; and the image grids logged per evaluation."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from pipeline.errors import DataErrors, ErrorBudget
from pipeline.images import make_grid
from pipeline.loader import ShardSet, iter_eval_batches
from train.config import TrainConfig, binarizes
from train.distributed import DistContext, all_reduce_sum
from train.model import VAE
from train.precision import autocast

# A latent unit is "active" when its posterior mean varies across the data by more than this
# (Burda et al. 2016): a unit collapsed to the prior has a posterior mean that ignores x.
ACTIVE_UNIT_THRESHOLD = 0.01
LOG_2PI = math.log(2 * math.pi)
log = logging.getLogger(__name__)


def binarize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x ~ Bernoulli(x) pixel-wise: dynamic binarisation of grey images in [0, 1]."""
    return (torch.rand(x.shape, generator=generator, device=x.device) < x).to(x.dtype)


def _decode_nll(model: VAE, z: torch.Tensor, x: torch.Tensor, precision: str) -> torch.Tensor:
    with autocast(precision, x.device):
        params = model.decode(z)
    return model.likelihood.nll(params, x)


@torch.no_grad()
def iwae_log_likelihood(model: VAE, x: torch.Tensor, *, num_samples: int, chunk: int,
                        generator: torch.Generator | None = None, precision: str = "fp32") -> torch.Tensor:
    """log p(x) >= log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x), per image (B,), in nats.

    Samples are decoded `chunk` at a time (chunk x B decoder rows per pass) so K = 1000 fits memory.
    """
    with autocast(precision, x.device):
        posterior = model.encode(x)
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    std = torch.exp(0.5 * logvar)
    batch = x.shape[0]
    log_weights = []
    for start in range(0, num_samples, chunk):
        k = min(chunk, num_samples - start)
        eps = torch.randn((k, *mean.shape), generator=generator, device=x.device)  # (k, B, latent)
        z = mean + std * eps
        x_rep = x.unsqueeze(0).expand(k, *x.shape).reshape(k * batch, *x.shape[1:])
        log_px_z = -_decode_nll(model, z.flatten(0, 1), x_rep, precision).view(k, batch)
        log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
        log_qz = -0.5 * (eps.pow(2) + LOG_2PI + logvar).sum(-1)
        log_weights.append(log_px_z + log_pz - log_qz)
    return torch.logsumexp(torch.cat(log_weights).double(), dim=0) - math.log(num_samples)


@torch.no_grad()
def evaluate(model: VAE, shards: ShardSet, context: DistContext, *, batch_size: int,
             precision: str, seed: int = 1234, iwae_samples: int = 0, iwae_chunk: int = 50,
             binarize_inputs: bool = False, errors: DataErrors | None = None) -> dict[str, float]:
    """Per-image means over the whole val split, every sample once across ranks (all-reduced).

    val/neg_elbo, val/recon, val/kl (one posterior sample, nats); val/bits_per_dim; with
    iwae_samples=K > 0 also val/nll (IWAE bound, nats) and val/nll_bits_per_dim; val/active_units.
    With `binarize_inputs` each image is binarised once from a generator seeded by `seed` and the rank.
    Bad validation data is skipped and counted in `errors` (the run's error budget) or a default one.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=context.device).manual_seed(seed + context.rank)
    latent = model.config.latent_dim
    # nelbo, recon, kl, nll, count, then sum and sum of squares of the posterior means per unit
    totals = torch.zeros(5 + 2 * latent, dtype=torch.float64, device=context.device)
    for images, _, mask in iter_eval_batches(shards, batch_size=batch_size, rank=context.rank,
                                             world_size=context.world_size, errors=errors):
        x = images.to(context.device).float().div_(255.0)
        if binarize_inputs:
            x = binarize(x, generator)
        weights = mask.to(context.device).double()
        with autocast(precision, context.device):
            posterior = model.encode(x)
        z = posterior.sample(generator)
        recon = _decode_nll(model, z, x, precision).double()
        kl = posterior.kl().double()
        nll = torch.zeros_like(recon)
        if iwae_samples > 0:
            nll = -iwae_log_likelihood(model, x, num_samples=iwae_samples, chunk=iwae_chunk,
                                       generator=generator, precision=precision)
        means = posterior.mean.double() * weights[:, None]
        totals += torch.cat([torch.stack([((recon + kl) * weights).sum(), (recon * weights).sum(),
                                          (kl * weights).sum(), (nll * weights).sum(), weights.sum()]),
                             means.sum(0), (means * posterior.mean.double()).sum(0)])
    all_reduce_sum(totals, context)
    model.train(was_training)
    count = totals[4].item()
    nelbo, recon, kl, nll = (totals[:4] / count).tolist()
    mean_of_means = totals[5:5 + latent] / count
    variance = totals[5 + latent:] / count - mean_of_means.pow(2)
    dims = float(np.prod(shards.manifest.image_shape))
    metrics = {"val/neg_elbo": nelbo, "val/recon": recon, "val/kl": kl,
               "val/bits_per_dim": nelbo / (math.log(2) * dims),
               "val/active_units": float((variance > ACTIVE_UNIT_THRESHOLD).sum().item())}
    if iwae_samples > 0:
        metrics.update({"val/nll": nll, "val/nll_bits_per_dim": nll / (math.log(2) * dims)})
    return metrics


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample_grid_images(model: VAE, x: torch.Tensor, *, num_samples: int, seed: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(samples, reconstructions) as NxHxWxC uint8: pixel means of p(x|z) for z ~ N(0, I) and z = mean(x)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    z = torch.randn(num_samples, model.config.latent_dim, generator=generator, device=x.device)
    samples = model.image_mean(model.decode(z).float())
    recons = model.image_mean(model.decode(model.encode(x).mean).float())
    model.train(was_training)
    pair = torch.stack([x.float(), recons], dim=1).flatten(0, 1)  # original, reconstruction, ...
    return _to_uint8(samples), _to_uint8(pair)


@torch.no_grad()
def interpolation_images(model: VAE, x: torch.Tensor, *, num_rows: int = 4, num_steps: int = 10
                         ) -> np.ndarray:
    """Rows of decodes along the straight line between the posterior means of two images, NxHxWxC uint8."""
    was_training = model.training
    model.eval()
    num_rows = min(num_rows, x.shape[0] // 2)
    z = model.encode(x[: 2 * num_rows]).mean.float()
    start, end = z[0::2], z[1::2]                                      # (rows, latent)
    weights = torch.linspace(0, 1, num_steps, device=x.device)[None, :, None]
    path = start[:, None] + weights * (end - start)[:, None]           # (rows, steps, latent)
    images = model.image_mean(model.decode(path.flatten(0, 1)).float())
    model.train(was_training)
    return _to_uint8(images)


class Evaluator:
    """Validation every run.eval_interval_steps steps (and when asked): metrics logged, image grids from
    rank 0. `run` is a collective (the sums are all-reduced): every rank calls it at the same step."""

    def __init__(self, model: VAE, shards: ShardSet, context: DistContext, tracker, config: TrainConfig, *,
                 precision: str, error_budget: ErrorBudget, grid_images: torch.Tensor, last_step: int) -> None:
        self.model, self.shards, self.context, self.tracker = model, shards, context, tracker
        self.config, self.precision, self.error_budget = config, precision, error_budget
        self.grid_images = grid_images  # (N, C, H, W) in [0, 1], for the sample/reconstruction grids
        self.last_step = last_step

    def should_run(self, step: int) -> bool:
        return step % self.config.run.eval_interval_steps == 0 and step != self.last_step

    def run(self, step: int, iwae_samples: int) -> dict[str, float]:
        self.last_step, seed = step, self.config.run.seed
        metrics = evaluate(self.model, self.shards, self.context, batch_size=self.config.data.eval_batch_size,
                           precision=self.precision, seed=seed + 1234, iwae_samples=iwae_samples,
                           iwae_chunk=self.config.run.iwae_chunk, binarize_inputs=binarizes(self.config),
                           errors=DataErrors(self.error_budget))
        self.tracker.log_metrics(metrics, step)
        if self.context.is_main:  # the grids come from the unwrapped (EMA) model, on rank 0 only
            model, images = self.model, self.grid_images
            samples, pairs = sample_grid_images(model, images, num_samples=64, seed=seed)
            self.tracker.log_image(make_grid(samples, 8), "samples", step)
            self.tracker.log_image(make_grid(pairs, 8), "reconstructions", step)
            self.tracker.log_image(make_grid(interpolation_images(model, images), 10), "interpolations", step)
            log.info("step %d: %s", step, {k: round(v, 3) for k, v in metrics.items()})
        return metrics
