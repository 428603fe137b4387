"""Writing and reading WebDataset tar shards: numpy, Pillow and the standard library only.

Each sample is three tar members sharing a key: `KEY.png` (the image), `KEY.cls` (the label as
ASCII) — the plain WebDataset convention, so any WebDataset reader can use the files.
Tar headers carry fixed owner and mtime, so the same inputs always give byte-identical shards.
"""

from __future__ import annotations

import io
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from pipeline import __version__
from pipeline.images import decode_image, encode_png
from pipeline.manifest import Manifest, ShardInfo, sha256_of, write_manifest
from pipeline.sources import ImageSet, stratified_split


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # fixed, so shards are reproducible byte for byte
    info.mode = 0o444
    info.uname = info.gname = "vae"
    tar.addfile(info, io.BytesIO(payload))


def write_shard(path: Path, keys: list[str], images: np.ndarray, labels: np.ndarray) -> ShardInfo:
    """Write one tar shard of `{__key__, png, cls}` samples and return its manifest entry."""
    temporary = path.with_suffix(".tar.tmp")
    with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, image, label in zip(keys, images, labels):
            _add_member(tar, f"{key}.png", encode_png(image))
            _add_member(tar, f"{key}.cls", str(int(label)).encode("ascii"))
    temporary.replace(path)
    return ShardInfo(path.name, len(keys), path.stat().st_size, sha256_of(path))


def _write_shard_job(job: tuple) -> ShardInfo:
    return write_shard(*job)


def write_shards(
    image_set: ImageSet,
    out_dir: str | Path,
    *,
    samples_per_shard: int = 1000,
    val_fraction: float = 0.1,
    seed: int = 0,
    num_workers: int = 1,
    force: bool = False,
    progress: bool = True,
) -> Manifest:
    """Split `image_set` per class into train/val, shuffle, and write shards plus manifest.json."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} is not empty; pass --force to overwrite it")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.tar"):
        stale.unlink()

    train_index, val_index = stratified_split(image_set.labels, val_fraction, seed)
    jobs = []
    for split, indices in (("train", train_index), ("val", val_index)):
        for shard_number, start in enumerate(range(0, len(indices), samples_per_shard)):
            chunk = indices[start : start + samples_per_shard]
            keys = [f"{split}-{int(i):07d}" for i in chunk]
            path = out_dir / f"{split}-{shard_number:06d}.tar"
            jobs.append((path, keys, image_set.images[chunk], image_set.labels[chunk]))

    if num_workers > 1:
        with ProcessPoolExecutor(num_workers) as pool:
            results = list(tqdm(pool.map(_write_shard_job, jobs), total=len(jobs),
                                desc="writing shards", unit="shard", disable=not progress))
    else:
        results = [_write_shard_job(job) for job in
                   tqdm(jobs, desc="writing shards", unit="shard", disable=not progress)]

    splits: dict[str, list[ShardInfo]] = {"train": [], "val": []}
    for info in results:
        splits[info.name.split("-")[0]].append(info)
    pixels = image_set.images.astype(np.float64) / 255.0
    manifest = Manifest(
        source=image_set.name,
        seed=seed,
        image_shape=tuple(int(d) for d in image_set.images.shape[1:]),
        splits=splits,
        pixel_mean=float(pixels.mean()),
        pixel_std=float(pixels.std()),
        num_classes=int(len(np.unique(image_set.labels))),
        tool_version=__version__,
    )
    write_manifest(out_dir, manifest)
    return manifest


def iter_tar_samples(fileobj, source_name: str) -> Iterator[dict]:
    """Group a tar stream's members by key into `{__key__, ext: bytes}` samples."""
    current: dict | None = None
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, extension = member.name.partition(".")
            payload = tar.extractfile(member).read()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": source_name}
            current[extension] = payload
    if current is not None:
        yield current


def decode_sample(sample: dict, expected_shape: tuple[int, int, int]) -> tuple[np.ndarray, int]:
    """A raw `{png, cls}` sample to (HxWxC uint8 image, label); wrong shapes raise ValueError."""
    key = sample.get("__key__", "?")
    if "png" not in sample:
        raise ValueError(f"sample {key}: no png member (has {sorted(k for k in sample if not k.startswith('__'))})")
    image = decode_image(sample["png"], channels=expected_shape[2])
    if image.shape != tuple(expected_shape):
        raise ValueError(f"sample {key}: expected image shape {tuple(expected_shape)}, got {image.shape}")
    label = int(sample["cls"]) if "cls" in sample else -1
    return image, label


def read_shard_images(path: str | Path, expected_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """All images and labels of one local shard, as (N,H,W,C) uint8 and (N,) int64."""
    images, labels = [], []
    with open(path, "rb") as handle:
        for sample in iter_tar_samples(handle, str(path)):
            image, label = decode_sample(sample, expected_shape)
            images.append(image)
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)
