"""Anomaly scores beyond the negative ELBO, from what the ONNX graphs return (numpy only, no torch).

Every function takes images (B, C, H, W) floats in [0, 1] and/or the encoder's mean and log-variance
(B, latent) or the decoder's image mean at the posterior mean, and returns one number per image (B,);
higher means more anomalous. Two failures motivate them:
- Likelihoods favour simple inputs whatever their class (Nalisnick et al., "Do deep generative models
  know what they don't know?", ICLR 2019): a Fashion-MNIST model gives MNIST digits a *lower* negative
  ELBO than its own test images. Corrections: subtract a generic code length (`local_predictor_nats`,
  or PNG's in serve.runtime.complexity_nats; Serra et al., ICLR 2020), subtract the Bernoulli
  likelihood's floor (`bernoulli_entropy`), or test for typicality (`Standardiser`, two-sided).
- Within one dataset, what a model of one class fails to reproduce is what tells classes apart, as
  PCA's reconstruction error does: `squared_error` at the posterior mean, `kl_to_prior`, `latent_norm`.
`Standardiser` fits each score's mean and spread on training images so that scores in different
units can be combined (`combine`), and stores them as JSON beside a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# LOCO-I (JPEG-LS) style contexts: local activity |a - c| + |b - c| + |c - d| (8-bit units) quantised at
# these edges; each context codes its residuals with its own Laplace scale, as adaptive coders do.
ACTIVITY_EDGES = (1, 9, 33)
MIN_LAPLACE_SCALE = 0.05  # a context whose residuals are all 0 still costs a little per pixel


def _per_image(values: np.ndarray) -> np.ndarray:
    return values.reshape(values.shape[0], -1).sum(axis=1)


def _check_images(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: expected float images (B, C, H, W), got {x.dtype} {x.shape}")
    return x.astype(np.float64)


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


def squared_error(x: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """Sum of squared pixel differences between x and its reconstruction: PCA's anomaly score, for the VAE."""
    x, reconstruction = _check_images(x, "images"), _check_images(reconstruction, "reconstructions")
    if x.shape != reconstruction.shape:
        raise ValueError(f"images {x.shape} and reconstructions {reconstruction.shape} differ in shape")
    return _per_image((x - reconstruction) ** 2)


def bernoulli_entropy(x: np.ndarray) -> np.ndarray:
    """sum_i H(x_i) in nats: the least Bernoulli NLL any decoder can reach on grey pixels x (at p = x).

    A Bernoulli likelihood charges every grey pixel its entropy even when reconstructed perfectly, so
    images with much ink in mid-grey (textured clothes) look unlikely and black-and-white ones (digits)
    likely; the NLL minus this floor is the decoder's excess, sum_i KL(Bernoulli(x_i) || Bernoulli(p_i))."""
    x = np.clip(_check_images(x, "images"), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -(np.where(x > 0, x * np.log(x), 0.0) + np.where(x < 1, (1 - x) * np.log1p(-x), 0.0))
    return _per_image(entropy)


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
    pixels = np.rint(np.clip(_check_images(x, "images"), 0.0, 1.0) * 255.0)
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
class Standardiser:
    """Each score's mean and standard deviation on training images: z = (score - mean) / std."""

    means: dict[str, float]
    stds: dict[str, float]

    @classmethod
    def fit(cls, scores: dict[str, np.ndarray]) -> "Standardiser":
        """Fit on in-distribution scores {name: (N,)}, N >= 2."""
        short = {name: len(values) for name, values in scores.items() if len(values) < 2}
        if short:
            raise ValueError(f"standardising needs at least 2 training scores each, got {short}")
        stds = {name: float(np.std(values)) for name, values in scores.items()}
        flat = [name for name, std in stds.items() if not std > 0]
        if flat:
            raise ValueError(f"scores {flat} do not vary on the training images: they cannot be standardised")
        return cls({name: float(np.mean(values)) for name, values in scores.items()}, stds)

    def z(self, name: str, scores: np.ndarray) -> np.ndarray:
        if name not in self.means:
            raise KeyError(f"no fitted statistics for score {name!r}; fitted: {sorted(self.means)}")
        return (np.asarray(scores, np.float64) - self.means[name]) / self.stds[name]

    def to_json(self) -> dict:
        return {"means": self.means, "stds": self.stds}

    @classmethod
    def from_json(cls, data: dict) -> "Standardiser":
        if set(data.get("means", {})) != set(data.get("stds", {})):
            raise ValueError(f"standardiser: means and stds name different scores: {data}")
        return cls({k: float(v) for k, v in data["means"].items()}, {k: float(v) for k, v in data["stds"].items()})


COMBINATIONS = ("sum", "max")


def combine(standardiser: Standardiser, scores: dict[str, np.ndarray], how: str = "sum",
            two_sided: tuple[str, ...] = ()) -> np.ndarray:
    """One score from several, each standardised on training images: their sum or their maximum.

    Names in `two_sided` count by |z| (a typicality test: unusually *low* is anomalous too, as a
    likelihood is on simpler inputs); the others by z."""
    if how not in COMBINATIONS:
        raise ValueError(f"combination must be one of {COMBINATIONS}, got {how!r}")
    if not scores:
        raise ValueError("combine needs at least one score")
    unknown = set(two_sided) - set(scores)
    if unknown:
        raise ValueError(f"two_sided names {sorted(unknown)}, which are not among the scores {sorted(scores)}")
    zs = [np.abs(standardiser.z(name, values)) if name in two_sided else standardiser.z(name, values)
          for name, values in scores.items()]
    stacked = np.stack(zs)
    return stacked.sum(axis=0) if how == "sum" else stacked.max(axis=0)



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


def model_outputs(runtime, x: np.ndarray, num_samples: int, seed: int = 0) -> ModelOutputs:
    """Run the encoder once and the decoder at K posterior samples and at the posterior mean."""
    from serve import ops  # serve.ops imports onnxruntime: only here

    direct = ops.Direct(runtime)
    posterior = direct.run(ops.encode, x)
    mean, logvar = posterior.mean, posterior.logvar
    eps = ops.score_noise(len(x), num_samples, runtime.latent_dim, seed)
    z = (mean[None] + np.exp(0.5 * logvar)[None] * eps).reshape(-1, runtime.latent_dim)
    return ModelOutputs(x, mean, logvar, eps, direct.run(ops.decode_params, z), direct.run(ops.decode_params, mean),
                        direct.run(ops.decode, mean))


def base_scores(outputs: ModelOutputs, likelihood: str, likelihood_params: dict,
                png_nats: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every single score for each image {name: (B,)}, higher = more anomalous (see the README table)."""
    from serve.likelihoods import negative_log_likelihood
    from serve.ops import score_from_parts

    o = outputs
    parts = (o.x, o.mean, o.logvar, o.eps, o.sample_params)
    neg_elbo = score_from_parts(*parts, "elbo", likelihood, likelihood_params)
    scores = {
        "neg_elbo": neg_elbo,
        "iwae": score_from_parts(*parts, "iwae", likelihood, likelihood_params),
        "recon_nll": negative_log_likelihood(likelihood, o.mean_params, o.x, likelihood_params),
        "recon_mse": squared_error(o.x, o.mean_image),
        "kl": kl_to_prior(o.mean, o.logvar),
        "latent_norm": latent_norm(o.mean),
        "local_corrected": neg_elbo - local_predictor_nats(o.x),
    }
    if png_nats is not None:
        scores["png_corrected"] = neg_elbo - png_nats
    if likelihood == "bernoulli":
        scores["bernoulli_excess"] = neg_elbo - bernoulli_entropy(o.x)
    return scores
