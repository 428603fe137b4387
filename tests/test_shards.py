import json

import numpy as np
import pytest

from pipeline.manifest import read_manifest, sha256_of
from pipeline.shards import read_shard_images, write_shards
from pipeline.sources import stratified_split
from pipeline.verify import verify_directory


def test_stratified_split_holds_every_class(mnist5k):
    train, val = stratified_split(mnist5k.labels, 0.1, seed=0)
    assert len(set(train) & set(val)) == 0 and len(train) + len(val) == 5000
    assert np.bincount(mnist5k.labels[val]).tolist() == [50] * 10
    assert np.bincount(mnist5k.labels[train]).tolist() == [450] * 10


def test_manifest_counts_and_checksums(small_shards):
    manifest = read_manifest(small_shards)
    assert manifest.num_samples("train") == 1080 and manifest.num_samples("val") == 120
    assert manifest.image_shape == (28, 28, 1)
    for shard in manifest.shards("train") + manifest.shards("val"):
        assert sha256_of(small_shards / shard.name) == shard.sha256
        assert (small_shards / shard.name).stat().st_size == shard.num_bytes


def test_shards_hold_the_original_pixels(small_shards, digit_slice):
    manifest = read_manifest(small_shards)
    images, labels = read_shard_images(small_shards / manifest.shards("val")[0].name, (28, 28, 1))
    # every image read back is one of the source's images, with its label
    flat = digit_slice.images.reshape(len(digit_slice.images), -1)
    for image, label in zip(images[:10], labels[:10]):
        match = np.flatnonzero((flat == image.reshape(-1)).all(axis=1))
        assert len(match) >= 1 and label in digit_slice.labels[match]


def test_same_seed_gives_identical_shards(digit_slice, tmp_path):
    first = write_shards(digit_slice, tmp_path / "a", samples_per_shard=200, progress=False)
    second = write_shards(digit_slice, tmp_path / "b", samples_per_shard=200, progress=False, num_workers=2)
    assert first.splits == second.splits


def test_refuses_to_overwrite_without_force(digit_slice, tmp_path):
    write_shards(digit_slice, tmp_path, samples_per_shard=600, progress=False)
    with pytest.raises(FileExistsError, match="--force"):
        write_shards(digit_slice, tmp_path, samples_per_shard=600, progress=False)


def test_verify_catches_a_flipped_byte(digit_slice, tmp_path):
    write_shards(digit_slice, tmp_path, samples_per_shard=300, progress=False)
    assert verify_directory(tmp_path) == []
    victim = tmp_path / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    problems = verify_directory(tmp_path)
    assert problems and all("train-000001.tar" in p for p in problems)
    assert any("sha256" in p for p in problems)


def test_manifest_is_plain_json(small_shards):
    data = json.loads((small_shards / "manifest.json").read_text())
    assert data["format_version"] == 2 and data["source"] == "mnist5k-slice"
    assert data["layout"] in ("png", "npy", "block") and len(data["channel_mean"]) == 1
