"""Anomaly scores beyond the negative ELBO, from what the ONNX graphs return (numpy only, no torch).

Every function takes images (B, C, H, W) floats in [0, 1] and/or the encoder's mean and log-variance
(B, latent) or the decoder's image mean at the posterior mean, and returns one number per image (B,);
higher means more anomalous. Two failures motivate them:
- Likelihoods favour simple inputs whatever their class (Nalisnick et al., "Do deep generative models
  know what they don't know?", ICLR 2019): a Fashion-MNIST model gives MNIST digits a *lower* negative
  ELBO than its own test images. Corrections: subtract a generic code length (`local_predictor_nats`,
  or PNG's in pipeline.images.png_code_nats; Serra et al., ICLR 2020), subtract the Bernoulli
  likelihood's floor (`export.score_statistics.bernoulli_entropy`), or test for typicality (`Standardiser`, two-sided).
- Within one dataset, what a model of one class fails to reproduce is what tells classes apart, as
  PCA's reconstruction error does: `squared_error` (export.score_statistics) at the posterior mean, `kl_to_prior`, `latent_norm`.
`export.score_statistics.Standardiser` fits each score's mean and spread on training images so that
scores in different units can be combined (`combine`); export stores the default's in model.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.score_statistics import applicable_scores, check_float_images, compute_base_scores

# LOCO-I (JPEG-LS) style contexts: local activity |a - c| + |b - c| + |c - d| (8-bit units) quantised at
# these edges; each context codes its residuals with its own Laplace scale, as adaptive coders do.
ACTIVITY_EDGES = (1, 9, 33)
MIN_LAPLACE_SCALE = 0.05  # a context whose residuals are all 0 still costs a little per pixel


def kl_to_prior(mean: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """KL(q(z|x) || N(0, I)) in nats per image: the ELBO's rate term, how far the encoder moved x's code."""
    mean, logvar = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
    if mean.shape != logvar.shape or mean.ndim != 2:
        raise ValueError(f"expected mean and logvar of one shape (B, latent), got {mean.shape} and {logvar.shape}")
    return 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1.0 - logvar, axis=1)


def latent_norm(mean: np.ndarray) -> np.ndarray:
    """||E[z|x]||: the prior's typical set lies near sqrt(latent) from 0; atypical inputs land far out."""
    mean = np.asarray(mean, np.float64)
    if mean.ndim != 2:
        raise ValueError(f"expected posterior means (B, latent), got {mean.shape}")
    return np.linalg.norm(mean, axis=1)


def med_prediction(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """JPEG-LS's median edge detector on integer images (B, C, H, W): each pixel predicted from its left (a),
    upper (b) and upper-left (c) neighbours (0 outside), and the local activity that picks its context."""
    padded = np.pad(pixels.astype(np.int64), ((0, 0), (0, 0), (1, 0), (1, 1)))
    a, b, c = padded[:, :, 1:, :-2], padded[:, :, :-1, 1:-1], padded[:, :, :-1, :-2]
    d = padded[:, :, :-1, 2:]  # upper-right
    low, high = np.minimum(a, b), np.maximum(a, b)
    prediction = np.where(c >= high, low, np.where(c <= low, high, a + b - c))
    activity = np.abs(a - c) + np.abs(b - c) + np.abs(c - d)
    return prediction, activity


def local_predictor_nats(x: np.ndarray) -> np.ndarray:
    """Ideal code length in nats of each image's 8-bit pixels under a JPEG-LS-like lossless coder.

    MED prediction, residuals coded per activity context with a discretised Laplace whose scale is that
    image's maximum-likelihood one (mean |residual|). A generic, local-smoothness model of images: what
    a likelihood ratio against a background model subtracts, without a second network (Serra et al.)."""
    pixels = np.rint(np.clip(check_float_images(x, "images"), 0.0, 1.0) * 255.0)
    prediction, activity = med_prediction(pixels)
    residual = np.abs(pixels - prediction).reshape(len(pixels), -1)
    context = np.digitize(activity, ACTIVITY_EDGES).reshape(len(pixels), -1)
    nats = np.zeros(len(pixels))
    for k in range(len(ACTIVITY_EDGES) + 1):
        member = context == k
        count = member.sum(axis=1)
        scale = np.maximum(np.where(count > 0, (residual * member).sum(axis=1) / np.maximum(count, 1), 0.0),
                           MIN_LAPLACE_SCALE)[:, None]
        # P(|r| bin) of a discretised Laplace: r = 0 -> 1 - e^(-1/(2s)); |r| = n > 0 -> e^(-n/s) sinh(1/(2s))
        log_zero = np.log(-np.expm1(-0.5 / scale))
        log_other = -residual / scale + np.log(np.sinh(0.5 / scale))
        nats -= np.where(member, np.where(residual == 0, log_zero, log_other), 0.0).sum(axis=1)
    return nats


@dataclass(frozen=True)
class ModelOutputs:
    """What the graphs return for images x (B, C, H, W): everything the scores below are computed from."""

    x: np.ndarray
    mean: np.ndarray          # encoder mean (B, latent)
    logvar: np.ndarray        # encoder log-variance (B, latent), clamped as in training
    eps: np.ndarray           # the noise behind z_k = mean + exp(logvar / 2) eps_k, (K, B, latent)
    sample_params: np.ndarray  # decoder params at every z_k, (K * B, ...) sample-major
    mean_params: np.ndarray   # decoder params at z = mean, (B, ...)
    mean_image: np.ndarray    # decoder image mean at z = mean, (B, C, H, W)


def model_outputs(device, x: np.ndarray, num_samples: int, seed: int = 0) -> ModelOutputs:
    """Run the encoder once and the decoder at K posterior samples and at the posterior mean.

    `device`: a serve.ops device, e.g. `serve.ops.Direct(VAERuntime(model_dir))`."""
    from serve import ops  # onnxruntime comes with it: only here, so the score functions stay numpy-only

    posterior = device.run(ops.encode, x)
    eps = ops.score_noise(len(x), num_samples, device.card.latent_dim, seed)
    z = posterior.mean[None] + np.exp(0.5 * posterior.logvar)[None] * eps  # (K, B, latent)
    return ModelOutputs(np.asarray(x, np.float32), posterior.mean, posterior.logvar, eps,
                        device.run(ops.decode_params, z.reshape(-1, device.card.latent_dim)),
                        device.run(ops.decode_params, posterior.mean), device.run(ops.decode, posterior.mean))


def base_scores(outputs: ModelOutputs, likelihood: str, likelihood_params: dict) -> dict[str, np.ndarray]:
    """Every single score for each image {name: (B,)}, higher = more anomalous (see the README table): those
    a model card's default combines (`export.score_statistics.compute_base_scores`) and the others."""
    from serve.likelihoods import negative_log_likelihood
    from serve.ops import score_from_parts

    o = outputs
    parts = (o.x, o.mean, o.logvar, o.eps, o.sample_params)
    scores = compute_base_scores(applicable_scores(likelihood),
                                 score_from_parts(*parts, "elbo", likelihood, likelihood_params), o.x, o.mean_image)
    return {**scores,
            "iwae": score_from_parts(*parts, "iwae", likelihood, likelihood_params),
            "recon_nll": negative_log_likelihood(likelihood, o.mean_params, o.x, likelihood_params),
            "kl": kl_to_prior(o.mean, o.logvar),
            "latent_norm": latent_norm(o.mean),
            "local_corrected": scores["neg_elbo"] - local_predictor_nats(o.x)}
