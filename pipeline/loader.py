"""Shards to training batches for DDP: equal batch counts on every rank, exact validation.

Why a custom IterableDataset rather than webdataset's default pipeline: under torchrun the
default node splitter raises, nodes are split before shards are shuffled, and uneven shards give
ranks unequal batch counts, which hangs DDP. Here the number of batches per rank per epoch is
computed from the manifest, and each (rank, worker) reads an endless, reshuffled stream of its
own shards, so every rank always yields exactly that many full batches, whatever the shards hold
(bad data included: skipped samples are made up from the next pass, never left missing).

Shard order, the split of shards over (rank, worker) streams and the in-stream shuffle all derive
from (seed, epoch), so a job restarted at epoch E reads epoch E exactly as an uninterrupted job.

Without per-shard counts (a foreign set with no manifest), an epoch is `samples_per_epoch`
samples and every stream draws shards at random with replacement (webdataset's `resampled=True`
with `with_epoch`): still equal full batches on every rank, never a hang on uneven shards, but
no promise that each sample is seen once per epoch.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import multiprocessing
import os
import signal
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.errors import DataError, DataErrors, ErrorBudget
from pipeline.manifest import Manifest
from pipeline.foreign import iter_shard_samples
from pipeline.shards import decode_samples
from pipeline.urls import DEFAULT_RETRY, RetryPolicy, ShardOpenError, open_url, resolve_split


@dataclass(frozen=True)
class ShardSet:
    """Where one split's shards are, with the manifest that describes them."""

    urls: list[str]
    counts: list[int]
    manifest: Manifest
    decoder: Callable[[dict], tuple[np.ndarray, np.ndarray]] | None = None
    """Sample -> ((n,H,W,C) uint8, (n,) int64); None: our own layouts (pipeline.shards.decode_samples)."""
    samples_per_epoch: int = 0
    """> 0: counts are unknown; an epoch is this many samples of shards drawn with replacement."""

    @property
    def num_samples(self) -> int:
        return self.samples_per_epoch or sum(self.counts)

    @property
    def resampled(self) -> bool:
        return self.samples_per_epoch > 0

    def decode_fn(self) -> Callable[[dict], tuple[np.ndarray, np.ndarray]]:
        return self.decoder or functools.partial(decode_samples, expected_shape=self.manifest.image_shape)


def open_split(location: str, split: str, retry: RetryPolicy = DEFAULT_RETRY) -> ShardSet:
    """One split's shard URLs and counts from a directory or URL prefix holding manifest.json,
    a brace pattern (`dir/train-{000000..000009}.tar`), http(s):// URLs or `pipe:` commands."""
    urls, counts, manifest = resolve_split(location, split, retry)
    return ShardSet(urls, counts, manifest)


def _samples_in(sample: dict) -> int:
    """How many images a sample that failed to decode held (blocks list their keys)."""
    try:
        keys = json.loads(sample["keys.json"]) if "keys.json" in sample else None
    except (ValueError, RecursionError):  # damaged, or nested deep enough to exhaust the stack
        return 1
    return len(keys) if isinstance(keys, list) and keys else 1


def read_shard(url: str, shape: tuple[int, int, int], expected: int | None, errors: DataErrors,
               retry: RetryPolicy = DEFAULT_RETRY, decode: Callable | None = None
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images (n,H,W,C) uint8, labels (n,)) chunks of one shard, bad data skipped and counted.

    A URL that cannot be opened raises ShardOpenError (after retries). A tar that breaks
    part-way, or ends before the manifest's count, counts the missing samples as skipped.
    `decode` turns a sample into images and labels (default: our own layouts at `shape`).
    """
    decode = decode or functools.partial(decode_samples, expected_shape=shape)
    num_seen = 0
    try:
        with open_url(url, retry) as stream:
            for sample in iter_shard_samples(stream, url):
                try:
                    images, labels = decode(sample)
                except ValueError as error:
                    lost = _samples_in(sample)
                    num_seen += lost
                    errors.skip(url, sample["__key__"], lost, str(error))
                    continue
                num_seen += len(images)
                errors.count_read(len(images))
                yield images, labels
    except ShardOpenError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        lost = max(1, (expected or 0) - num_seen)
        errors.skip(url, None, lost, f"unreadable tar after {num_seen} samples: {error}", bad_shard=True)
        return
    if expected is not None and num_seen < expected:
        errors.skip(url, None, expected - num_seen,
                    f"tar ended after {num_seen} of {expected} samples (truncated?)", bad_shard=True)


def read_shard_or_skip(url: str, shape: tuple[int, int, int], expected: int | None, errors: DataErrors,
                      retry: RetryPolicy, decode: Callable, vanished: set[str] | None = None
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """read_shard, but a shard that cannot be opened (gone from the bucket mid-run, say) is a bad
    shard: its samples (the manifest's count, else one) are skipped and counted within the budget.

    A URL in `vanished` is passed over quietly: it was counted when first found gone, so a long run
    is not stopped by counting the same missing shard again every pass.
    """
    if vanished is not None and url in vanished:
        return
    try:
        yield from read_shard(url, shape, expected, errors, retry, decode)
    except ShardOpenError as error:
        if vanished is not None:
            vanished.add(url)
        errors.skip(url, None, max(1, expected or 0), str(error).removeprefix(f"{url}: "), bad_shard=True)


def _to_batch(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # uint8 NCHW: converting to float happens on the device, so a quarter of the bytes move.
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return x, torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))


class _Pool:
    """Image/label chunks waiting to be shuffled into batches."""

    def __init__(self) -> None:
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.size = 0

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images.append(images)
        self.labels.append(labels)
        self.size += len(images)

    def take_shuffled(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        order = rng.permutation(self.size)
        images = np.concatenate(self.images)[order]
        labels = np.concatenate(self.labels)[order]
        self.images, self.labels, self.size = [], [], 0
        return images, labels


class TrainStream(IterableDataset):
    """Endless stream of full uint8 batches for one rank; the caller takes `batches_per_epoch`.

    `errors` (a DataErrors) counts skipped samples across worker processes: read
    `stream.errors.num_skipped_samples` or `stream.errors.metrics()` to log them.
    """

    def __init__(self, shards: ShardSet, *, batch_size: int, rank: int, world_size: int,
                 seed: int, shuffle_buffer: int = 1000, errors: DataErrors | None = None,
                 retry: RetryPolicy = DEFAULT_RETRY) -> None:
        self.shards, self.batch_size = shards, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = shuffle_buffer
        self.errors = errors or DataErrors()
        self.retry = retry
        self._vanished: set[str] = set()  # per process: persistent workers count a vanished shard once
        # Shared memory, so persistent worker processes see the epoch the trainer sets.
        self._epoch = multiprocessing.Value("q", 0, lock=False)

    @property
    def epoch(self) -> int:
        """The epoch whose shuffle the next `iter()` reads; set it before each epoch."""
        return int(self._epoch.value)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.value = int(value)

    def _stream_id(self) -> tuple[int, int]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        return self.rank * num_workers + worker_id, self.world_size * num_workers

    def _my_shards(self, epoch: int, pass_number: int) -> list[int]:
        """Shard indices this (rank, worker) stream reads in one pass of this epoch."""
        stream, num_streams = self._stream_id()
        if self.shards.resampled:  # about one stream's share of the shards, drawn with replacement
            rng = np.random.default_rng([self.seed, epoch, pass_number, stream, 3])
            draws = max(1, len(self.shards.urls) // num_streams)
            return [int(i) for i in rng.integers(len(self.shards.urls), size=draws)]
        # Same permutation on every rank and worker (it depends on seed, epoch and pass only).
        order = np.random.default_rng([self.seed, epoch, pass_number]).permutation(len(self.shards.urls))
        if len(order) >= num_streams:
            return [int(i) for i in order[stream::num_streams]]
        # Fewer shards than streams: resample one shard at random rather than starve a stream.
        rng = np.random.default_rng([self.seed, epoch, pass_number, stream, 1])
        return [int(rng.integers(len(order)))]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shape = self.shards.manifest.image_shape
        decode = self.shards.decode_fn()
        batch = self.batch_size
        stream, _ = self._stream_id()
        epoch = self.epoch
        pool = _Pool()
        # Drawing with replacement can pick only vanished shards a few times in a row by chance.
        max_empty_passes = 10 if self.shards.resampled or len(self.shards.urls) > 1 else 1
        empty_passes, vanished = 0, self._vanished
        for pass_number in itertools.count():
            rng = np.random.default_rng([self.seed, epoch, pass_number, stream, 2])
            num_before = pool.size
            num_added = 0
            for index in self._my_shards(epoch, pass_number):
                url = self.shards.urls[index]
                expected = self.shards.counts[index] if self.shards.counts else None
                for images, labels in read_shard_or_skip(url, shape, expected, self.errors, self.retry,
                                                         decode, vanished):
                    pool.add(images, labels)
                    num_added += len(images)
                    # Shuffle a window of 2 x shuffle_buffer, emit the first half as batches and
                    # keep the rest to mix with what comes next (vectorised: no per-image Python).
                    if pool.size >= 2 * self.shuffle_buffer + batch:
                        x, y = pool.take_shuffled(rng)
                        emit = (len(x) - self.shuffle_buffer) // batch * batch
                        for start in range(0, emit, batch):
                            yield _to_batch(x[start : start + batch], y[start : start + batch])
                        pool.add(x[emit:], y[emit:])
            empty_passes = empty_passes + 1 if num_added == 0 and num_before == pool.size else 0
            if empty_passes >= max_empty_passes:
                raise DataError(f"{empty_passes} whole passes in a row over shards {self._my_shards(epoch, pass_number)} "
                                f"of {len(self.shards.urls)} shards gave no samples "
                                f"(first shard {self.shards.urls[0]})")
            # End of the pass: every full batch out; fewer than one batch carries to the next pass.
            x, y = pool.take_shuffled(rng)
            emit = len(x) // batch * batch
            for start in range(0, emit, batch):
                yield _to_batch(x[start : start + batch], y[start : start + batch])
            if emit < len(x):
                pool.add(x[emit:], y[emit:])


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Full batches each rank takes per epoch: the same number on every rank, by construction."""
    count = num_samples // (batch_size * world_size)
    if count < 1:
        raise ValueError(
            f"{num_samples} training samples cannot fill one batch of {batch_size} on each of "
            f"{world_size} ranks; lower the batch size"
        )
    return count


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """DataLoader worker start: leave the trainer's process group; the process that owns the loader decides.

    torchrun stops a job by signalling each trainer's whole process group, loader workers included;
    a worker that died of it made the trainer fail before it could save. In a group of its own a
    worker ends when the trainer shuts the loader down (torch's SIGTERM from the parent still ends
    it quietly, so an owner that exits never waits on it), or when it sees its parent gone. Ignoring
    SIGTERM instead left workers that multiprocessing's exit handler terminates and then waits on forever.
    """
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle


def make_train_loader(shards: ShardSet, *, batch_size: int, rank: int, world_size: int,
                      seed: int, num_workers: int = 1, epoch: int = 0,
                      error_budget: ErrorBudget | None = None, retry: RetryPolicy = DEFAULT_RETRY,
                      shuffle_buffer: int = 1000, persistent_workers: bool = True) -> DataLoader:
    """DataLoader over one rank's endless stream; set `.dataset.epoch` to reshuffle.

    Bad-data counts for metrics: `loader.dataset.errors.metrics()` (skipped samples, bad shards).
    Workers persist across epochs by default (a small epoch costs less than starting them again);
    they read the epoch from shared memory when the next epoch's iterator starts.
    """
    num_streams = world_size * max(num_workers, 1)
    if len(shards.urls) < num_streams and rank == 0 and not shards.resampled:
        warnings.warn(
            f"{len(shards.urls)} training shards for {num_streams} streams "
            f"({world_size} ranks x {max(num_workers, 1)} workers): resampling shards, so an "
            "epoch is a count of samples, not one pass over each; write more, smaller shards",
            stacklevel=2,
        )
    dataset = TrainStream(shards, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                          shuffle_buffer=shuffle_buffer, errors=DataErrors(error_budget), retry=retry)
    dataset.epoch = epoch
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      persistent_workers=persistent_workers and num_workers > 0,
                      prefetch_factor=4 if num_workers else None,
                      worker_init_fn=_leave_stop_signals_to_the_trainer)


def iter_eval_batches(shards: ShardSet, *, batch_size: int, rank: int, world_size: int,
                      errors: DataErrors | None = None, retry: RetryPolicy = DEFAULT_RETRY
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every validation sample exactly once across ranks, as (images, labels, valid_mask).

    Ranks own whole shards; every rank yields the same number of batches (computed from the
    manifest, padding with masked zero images), so collectives line up and the padding is
    excluded from the metric. Skipped bad samples become padding too (and are counted in `errors`).
    """
    errors = errors or DataErrors()
    shape = shards.manifest.image_shape
    decode = shards.decode_fn()
    mine = list(range(rank, len(shards.urls), world_size))
    per_rank = [sum(shards.counts[i] for i in range(r, len(shards.urls), world_size))
                for r in range(world_size)]
    num_batches = max(math.ceil(count / batch_size) for count in per_rank)
    chunks = (chunk for index in mine
              for chunk in read_shard_or_skip(shards.urls[index], shape, shards.counts[index], errors,
                                              retry, decode))
    pool = _Pool()
    for _ in range(num_batches):
        for images, labels in chunks:
            pool.add(images, labels)
            if pool.size >= batch_size:
                break
        images = np.concatenate(pool.images) if pool.images else np.zeros((0, *shape), np.uint8)
        labels = np.concatenate(pool.labels) if pool.labels else np.zeros(0, np.int64)
        pool = _Pool()
        if len(images) > batch_size:
            pool.add(images[batch_size:], labels[batch_size:])
            images, labels = images[:batch_size], labels[:batch_size]
        num_valid = len(images)
        pad = batch_size - num_valid
        if pad:
            images = np.concatenate([images, np.zeros((pad, *shape), np.uint8)])
            labels = np.concatenate([labels, np.full(pad, -1, np.int64)])
        x, y = _to_batch(images, labels)
        yield x, y, torch.arange(batch_size) < num_valid
