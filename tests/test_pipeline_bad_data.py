"""Bad data on disk: skipped, counted (across worker processes), warned about with shard and key,
within an error budget; over it, an error naming the shard. Real damaged files, no mocks."""

from __future__ import annotations

import io
import itertools
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import DataError, DataErrors, DataWarning, ErrorBudget
from pipeline.images import encode_npy, encode_png
from pipeline.loader import batches_per_epoch, iter_eval_batches, make_train_loader, open_split, read_shard
from pipeline.shards import write_shards
from pipeline.verify import verify_directory


def rewrite_tar(path: Path, change) -> None:
    """Rewrite a shard, passing each (member name, payload) through `change`."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, payload in members:
            payload = change(member.name, payload)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))


@pytest.fixture()
def damaged(digit_slice, tmp_path):
    """PNG-layout shards (train: 300, 300, 300, 180) with one bad image and one 20x20 image in
    train-000000, train-000001 cut in half, and an undecodable image in val-000000."""
    write_shards(digit_slice, tmp_path, samples_per_shard=300, progress=False, layout="png")
    first = sorted(n for n in tarfile.open(tmp_path / "train-000000.tar").getnames() if n.endswith(".png"))
    bad_key, small_key = first[5].split(".")[0], first[9].split(".")[0]

    def damage(name, payload):
        if name == f"{bad_key}.png":
            return b"\x89PNG\r\n\x1a\n this is not an image"
        if name == f"{small_key}.png":
            return encode_png(np.zeros((20, 20, 1), np.uint8))
        return payload

    rewrite_tar(tmp_path / "train-000000.tar", damage)
    cut = tmp_path / "train-000001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    val_key = sorted(tarfile.open(tmp_path / "val-000000.tar").getnames())[0].split(".")[0]
    rewrite_tar(tmp_path / "val-000000.tar",
                lambda name, payload: b"garbage" if name == f"{val_key}.png" else payload)
    return {"dir": tmp_path, "bad_key": bad_key, "small_key": small_key, "val_key": val_key}


def test_bad_image_and_wrong_shape_are_skipped_counted_and_named(damaged):
    shards = open_split(str(damaged["dir"]), "train")
    errors = DataErrors()
    with pytest.warns(DataWarning) as caught:
        chunks = list(read_shard(shards.urls[0], (28, 28, 1), 300, errors))
    assert sum(len(images) for images, _ in chunks) == 298
    assert errors.num_skipped_samples == 2 and errors.num_read_samples == 298
    messages = [str(w.message) for w in caught]
    assert any("train-000000.tar" in m and damaged["bad_key"] in m and "undecodable" in m for m in messages)
    assert any("train-000000.tar" in m and damaged["small_key"] in m and "(20, 20, 1)" in m for m in messages)


def test_truncated_tar_counts_every_missing_sample(damaged):
    shards = open_split(str(damaged["dir"]), "train")
    errors = DataErrors(ErrorBudget(max_bad_samples=300))
    # tarfile's stream mode stops quietly at a cut; the manifest's count is what catches it
    with pytest.warns(DataWarning, match=r"train-000001\.tar.*(unreadable tar|tar ended)"):
        read = sum(len(images) for images, _ in read_shard(shards.urls[1], (28, 28, 1), 300, errors))
    assert 100 < read < 300
    assert errors.num_skipped_samples == 300 - read and errors.num_bad_shards == 1


def test_loader_keeps_equal_batches_and_reports_skips_from_workers(damaged):
    shards = open_split(str(damaged["dir"]), "train")
    count = batches_per_epoch(shards.num_samples, 30, 1)
    loader = make_train_loader(shards, batch_size=30, rank=0, world_size=1, seed=0, num_workers=2,
                               error_budget=ErrorBudget(max_bad_samples=1000))
    batches = list(itertools.islice(loader, count))
    assert len(batches) == count and all(x.shape == (30, 1, 28, 28) for x, _ in batches)
    # counted in the worker processes, read here (what the trainer logs as a metric)
    metrics = loader.dataset.errors.metrics()
    assert metrics["data/skipped_samples"] >= 2 and metrics["data/bad_shards"] >= 1
    assert metrics["data/read_samples"] >= count * 30


def test_over_budget_stops_with_an_error_naming_the_shard(damaged):
    shards = open_split(str(damaged["dir"]), "train")
    loader = make_train_loader(shards, batch_size=30, rank=0, world_size=1, seed=0, num_workers=2,
                               error_budget=ErrorBudget(max_bad_samples=0, max_bad_fraction=0.0))
    with pytest.raises(DataError, match=r"train-00000[01]\.tar.*over the error budget"):
        list(itertools.islice(loader, 36))


def test_validation_pads_skipped_samples_and_stays_aligned(damaged):
    val = open_split(str(damaged["dir"]), "val")
    errors = DataErrors()
    with pytest.warns(DataWarning, match=damaged["val_key"]):
        batches = list(iter_eval_batches(val, batch_size=50, rank=0, world_size=1, errors=errors))
    assert len(batches) == 3  # ceil(120 / 50), from the manifest, whatever was skipped
    assert sum(int(mask.sum()) for _, _, mask in batches) == 119 and errors.num_skipped_samples == 1


def test_verify_names_every_damaged_shard(damaged):
    problems = verify_directory(damaged["dir"])
    text = "\n".join(problems)
    assert damaged["bad_key"] in text and damaged["small_key"] in text and damaged["val_key"] in text
    assert "train-000001.tar" in text and "train-000002.tar" not in text


def test_corrupt_block_counts_all_its_images(digit_slice, tmp_path):
    write_shards(digit_slice, tmp_path, samples_per_shard=300, progress=False, layout="block",
                 samples_per_block=16)

    def damage(name, payload):
        if name.endswith("-b00002.images.npy"):
            return encode_npy(np.zeros((16, 27, 28, 1), np.uint8))  # the wrong shape
        return payload

    rewrite_tar(tmp_path / "train-000000.tar", damage)
    errors = DataErrors()
    with pytest.warns(DataWarning, match=r"train-000000\.tar key train-000000-b00002.*skipped 16 samples"):
        read = sum(len(x) for x, _ in read_shard(str(tmp_path / "train-000000.tar"), (28, 28, 1), 300, errors))
    assert read == 284 and errors.num_skipped_samples == 16
