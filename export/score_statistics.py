"""The default anomaly score: base scores standardised on in-distribution images, fitted at export, stored in
model.json, applied by serve.

A likelihood alone is a poor anomaly score: on Fashion-MNIST the negative ELBO gave one-class ROC AUC 0.687
and out-of-distribution (MNIST) 0.200, worse than a coin, because simple inputs look likely whatever their
class. What met both targets (BENCHMARKS.md, "Applications on Fashion-MNIST") adds two base scores, each
turned into a z-score by its mean and spread on the model's own validation images:
- `png_corrected`: negative ELBO minus the image's PNG code length (what the model finds unusual beyond
  plain complexity; Serra et al., ICLR 2020), and
- `recon_mse`: squared error of the reconstruction at the posterior mean (PCA's score, for the VAE).
That is `png_mse`. A Bernoulli likelihood charges grey pixels their entropy, which PNG's 8-bit code length
does not measure, so Bernoulli models use `excess_mse`: negative ELBO minus the pixels' Bernoulli entropy,
plus the same reconstruction error (png_mse on a Bernoulli model: OOD 0.9997 but one-class 0.885, below PCA).
Those means and spreads are data a model directory carries (untrusted, like the rest of it), so they are
checked here, in the one torch-free place serve and export share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.images import png_code_nats

BASE_SCORES = ("neg_elbo", "png_corrected", "recon_mse", "bernoulli_excess")
"""Base scores export fits (per image, higher = more anomalous); `serve.scores` documents each."""
COMBINATIONS: dict[str, tuple[str, ...]] = {
    "png_mse": ("png_corrected", "recon_mse"),
    "excess_mse": ("bernoulli_excess", "recon_mse"),
}
"""Named sums of standardised base scores a model card may declare as its default."""
DEFAULT_COMBINATION = {"bernoulli": "excess_mse"}
"""The combination export declares per likelihood; "png_mse" for every other one."""


def default_combination(likelihood: str) -> str:
    return DEFAULT_COMBINATION.get(likelihood, "png_mse")


def check_float_images(x: np.ndarray, name: str) -> np.ndarray:
    """x as float64 (B, C, H, W), or a ValueError naming it."""
    x = np.asarray(x)
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: expected float images (B, C, H, W), got {x.dtype} {x.shape}")
    return x.astype(np.float64)


def squared_error(x: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """Sum of squared pixel differences between x and its reconstruction: PCA's anomaly score, for the VAE."""
    x, reconstruction = check_float_images(x, "images"), check_float_images(reconstruction, "reconstructions")
    if x.shape != reconstruction.shape:
        raise ValueError(f"images {x.shape} and reconstructions {reconstruction.shape} differ in shape")
    return ((x - reconstruction) ** 2).reshape(len(x), -1).sum(axis=1)


def bernoulli_entropy(x: np.ndarray) -> np.ndarray:
    """sum_i H(x_i) in nats: the least Bernoulli NLL any decoder can reach on grey pixels x (at p = x).

    A Bernoulli likelihood charges every grey pixel its entropy even when reconstructed perfectly, so
    images with much ink in mid-grey (textured clothes) look unlikely and black-and-white ones (digits)
    likely; the NLL minus this floor is the decoder's excess, sum_i KL(Bernoulli(x_i) || Bernoulli(p_i))."""
    x = np.clip(check_float_images(x, "images"), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -(np.where(x > 0, x * np.log(x), 0.0) + np.where(x < 1, (1 - x) * np.log1p(-x), 0.0))
    return entropy.reshape(len(x), -1).sum(axis=1)


def applicable_scores(likelihood: str) -> tuple[str, ...]:
    """BASE_SCORES that mean something for a model of this likelihood (the pixel entropy only for Bernoulli)."""
    return tuple(name for name in BASE_SCORES if likelihood == "bernoulli" or name != "bernoulli_excess")


def compute_base_scores(names: tuple[str, ...], neg_elbo: np.ndarray, x: np.ndarray,
                        reconstruction: np.ndarray) -> dict[str, np.ndarray]:
    """The base scores `names` of images x (B, C, H, W) in [0, 1] {name: (B,)}, from their negative ELBOs (B,)
    and their reconstructions at the posterior mean (B, C, H, W). Only those asked for are computed: the PNG
    code length costs an encode per image, which a request for another combination need not pay."""
    neg_elbo = np.asarray(neg_elbo, np.float64)
    compute = {"neg_elbo": lambda: neg_elbo,
               "png_corrected": lambda: neg_elbo - png_code_nats(x),
               "recon_mse": lambda: squared_error(x, reconstruction),
               "bernoulli_excess": lambda: neg_elbo - bernoulli_entropy(x)}
    return {name: compute[name]() for name in names}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Standardiser:
    """Each score's mean and standard deviation on in-distribution images: z = (score - mean) / std."""

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
    def from_json(cls, data) -> "Standardiser":
        """From `to_json`'s form; anything else (other names, non-finite values, spreads <= 0) is a ValueError
        naming every problem."""
        if not isinstance(data, dict) or not all(isinstance(data.get(k), dict) for k in ("means", "stds")):
            raise ValueError(f"expected {{'means': {{...}}, 'stds': {{...}}}}, got {str(data)[:200]}")
        means, stds = data["means"], data["stds"]
        problems = []
        if set(means) != set(stds):
            problems.append(f"means and stds name different scores: {sorted(means)} vs {sorted(stds)}")
        problems += [f"means.{k}: expected a finite number, got {v!r}" for k, v in means.items() if not _finite(v)]
        problems += [f"stds.{k}: expected a finite number > 0, got {v!r}" for k, v in stds.items()
                     if not (_finite(v) and v > 0)]
        if problems:
            raise ValueError("; ".join(problems))
        return cls({k: float(v) for k, v in means.items()}, {k: float(v) for k, v in stds.items()})


SUMMARIES = ("sum", "max")


def combine(standardiser: Standardiser, scores: dict[str, np.ndarray], how: str = "sum",
            two_sided: tuple[str, ...] = ()) -> np.ndarray:
    """One score from several, each standardised: their sum or their maximum.

    Names in `two_sided` count by |z| (a typicality test: unusually *low* is anomalous too, as a
    likelihood is on simpler inputs); the others by z."""
    if how not in SUMMARIES:
        raise ValueError(f"combination must be one of {SUMMARIES}, got {how!r}")
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
class ScoreStatistics:
    """model.json's "anomaly_score": the default combination and what standardises its base scores."""

    default: str
    """A COMBINATIONS name."""
    standardiser: Standardiser
    num_images: int
    """Validation images the statistics were fitted on."""
    num_samples: int
    """z samples per image behind the fitted negative ELBOs."""

    def supports(self, combination: str) -> bool:
        return combination in COMBINATIONS and set(COMBINATIONS[combination]) <= set(self.standardiser.means)

    def apply(self, base: dict[str, np.ndarray], combination: str) -> np.ndarray:
        """`combination` of base scores {name: (B,)}: the sum of its members' z-scores."""
        return combine(self.standardiser, {name: base[name] for name in COMBINATIONS[combination]})

    def to_json(self) -> dict:
        return {"default": self.default, "num_images": self.num_images, "num_samples": self.num_samples,
                **self.standardiser.to_json()}

    @classmethod
    def from_json(cls, data) -> "ScoreStatistics":
        """model.json's entry, checked (it is untrusted): a ValueError names every problem."""
        if not isinstance(data, dict):
            raise ValueError(f"expected an object, got {type(data).__name__}")
        problems = []
        unknown = sorted(str(name)[:40] for name in data.get("means") or {} if name not in BASE_SCORES) \
            if isinstance(data.get("means"), dict) else []
        if unknown:  # only scores export fits: a hostile card cannot make serve compute anything else
            problems.append(f"unknown scores {unknown[:8]}; known: {list(BASE_SCORES)}")
        try:
            standardiser = Standardiser.from_json(data)
        except ValueError as error:
            problems.append(str(error))
            standardiser = None
        default = data.get("default")
        if default not in COMBINATIONS:
            problems.append(f"default: expected one of {sorted(COMBINATIONS)}, got {str(default)[:80]!r}")
        else:
            fitted = {name for name, std in (data.get("stds") if isinstance(data.get("stds"), dict) else {}).items()
                      if _finite(std) and std > 0}
            missing = sorted(set(COMBINATIONS[default]) - fitted)
            if missing:
                problems.append(f"default {default!r} needs statistics for {missing}")
        counts = {k: data.get(k) for k in ("num_images", "num_samples")}
        problems += [f"{k}: expected a whole number >= 1, got {v!r}" for k, v in counts.items()
                     if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1)]
        if problems:
            raise ValueError("; ".join(problems))
        return cls(default, standardiser, counts["num_images"], counts["num_samples"])
