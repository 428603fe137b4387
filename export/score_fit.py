"""Fit the default anomaly score's statistics (export.score_statistics) on validation images, with PyTorch.

Export runs this on the same real validation images it verifies the ONNX graphs on, so every exported
model carries its own standardisation: serve's default score then needs nothing from the user.
"""

from __future__ import annotations

import numpy as np
import torch

from export.score_statistics import (ScoreStatistics, Standardiser, applicable_scores, compute_base_scores,
                                     default_combination)

FIT_NUM_SAMPLES = 1
"""z samples per image behind the fitted negative ELBOs: serve's default (`score --samples 1`), so one draw."""
FIT_BATCH = 256


@torch.no_grad()
def fit_score_statistics(model, images: np.ndarray, seed: int = 0) -> ScoreStatistics:
    """Base scores of `images` (N, C, H, W) float32 in [0, 1] under `model` (eval, fp32), their means and
    spreads, and the combination serve defaults to for the model's likelihood."""
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), FIT_BATCH):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + FIT_BATCH], dtype=np.float32))
        posterior = model.encode(x)
        neg_elbo = model.likelihood.nll(model.decode(posterior.sample(generator)), x) + posterior.kl()  # one z
        reconstruction = model.image_mean(model.decode(posterior.mean))
        batch = compute_base_scores(applicable_scores(model.config.likelihood), neg_elbo.double().numpy(),
                                    x.numpy(), reconstruction.float().numpy())
        for name, values in batch.items():
            parts.setdefault(name, []).append(values)
    scores = {name: np.concatenate(values) for name, values in parts.items()}
    return ScoreStatistics(default_combination(model.config.likelihood), Standardiser.fit(scores),
                           num_images=len(images), num_samples=FIT_NUM_SAMPLES)
