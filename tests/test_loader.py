"""The DDP loader, with two ranks simulated in one process and real worker processes."""

import hashlib
import itertools
from collections import Counter

import numpy as np
import pytest

from pipeline.loader import batches_per_epoch, iter_eval_batches, make_train_loader, open_split
from pipeline.manifest import read_manifest
from pipeline.shards import read_shard_images, write_shards


def image_digests(images) -> list[str]:
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images]


def split_digests(directory, split) -> Counter:
    shards = open_split(str(directory), split)
    counter = Counter()
    for url in shards.urls:
        images, _ = read_shard_images(url, shards.manifest.image_shape)
        counter.update(hashlib.sha1(np.ascontiguousarray(i.transpose(2, 0, 1)).tobytes()).hexdigest() for i in images)
    return counter


def read_epoch(directory, *, batch_size, world_size, num_workers, epoch=0):
    shards = open_split(str(directory), "train")
    count = batches_per_epoch(shards.num_samples, batch_size, world_size)
    per_rank = []
    for rank in range(world_size):
        loader = make_train_loader(shards, batch_size=batch_size, rank=rank, world_size=world_size,
                                   seed=0, num_workers=num_workers, epoch=epoch)
        per_rank.append(list(itertools.islice(loader, count)))
    return count, per_rank


def test_even_shards_every_sample_exactly_once_per_epoch(small_shards):
    # 12 shards of 90 over 2 ranks x 2 workers: 3 shards per stream, 540 samples per rank
    count, per_rank = read_epoch(small_shards, batch_size=45, world_size=2, num_workers=2)
    assert count == 12 and all(len(batches) == count for batches in per_rank)
    seen = Counter(d for batches in per_rank for x, _ in batches for d in image_digests(x))
    assert seen == split_digests(small_shards, "train")


def test_batches_are_uint8_nchw(small_shards):
    _, per_rank = read_epoch(small_shards, batch_size=45, world_size=1, num_workers=0)
    images, labels = per_rank[0][0]
    assert images.dtype.is_floating_point is False and str(images.dtype) == "torch.uint8"
    assert tuple(images.shape) == (45, 1, 28, 28) and labels.shape == (45,)


def test_order_changes_with_the_epoch(small_shards):
    _, first = read_epoch(small_shards, batch_size=45, world_size=1, num_workers=0, epoch=0)
    _, second = read_epoch(small_shards, batch_size=45, world_size=1, num_workers=0, epoch=1)
    assert image_digests(first[0][0][0]) != image_digests(second[0][0][0])


def test_uneven_shards_give_equal_full_batches(digit_slice, tmp_path):
    # 3 uneven shards for 2 ranks x 2 workers: fewer shards than streams -> resampling, with a warning
    write_shards(digit_slice, tmp_path, samples_per_shard=400, progress=False)
    with pytest.warns(UserWarning, match="resampling"):
        count, per_rank = read_epoch(tmp_path, batch_size=32, world_size=2, num_workers=2)
    assert count == 1080 // 64
    for batches in per_rank:
        assert len(batches) == count and all(x.shape[0] == 32 for x, _ in batches)


def test_validation_reads_every_sample_once_across_ranks(small_shards):
    val = open_split(str(small_shards), "val")
    for world_size in (1, 2, 3):  # 3 ranks for 2 shards: one rank only pads
        seen, counts = Counter(), []
        for rank in range(world_size):
            batches = list(iter_eval_batches(val, batch_size=32, rank=rank, world_size=world_size))
            counts.append(len(batches))
            for images, _, mask in batches:
                seen.update(image_digests(images[mask]))
        assert len(set(counts)) == 1, counts
        assert seen == split_digests(small_shards, "val")


def test_too_few_samples_for_one_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="lower the batch size"):
        batches_per_epoch(100, 64, 2)


def test_a_restarted_job_gets_the_same_epoch_shuffle(small_shards):
    """A job that ran epochs 0 and 1 and one restarted at epoch 1 read epoch 1 identically."""
    shards = open_split(str(small_shards), "train")
    count = batches_per_epoch(shards.num_samples, 45, 1)
    running = make_train_loader(shards, batch_size=45, rank=0, world_size=1, seed=3, num_workers=2)
    epoch0 = [x for x, _ in itertools.islice(running, count)]
    running.dataset.epoch = 1
    epoch1 = [x for x, _ in itertools.islice(running, count)]
    restarted = make_train_loader(shards, batch_size=45, rank=0, world_size=1, seed=3, num_workers=2,
                                  epoch=1)
    resumed = [x for x, _ in itertools.islice(restarted, count)]
    assert [image_digests(x) for x in resumed] == [image_digests(x) for x in epoch1]
    assert [image_digests(x) for x in resumed] != [image_digests(x) for x in epoch0]


def test_uneven_shards_more_than_streams_give_equal_batches(digit_slice, tmp_path):
    # 1,080 train samples in shards of 200: 6 shards (the last 80) over 2 ranks x 2 workers
    write_shards(digit_slice, tmp_path, samples_per_shard=200, progress=False, layout="png")
    shards = open_split(str(tmp_path), "train")
    assert sorted(shards.counts) == [80, 200, 200, 200, 200, 200]
    for epoch in (0, 1):
        count, per_rank = read_epoch(tmp_path, batch_size=32, world_size=2, num_workers=2, epoch=epoch)
        assert count == 1080 // 64
        for batches in per_rank:
            assert len(batches) == count and all(x.shape == (32, 1, 28, 28) for x, _ in batches)


@pytest.mark.parametrize("layout", ["png", "npy", "block"])
def test_every_layout_reads_the_same_pixels(digit_slice, tmp_path, layout):
    write_shards(digit_slice, tmp_path, samples_per_shard=300, progress=False, layout=layout,
                 samples_per_block=16)
    assert read_manifest(tmp_path).layout == layout
    count, per_rank = read_epoch(tmp_path, batch_size=40, world_size=1, num_workers=0)
    seen = Counter(d for x, _ in per_rank[0] for d in image_digests(x))
    assert sum(seen.values()) == count * 40 == 1080
    assert seen == split_digests(tmp_path, "train")
    train = digit_slice.images  # and the pixels are the source's, bit for bit
    source = Counter(hashlib.sha1(np.ascontiguousarray(i.transpose(2, 0, 1)).tobytes()).hexdigest()
                     for i in train)
    assert all(source[d] >= n for d, n in seen.items())


def test_labels_travel_with_their_images(small_shards, digit_slice):
    by_digest = {hashlib.sha1(np.ascontiguousarray(i.transpose(2, 0, 1)).tobytes()).hexdigest(): int(l)
                 for i, l in zip(digit_slice.images, digit_slice.labels)}
    _, per_rank = read_epoch(small_shards, batch_size=45, world_size=1, num_workers=0)
    for x, labels in per_rank[0][:4]:
        assert [by_digest[d] for d in image_digests(x)] == labels.tolist()
