"""Shards to training batches for DDP: equal batch counts on every rank, exact validation.

Why a custom IterableDataset rather than webdataset's default pipeline: under torchrun the
default node splitter raises, nodes are split before shards are shuffled, and uneven shards give
ranks unequal batch counts, which hangs DDP. Here the number of batches per rank per epoch is
computed from the manifest, and each (rank, worker) reads an endless, reshuffled stream of its
own shards, so every rank always yields exactly that many full batches. Opening URLs is left to
webdataset's `gopen` (local paths, http(s)://, pipe:).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import gopen

from pipeline.manifest import Manifest, read_manifest
from pipeline.shards import decode_sample, iter_tar_samples


@dataclass(frozen=True)
class ShardSet:
    """Where one split's shards are, with the manifest that describes them."""

    urls: list[str]
    counts: list[int]
    manifest: Manifest

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def open_split(location: str, split: str) -> ShardSet:
    """A directory (or URL prefix) holding manifest.json, resolved to one split's shard URLs."""
    if "://" in location and not location.startswith("file://"):
        import json
        import urllib.request

        base = location.rstrip("/")
        with urllib.request.urlopen(f"{base}/manifest.json", timeout=30) as response:
            manifest = Manifest.from_dict(json.loads(response.read()))
        urls = [f"{base}/{shard.name}" for shard in manifest.shards(split)]
    else:
        directory = Path(location.removeprefix("file://"))
        manifest = read_manifest(directory)
        urls = [str(directory / shard.name) for shard in manifest.shards(split)]
    return ShardSet(urls, [shard.num_samples for shard in manifest.shards(split)], manifest)


def _shuffled(items: list, seed: int) -> list:
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def _read_samples(url: str, shape: tuple[int, int, int]) -> Iterator[tuple[np.ndarray, int]]:
    with gopen(url, "rb") as stream:
        for sample in iter_tar_samples(stream, url):
            yield decode_sample(sample, shape)


def _batch(items: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    # uint8 NCHW: converting to float happens on the device, so a quarter of the bytes move.
    images = torch.from_numpy(np.stack([image for image, _ in items])).permute(0, 3, 1, 2)
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return images.contiguous(), labels


class TrainStream(IterableDataset):
    """Endless stream of full uint8 batches for one rank; the caller takes `batches_per_epoch`."""

    def __init__(self, shards: ShardSet, *, batch_size: int, rank: int, world_size: int,
                 seed: int, shuffle_buffer: int = 1000) -> None:
        self.shards, self.batch_size = shards, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0

    def _my_shards(self, pass_seed: int) -> list[str]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        num_streams = self.world_size * num_workers
        stream = self.rank * num_workers + worker_id
        urls = _shuffled(self.shards.urls, pass_seed)
        if len(urls) >= num_streams:
            return urls[stream::num_streams]
        # Fewer shards than streams: resample shards at random rather than starve a stream.
        rng = np.random.default_rng([pass_seed, stream])
        return [urls[i] for i in rng.integers(0, len(urls), size=1)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shape = self.shards.manifest.image_shape
        pending: list[tuple[np.ndarray, int]] = []
        for pass_number in range(1 << 30):
            pass_seed = self.seed * 1_000_003 + self.epoch * 1009 + pass_number
            rng = np.random.default_rng([pass_seed, self.rank])
            buffer: list[tuple[np.ndarray, int]] = []
            for url in self._my_shards(pass_seed):
                for item in _read_samples(url, shape):
                    buffer.append(item)
                    if len(buffer) >= self.shuffle_buffer:
                        pending.append(buffer.pop(int(rng.integers(len(buffer)))))
                    if len(pending) == self.batch_size:
                        yield _batch(pending)
                        pending = []
            for index in rng.permutation(len(buffer)):
                pending.append(buffer[index])
                if len(pending) == self.batch_size:
                    yield _batch(pending)
                    pending = []


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Full batches each rank takes per epoch: the same number on every rank, by construction."""
    count = num_samples // (batch_size * world_size)
    if count < 1:
        raise ValueError(
            f"{num_samples} training samples cannot fill one batch of {batch_size} on each of "
            f"{world_size} ranks; lower the batch size"
        )
    return count


def make_train_loader(shards: ShardSet, *, batch_size: int, rank: int, world_size: int,
                      seed: int, num_workers: int = 1, epoch: int = 0) -> DataLoader:
    """DataLoader over one rank's endless stream; set `.dataset.epoch` to reshuffle."""
    num_streams = world_size * max(num_workers, 1)
    if len(shards.urls) < num_streams and rank == 0:
        warnings.warn(
            f"{len(shards.urls)} training shards for {num_streams} streams "
            f"({world_size} ranks x {max(num_workers, 1)} workers): resampling shards, so an "
            "epoch is a count of samples, not one pass over each; write more, smaller shards",
            stacklevel=2,
        )
    dataset = TrainStream(shards, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)
    dataset.epoch = epoch
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)


def iter_eval_batches(shards: ShardSet, *, batch_size: int, rank: int, world_size: int
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every validation sample exactly once across ranks, as (images, labels, valid_mask).

    Ranks own whole shards; every rank yields the same number of batches (padding with masked
    zero images), so collectives line up and the padding is excluded from the metric.
    """
    shape = shards.manifest.image_shape
    mine = list(range(rank, len(shards.urls), world_size))
    per_rank = [sum(shards.counts[i] for i in range(r, len(shards.urls), world_size))
                for r in range(world_size)]
    num_batches = max(math.ceil(count / batch_size) for count in per_rank)
    pending: list[tuple[np.ndarray, int]] = []
    emitted = 0
    stream = (item for index in mine for item in _read_samples(shards.urls[index], shape))
    while emitted < num_batches:
        for item in stream:
            pending.append(item)
            if len(pending) == batch_size:
                break
        num_valid = len(pending)
        pending += [(np.zeros(shape, np.uint8), -1)] * (batch_size - num_valid)
        images, labels = _batch(pending)
        mask = torch.arange(batch_size) < num_valid
        yield images, labels, mask
        pending = []
        emitted += 1
