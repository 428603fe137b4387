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


@pytest.mark.parametrize("layout", ["png", "block"])
def test_same_seed_gives_identical_shards(digit_slice, tmp_path, layout):
    first = write_shards(digit_slice, tmp_path / "a", samples_per_shard=200, progress=False, layout=layout)
    second = write_shards(digit_slice, tmp_path / "b", samples_per_shard=200, progress=False,
                          num_workers=2, layout=layout)
    assert first.splits == second.splits  # names, counts, bytes and sha256 of every shard
    other = write_shards(digit_slice, tmp_path / "c", samples_per_shard=200, progress=False,
                         seed=1, layout=layout)
    assert [s.sha256 for s in other.shards("train")] != [s.sha256 for s in first.shards("train")]


def test_refuses_to_overwrite_without_force(digit_slice, tmp_path):
    write_shards(digit_slice, tmp_path, samples_per_shard=600, progress=False)
    with pytest.raises(FileExistsError, match="--force"):
        write_shards(digit_slice, tmp_path, samples_per_shard=600, progress=False)


@pytest.mark.parametrize("layout", ["png", "block"])
def test_verify_catches_a_flipped_byte(digit_slice, tmp_path, layout):
    write_shards(digit_slice, tmp_path, samples_per_shard=300, progress=False, layout=layout)
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


@pytest.mark.parametrize("layout", ["png", "block"])
def test_shards_are_plain_webdataset(digit_slice, tmp_path, layout):
    """webdataset itself reads both layouts (a block is a pre-batched sample)."""
    import webdataset as wds

    write_shards(digit_slice, tmp_path, samples_per_shard=300, progress=False, layout=layout,
                 samples_per_block=32)
    url = str(tmp_path / "train-000001.tar")
    ours, our_labels = read_shard_images(url, (28, 28, 1))
    dataset = wds.WebDataset(url, shardshuffle=False, nodesplitter=wds.split_by_node,
                             workersplitter=wds.split_by_worker, empty_check=False)
    if layout == "png":
        samples = list(dataset.decode("l8").to_tuple("png", "cls"))
        images = np.stack([image for image, _ in samples])[:, :, :, None]
        labels = np.asarray([label for _, label in samples])
    else:
        samples = list(dataset.decode().to_tuple("images.npy", "labels.npy", "keys.json"))
        assert [len(keys) for _, _, keys in samples] == [32] * 9 + [12]
        images = np.concatenate([block for block, _, _ in samples])
        labels = np.concatenate([block_labels for _, block_labels, _ in samples])
    assert images.dtype == np.uint8 and np.array_equal(images, ours) and np.array_equal(labels, our_labels)


@pytest.mark.parametrize("tar_format", ["gnu", "pax", "ustar"])
def test_reader_reads_tars_from_gnu_tar(tmp_path, tar_format):
    import subprocess

    from pipeline.shards import iter_tar_samples

    folder = tmp_path / ("long-" * 12 + "folder") / "inner"  # a path over 100 characters
    folder.mkdir(parents=True)
    (folder / "s0.cls").write_text("3")
    (folder / "s0.npy").write_bytes(b"x" * 700)
    (folder / "s1.cls").write_text("4")
    name = tmp_path / "made.tar"
    members = [str(p.relative_to(tmp_path)) for p in sorted(folder.iterdir())]
    subprocess.run(["tar", f"--format={tar_format}", "-cf", str(name), "-C", str(tmp_path), *members],
                   check=True)
    with open(name, "rb") as handle:
        samples = list(iter_tar_samples(handle, str(name)))
    prefix = str(folder.relative_to(tmp_path))
    assert [s["__key__"] for s in samples] == [f"{prefix}/s0", f"{prefix}/s1"]
    assert samples[0]["cls"] == b"3" and samples[0]["npy"] == b"x" * 700 and samples[1]["cls"] == b"4"


def test_reader_refuses_a_tar_cut_between_members(tmp_path):
    from pipeline.shards import TarFormatError, iter_tar_samples

    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("a.cls", "b.cls"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"1"))
    cut = buffer.getvalue()[:1024]  # exactly the first member: header + one padded block
    with pytest.raises(TarFormatError, match="without the end-of-archive"):
        list(iter_tar_samples(io.BytesIO(cut), "cut.tar"))
    damaged = bytearray(buffer.getvalue())
    damaged[1024 + 10] ^= 0x01  # the second member's name
    with pytest.raises(TarFormatError, match="bad header checksum at byte 1024"):
        list(iter_tar_samples(io.BytesIO(bytes(damaged)), "damaged.tar"))


def test_auto_layout_is_block_for_small_images_png_for_large():
    from pipeline.shards import resolve_layout

    assert resolve_layout("auto", (28, 28, 1)) == "block" and resolve_layout("auto", (64, 64, 3)) == "block"
    assert resolve_layout("auto", (128, 128, 3)) == "png" and resolve_layout("npy", (128, 128, 3)) == "npy"
