"""Sources -> shards through the CLI: image folders, NumPy arrays, torchvision names, inspect."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.__main__ import main
from pipeline.images import resize_center_crop
from pipeline.manifest import read_manifest, sha256_of
from pipeline.shards import read_shard_images


@pytest.fixture(scope="module")
def image_folder(mnist5k, tmp_path_factory):
    """Real digits as files: three class folders, RGB and grey, PNG and JPEG, mixed sizes."""
    root = tmp_path_factory.mktemp("folder") / "digits"
    for label, name in enumerate(["zero", "one", "two"]):
        (root / name).mkdir(parents=True)
        picks = np.flatnonzero(mnist5k.labels == label)[:12]
        for n, index in enumerate(picks):
            grey = Image.fromarray(mnist5k.images[index, :, :, 0])
            if n % 3 == 0:  # RGB, wider than tall, JPEG
                grey.convert("RGB").resize((42, 30)).save(root / name / f"{n}.jpg", quality=95)
            elif n % 3 == 1:  # grey, taller than wide
                grey.resize((30, 40)).save(root / name / f"{n}.png")
            else:
                grey.save(root / name / f"{n}.png")
    (root / "one" / "notes.txt").write_text("not an image: ignored by extension")
    return root


def test_image_folder_to_grey_shards(image_folder, tmp_path):
    out = tmp_path / "shards"
    assert main(["shards", "--source", str(image_folder), "--out", str(out), "--image-size", "16",
                 "--channels", "1", "--samples-per-shard", "10", "--val-fraction", "0.25",
                 "--quiet", "--layout", "png"]) == 0
    manifest = read_manifest(out)
    assert manifest.image_shape == (16, 16, 1) and manifest.class_names == ("one", "two", "zero")
    assert manifest.num_samples("train") == 27 and manifest.num_samples("val") == 9
    assert manifest.source == "digits" and manifest.layout == "png"
    images, labels = read_shard_images(out / "val-000000.tar", (16, 16, 1))
    assert images.shape == (9, 16, 16, 1) and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert 0.05 < manifest.pixel_mean < 0.3  # white digits on black
    assert manifest.extra["class_counts"] == {"train": [9, 9, 9], "val": [3, 3, 3]}


def test_image_folder_rgb_keeps_three_channels(image_folder, tmp_path):
    assert main(["shards", "--source", str(image_folder), "--out", str(tmp_path), "--image-size", "24",
                 "--channels", "3", "--samples-per-shard", "40", "--quiet"]) == 0
    manifest = read_manifest(tmp_path)
    assert manifest.image_shape == (24, 24, 3) and len(manifest.channel_mean) == 3
    images, _ = read_shard_images(tmp_path / "train-000000.tar", (24, 24, 3))
    assert images.shape == (33, 24, 24, 3)  # 36 minus 10% of each class


def test_npz_arrays_nchw_floats(mnist5k, tmp_path):
    x = mnist5k.images[:300].transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # (N, 1, 28, 28) in [0, 1]
    np.savez(tmp_path / "arrays.npz", images=x, labels=mnist5k.labels[:300])
    out = tmp_path / "shards"
    assert main(["shards", "--source", str(tmp_path / "arrays.npz"), "--out", str(out),
                 "--samples-per-shard", "100", "--quiet"]) == 0
    manifest = read_manifest(out)
    assert manifest.image_shape == (28, 28, 1) and manifest.source == "arrays"
    images = np.concatenate([read_shard_images(out / s.name, (28, 28, 1))[0]
                             for s in manifest.shards("train") + manifest.shards("val")])
    originals = {im.tobytes() for im in mnist5k.images[:300]}
    assert len(images) == 300 and all(im.tobytes() in originals for im in images)  # exact round trip


def test_npy_images_without_labels(mnist5k, tmp_path):
    np.save(tmp_path / "x.npy", mnist5k.images[:50, :, :, 0])
    assert main(["shards", "--source", str(tmp_path / "x.npy"), "--out", str(tmp_path / "s"),
                 "--image-size", "14", "--quiet"]) == 0
    assert read_manifest(tmp_path / "s").image_shape == (14, 14, 1)


def test_unknown_sources_are_clear_errors(tmp_path, capsys):
    assert main(["shards", "--source", "torchvision:NoSuchSet", "--out", str(tmp_path / "a")]) == 1
    error = capsys.readouterr().err
    assert "unknown torchvision dataset 'NoSuchSet'" in error and "FashionMNIST" in error
    assert main(["shards", "--source", "nowhere", "--out", str(tmp_path / "b")]) == 1
    assert "unknown source 'nowhere'" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    np.savez(bad, weights=np.zeros(3))
    assert main(["shards", "--source", str(bad), "--out", str(tmp_path / "c")]) == 1
    assert "no image array" in capsys.readouterr().err


def test_shard_size_mb_and_seed(tmp_path):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed, workers in ((first, 0, "1"), (second, 0, "2"), (other, 1, "1")):
        assert main(["shards", "--source", "digits", "--out", str(out), "--shard-size-mb", "0.05",
                     "--seed", str(seed), "--workers", workers, "--quiet"]) == 0
    manifest = read_manifest(first)
    sizes = [s.num_bytes for s in manifest.shards("train")]
    assert len(sizes) > 3 and all(size <= 0.05 * 2**20 * 1.1 for size in sizes)
    assert manifest.image_shape == (8, 8, 1) and manifest.seed == 0
    digests = lambda d: [s.sha256 for s in read_manifest(d).shards("train")]  # noqa: E731
    assert digests(first) == digests(second) != digests(other)
    assert all(sha256_of(first / s.name) == s.sha256 for s in manifest.shards("train"))


def test_refuses_a_non_empty_output_without_force(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["shards", "--source", "digits", "--out", str(tmp_path), "--quiet"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["shards", "--source", "digits", "--out", str(tmp_path), "--quiet", "--force"]) == 0


def test_inspect_prints_counts_and_writes_a_preview(small_shards, tmp_path, capsys):
    preview = tmp_path / "preview.png"
    assert main(["inspect", str(small_shards), "--preview", str(preview), "--num", "16"]) == 0
    text = capsys.readouterr().out
    assert "train      1080 samples in 12 shards" in text and "28x28x1" in text
    grid = np.asarray(Image.open(preview))
    assert grid.shape[0] > 28 * 2 and grid.std() > 10  # real digits, not a blank image


def test_resize_center_crop_keeps_the_middle():
    image = np.zeros((40, 20, 1), np.uint8)
    image[10:30] = 255  # a white band in the middle rows
    out = resize_center_crop(image, 10)
    assert out.shape == (10, 10, 1)
    assert out.min() > 200  # scaled by 1/2 then the centre 10 rows: all inside the band


def test_verify_cli_exit_codes(digit_slice, tmp_path, capsys):
    from pipeline.shards import write_shards

    write_shards(digit_slice, tmp_path, samples_per_shard=600, progress=False)
    assert main(["verify", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["splits"]["train"][0]["num_samples"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(tmp_path)]) == 1
    assert "train-000000.tar: 600 samples, manifest says 601" in capsys.readouterr().err


def write_idx(path, array: np.ndarray) -> None:
    """MNIST's idx format (uint8): magic 0x0000080N, big-endian dims, then the bytes."""
    header = np.asarray([0x800 + array.ndim, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_torchvision_source_reads_a_local_copy(mnist5k, tmp_path, capsys):
    """torchvision:MNIST through torchvision's own reader, from files already on disk (no download);
    its own split is kept: t10k -> val."""
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    picks = np.concatenate([np.flatnonzero(mnist5k.labels == c)[:30] for c in range(10)])
    for prefix, index in (("train", picks), ("t10k", picks[:20])):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", mnist5k.images[index, :, :, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", mnist5k.labels[index])
    out = tmp_path / "shards"
    assert main(["shards", "--source", "torchvision:MNIST", "--data-root", str(tmp_path / "root"),
                 "--out", str(out), "--quiet"]) == 0
    manifest = read_manifest(out)
    assert manifest.source == "MNIST" and manifest.image_shape == (28, 28, 1)
    assert manifest.num_samples("train") == 300 and manifest.num_samples("val") == 20
    assert manifest.extra["split"] == "source" and manifest.class_names[0].startswith("0")
    val_images, _ = read_shard_images(out / "val-000000.tar", (28, 28, 1))
    assert sorted(im.tobytes() for im in val_images) == sorted(im.tobytes() for im in mnist5k.images[picks[:20]])
    # not on disk and no --download: a clear error, no network
    assert main(["shards", "--source", "torchvision:KMNIST", "--data-root", str(tmp_path / "root"),
                 "--out", str(tmp_path / "f")]) == 1
    assert "--download" in capsys.readouterr().err
