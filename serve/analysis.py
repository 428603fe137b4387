"""Latents as features and anomaly scores: PCA, a 2-D plot, ROC AUC, a calibrated threshold, heat maps (numpy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pca(features: np.ndarray, num_components: int = 2) -> np.ndarray:
    """Project (N, D) features onto their first principal components, (N, num_components)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"PCA needs at least 2 rows of (N, D) features, got shape {features.shape}")
    centred = features - features.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    components = components[:num_components]
    # fix each component's sign (largest loading positive) so plots do not flip between runs
    components *= np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])[:, None]
    return centred @ components.T


def embed_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, tuple[str, str]]:
    """(N, D) features in 2-D for a scatter plot, and the axes' names: "pca" (linear, numpy) or "tsne"
    (scikit-learn's t-SNE, the [analysis] extra: it keeps neighbours together, so classes show as clusters)."""
    if method == "pca":
        return pca(features, 2), ("PC 1", "PC 2")
    if method != "tsne":
        raise ValueError(f"plot method must be 'pca' or 'tsne', got {method!r}")
    from pipeline.cli import require

    manifold = require("sklearn.manifold", "analysis", "a t-SNE plot")
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"t-SNE needs at least 2 rows of (N, D) features, got shape {features.shape}")
    # perplexity must stay below the number of points; 30 (the default) for anything but tiny inputs
    tsne = manifold.TSNE(n_components=2, perplexity=min(30.0, (len(features) - 1) / 3), init="pca", random_state=seed)
    return tsne.fit_transform(features), ("t-SNE 1", "t-SNE 2")


def plot_2d(points: np.ndarray, labels: np.ndarray | None, path: str | Path, title: str = "",
            axes: tuple[str, str] = ("PC 1", "PC 2")) -> Path:
    """Scatter (N, 2) points coloured by label (matplotlib, headless)."""
    from pipeline.cli import require

    matplotlib = require("matplotlib", "analysis", "a 2-D plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 5), dpi=100)
    if labels is None:
        axis.scatter(points[:, 0], points[:, 1], s=4, alpha=0.6)
    else:
        for label in np.unique(labels):
            members = labels == label
            axis.scatter(points[members, 0], points[members, 1], s=4, alpha=0.7, label=str(label))
        axis.legend(markerscale=3, fontsize=8, loc="best")
    axis.set_xlabel(axes[0])
    axis.set_ylabel(axes[1])
    axis.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
    return path


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve (higher score = more anomalous): the Mann-Whitney U statistic, ties halved."""
    scores, positives = np.asarray(scores, np.float64), np.asarray(positives, bool)
    num_pos, num_neg = int(positives.sum()), int((~positives).sum())
    if num_pos == 0 or num_neg == 0:
        raise ValueError(f"ROC AUC needs both classes, got {num_pos} positive and {num_neg} negative")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = 0.5 * (start + end - 1) + 1.0
    return float((ranks[positives].sum() - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def threshold_for_fpr(normal_scores: np.ndarray, target_fpr: float) -> float:
    """The score above which at most `target_fpr` of these normal images fall."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target false-positive rate must be in (0, 1), got {target_fpr}")
    return float(np.quantile(np.asarray(normal_scores, np.float64), 1.0 - target_fpr, method="higher"))


def heat_map(nats: np.ndarray, max_nats: float | None = None) -> np.ndarray:
    """(H, W) nats per pixel -> (H, W, 3) uint8 on a 'hot' scale: 0 black, then red, yellow, white at `max_nats`
    (default: the map's own maximum)."""
    nats = np.asarray(nats, np.float64)
    top = float(nats.max()) if max_nats is None else float(max_nats)
    t = np.clip(nats / top, 0.0, 1.0) if top > 0 else np.zeros_like(nats)
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    return np.rint(rgb * 255).astype(np.uint8)
