"""Validation negative ELBO (exact over every validation sample, across ranks) and image grids."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.loader import ShardSet, iter_eval_batches
from train.distributed import DistContext, all_reduce_sum
from train.loss import vae_loss
from train.model import ConvVAE
from train.precision import autocast


@torch.no_grad()
def evaluate(model: ConvVAE, shards: ShardSet, context: DistContext, *, batch_size: int,
             precision: str, seed: int = 1234) -> dict[str, float]:
    """Mean negative ELBO, reconstruction and KL per image (nats) over the whole val split."""
    model.eval()
    generator = torch.Generator(device=context.device).manual_seed(seed + context.rank)
    totals = torch.zeros(4, dtype=torch.float64, device=context.device)  # nelbo, recon, kl, count
    for images, _, mask in iter_eval_batches(shards, batch_size=batch_size, rank=context.rank,
                                             world_size=context.world_size):
        x = images.to(context.device).float().div_(255.0)
        mask = mask.to(context.device)
        with autocast(precision, context.device):
            logits, posterior = model(x, generator)
        terms = vae_loss(logits, x, posterior)
        weights = mask.double()
        totals += torch.stack([((terms.recon + terms.kl).double() * weights).sum(),
                               (terms.recon.double() * weights).sum(),
                               (terms.kl.double() * weights).sum(), weights.sum()])
    all_reduce_sum(totals, context)
    model.train()
    count = totals[3].item()
    nelbo, recon, kl = (totals[:3] / count).tolist()
    return {"val/neg_elbo": nelbo, "val/recon": recon, "val/kl": kl,
            "val/bits_per_dim": nelbo / (np.log(2) * np.prod(shards.manifest.image_shape))}


@torch.no_grad()
def sample_grid_images(model: ConvVAE, x: torch.Tensor, *, num_samples: int, seed: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(samples, reconstructions) as NxHxWxC uint8: pixel means of p(x|z) for z ~ N(0, I) and z = mean(x)."""
    model.eval()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    z = torch.randn(num_samples, model.config.latent_dim, generator=generator, device=x.device)
    samples = torch.sigmoid(model.decode(z).float())
    recons = torch.sigmoid(model.decode(model.encode(x).mean).float())
    model.train()
    pair = torch.stack([x.float(), recons], dim=1).flatten(0, 1)  # original, reconstruction, ...

    def to_uint8(images: torch.Tensor) -> np.ndarray:
        return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()

    return to_uint8(samples), to_uint8(pair)
