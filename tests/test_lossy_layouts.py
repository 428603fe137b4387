"""`pipeline shards --layout jpg|webp [--quality Q]`: lossy shards for large colour images.

Real colour pixels: 64x64 patches of scikit-learn's two bundled photographs (china.jpg, flower.jpg).
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.__main__ import main
from pipeline.errors import DataErrors
from pipeline.loader import iter_eval_batches, open_split
from pipeline.manifest import read_manifest
from pipeline.shards import read_shard_images, write_shards
from pipeline.sources import ImageSet
from pipeline.verify import verify_directory

# Mean RMS error bounds (grey levels) at the default qualities, with headroom over what was measured
# on these patches (JPEG 95 at 4:4:4: 1.8; WebP 90: 3.1); busy patches reach about twice the mean.
MAX_MEAN_RMS = {"jpg": 2.5, "webp": 4.0}


@pytest.fixture(scope="module")
def photo_patches() -> ImageSet:
    """160 real colour 64x64 patches, 80 from each photograph (the photograph is the label)."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    patches, labels = [], []
    for label, photo in enumerate(load_sample_images().images):  # two 427x640 RGB photographs
        for _ in range(80):
            top, left = rng.integers(0, photo.shape[0] - 64), rng.integers(0, photo.shape[1] - 64)
            patches.append(photo[top : top + 64, left : left + 64])
            labels.append(label)
    return ImageSet("photos", np.stack(patches), np.asarray(labels, np.int64), ("china", "flower"))


def _all_bytes(directory) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.mark.parametrize("layout", ["jpg", "webp"])
def test_same_source_and_seed_give_byte_identical_lossy_shards(photo_patches, tmp_path, layout):
    """Written twice (one process, then two workers): every file, manifest included, byte for byte."""
    write_shards(photo_patches, tmp_path / "a", samples_per_shard=50, layout=layout, progress=False)
    write_shards(photo_patches, tmp_path / "b", samples_per_shard=50, layout=layout, progress=False,
                 num_workers=2)
    first, second = _all_bytes(tmp_path / "a"), _all_bytes(tmp_path / "b")
    assert list(first) == ["manifest.json", "train-000000.tar", "train-000001.tar", "train-000002.tar",
                           "val-000000.tar"]
    assert first == second
    other = write_shards(photo_patches, tmp_path / "c", samples_per_shard=50, layout=layout,
                         progress=False, quality=60)
    assert other.shards("train")[0].sha256 != read_manifest(tmp_path / "a").shards("train")[0].sha256


@pytest.mark.parametrize("layout", ["jpg", "webp"])
def test_lossy_shards_read_back_close_to_the_source(photo_patches, tmp_path, layout):
    manifest = write_shards(photo_patches, tmp_path, samples_per_shard=50, layout=layout, progress=False)
    assert manifest.layout == layout and manifest.image_shape == (64, 64, 3)
    assert manifest.extra["quality"] == {"jpg": 95, "webp": 90}[layout]
    assert verify_directory(tmp_path) == []
    images, labels = read_shard_images(tmp_path / "val-000000.tar", (64, 64, 3))
    # keys name the source index: val-0000123 is photo_patches.images[123]
    import tarfile

    with tarfile.open(tmp_path / "val-000000.tar") as tar:
        names = tar.getnames()
    assert all(name.endswith((f".{layout}", ".cls")) for name in names)
    indices = [int(name.split(".")[0].split("-")[1]) for name in names if name.endswith(layout)]
    originals = photo_patches.images[indices].astype(np.float64)
    rms = np.sqrt(((images.astype(np.float64) - originals) ** 2).mean(axis=(1, 2, 3)))
    assert rms.mean() < MAX_MEAN_RMS[layout] and rms.max() < 2.5 * MAX_MEAN_RMS[layout]  # close...
    assert rms.min() > 0  # ...and really lossy (not a PNG under another name)
    assert labels.tolist() == photo_patches.labels[indices].tolist()
    # the trainer's reader takes them too, with nothing skipped
    errors = DataErrors()
    batches = list(iter_eval_batches(open_split(str(tmp_path), "val"), batch_size=8, rank=0, world_size=1,
                                     errors=errors))
    assert sum(int(valid.sum()) for _, _, valid in batches) == 16 and errors.num_skipped_samples == 0


def test_grey_images_in_lossy_layouts_stay_grey(mnist5k, tmp_path):
    digits = ImageSet("digits", mnist5k.images[::50], mnist5k.labels[::50])  # 100 real digits
    for layout in ("jpg", "webp"):
        manifest = write_shards(digits, tmp_path / layout, samples_per_shard=100, layout=layout,
                                progress=False)
        assert manifest.image_shape == (28, 28, 1) and verify_directory(tmp_path / layout) == []
        images, _ = read_shard_images(tmp_path / layout / "train-000000.tar", (28, 28, 1))
        assert images.shape == (90, 28, 28, 1)


def test_quality_flag(photo_patches, tmp_path, capsys):
    np.savez(tmp_path / "photos.npz", images=photo_patches.images, labels=photo_patches.labels)
    source = str(tmp_path / "photos.npz")
    assert main(["shards", "--source", source, "--out", str(tmp_path / "q"), "--layout", "webp",
                 "--quality", "50", "--quiet"]) == 0
    manifest = read_manifest(tmp_path / "q")
    assert manifest.layout == "webp" and manifest.extra["quality"] == 50
    assert main(["shards", "--source", source, "--out", str(tmp_path / "p"), "--quality", "50"]) == 1  # bad input: a runtime failure (pipeline.cli)
    assert "quality applies to the lossy layouts ('jpg', 'webp'), not to layout 'auto'" in capsys.readouterr().err
    for bad in ("0", "101"):
        assert main(["shards", "--source", source, "--out", str(tmp_path / "r"), "--layout", "jpg",
                     "--quality", bad]) == 1
        assert f"quality must be a whole number from 1 to 100, got {bad}" in capsys.readouterr().err
    assert not (tmp_path / "p").exists() and not (tmp_path / "r").exists()  # refused before writing


@pytest.mark.parametrize("layout", ["npy", "jpg", "webp"])
def test_our_shards_read_with_webdataset_and_its_decoders(photo_patches, tmp_path, layout):
    """webdataset.WebDataset reads each one-image layout with its own decoders, to the same pixels."""
    import webdataset as wds

    write_shards(photo_patches, tmp_path, samples_per_shard=200, layout=layout, progress=False)
    url = str(tmp_path / "train-000000.tar")
    ours, our_labels = read_shard_images(url, (64, 64, 3))
    dataset = wds.WebDataset(url, shardshuffle=False, nodesplitter=wds.split_by_node,
                             workersplitter=wds.split_by_worker, empty_check=False)
    samples = list(dataset.decode("rgb8").to_tuple(layout, "cls"))
    images = np.stack([image for image, _ in samples])
    labels = np.asarray([label for _, label in samples])
    assert images.dtype == np.uint8 and images.shape == (144, 64, 64, 3)
    assert np.array_equal(images, ours) and np.array_equal(labels, our_labels)
