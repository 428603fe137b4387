"""Fashion-MNIST as a bundled source: `--source fashion-mnist` and `torchvision:FashionMNIST`, offline.

The data is Debian's package dataset-fashion-mnist (`make test` installs it when run as root, see
scripts/ensure-fashion-mnist.sh); tests that need it skip, saying so, where it is not installed.
"""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from pipeline.__main__ import main
from pipeline.manifest import read_manifest
from pipeline.shards import read_shard_images, write_shards
from pipeline.sources import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist, load_torchvision,
                              read_idx, unpack_fashion_mnist)

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} "
           "(apt-get install dataset-fashion-mnist; `make test` does it when run as root)")


@pytest.fixture(scope="module")
def fashion():
    return load_fashion_mnist()


@pytest.fixture(scope="module")
def fashion_slice(fashion):
    """300 training and 100 test images (the first of each split), its own split kept."""
    return fashion.subset(np.r_[0:300, 60000:60100])


def write_idx_gz(path, array: np.ndarray) -> None:
    header = np.asarray([0x800 + array.ndim, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes(), mtime=0))


@needs_fashion_mnist
def test_the_whole_set_with_its_own_split(fashion):
    assert fashion.name == "fashion-mnist" and fashion.images.shape == (70000, 28, 28, 1)
    assert fashion.class_names == FASHION_MNIST_CLASSES and fashion.class_names[0] == "T-shirt/top"
    assert fashion.val_mask.sum() == 10000 and not fashion.val_mask[:60000].any()
    assert np.bincount(fashion.labels[fashion.val_mask]).tolist() == [1000] * 10
    assert np.bincount(fashion.labels[~fashion.val_mask]).tolist() == [6000] * 10
    assert 0.28 < fashion.images.mean() / 255 < 0.29  # Fashion-MNIST's published mean is 0.286


@needs_fashion_mnist
def test_a_slice_to_shards_keeps_test_as_val(fashion_slice, tmp_path):
    manifest = write_shards(fashion_slice, tmp_path, samples_per_shard=128, progress=False, layout="png")
    assert manifest.num_samples("train") == 300 and manifest.num_samples("val") == 100
    assert manifest.extra["split"] == "source" and manifest.class_names == FASHION_MNIST_CLASSES
    val = np.concatenate([read_shard_images(tmp_path / s.name, (28, 28, 1))[0] for s in manifest.shards("val")])
    assert sorted(im.tobytes() for im in val) == sorted(im.tobytes() for im in fashion_slice.images[300:])
    # a --val-fraction replaces the source's split by a per-class one over both
    mixed = write_shards(fashion_slice, tmp_path / "mixed", samples_per_shard=500, progress=False,
                         val_fraction=0.5)
    assert mixed.extra["split"] == "stratified" and mixed.num_samples("val") in range(190, 211)
    # a slice with no test images has no val split of its own: say so, and how to get one
    with pytest.raises(ValueError, match="its own split has 300 train and 0 val samples; pass --val-fraction"):
        write_shards(fashion_slice.subset(np.arange(300)), tmp_path / "none", progress=False)


@needs_fashion_mnist
def test_cli_reads_the_idx_files_from_data_root(fashion_slice, tmp_path, capsys):
    """`--data-root DIR` with the four gzipped idx files (a slice of the real set) instead of Debian's."""
    root = tmp_path / "fm"
    root.mkdir()
    train, test = np.r_[0:300], np.r_[300:400]
    for prefix, index in (("train", train), ("t10k", test)):
        write_idx_gz(root / f"{prefix}-images-idx3-ubyte.gz", fashion_slice.images[index, :, :, 0])
        write_idx_gz(root / f"{prefix}-labels-idx1-ubyte.gz", fashion_slice.labels[index])
    out = tmp_path / "shards"
    assert main(["shards", "--source", "fashion-mnist", "--data-root", str(root), "--out", str(out),
                 "--quiet"]) == 0
    assert "train: 300 samples in 1 shards\nval: 100 samples in 1 shards" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest.source == "fashion-mnist" and manifest.class_names == FASHION_MNIST_CLASSES
    assert manifest.extra["class_counts"]["val"] == np.bincount(fashion_slice.labels[test], minlength=10).tolist()


@needs_fashion_mnist
def test_torchvision_reads_debians_copy_with_no_download(fashion, tmp_path):
    """torchvision:FashionMNIST in an empty data root: Debian's files are unpacked where torchvision
    looks (ROOT/FashionMNIST/raw), and torchvision's own reader gives exactly our arrays and split."""
    theirs = load_torchvision("FashionMNIST", tmp_path, download=False)
    assert sorted(p.name for p in (tmp_path / "FashionMNIST" / "raw").iterdir()) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    assert np.array_equal(theirs.images, fashion.images) and np.array_equal(theirs.labels, fashion.labels)
    assert np.array_equal(theirs.val_mask, fashion.val_mask) and theirs.class_names == FASHION_MNIST_CLASSES
    assert unpack_fashion_mnist(tmp_path) is False  # already there: nothing to do


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    assert main(["shards", "--source", "fashion-mnist", "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "out")]) == 1  # bad input: a runtime failure (pipeline.cli)
    assert f"no train-images-idx3-ubyte.gz (or train-images-idx3-ubyte) in {tmp_path}" in capsys.readouterr().err


def test_read_idx_refuses_damaged_files(tmp_path):
    good = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx_gz(tmp_path / "good.gz", good)
    assert np.array_equal(read_idx(tmp_path / "good.gz"), good)
    data = gzip.decompress((tmp_path / "good.gz").read_bytes())
    (tmp_path / "plain").write_bytes(data)
    assert np.array_equal(read_idx(tmp_path / "plain"), good)  # uncompressed too (torchvision's raw/)
    (tmp_path / "short").write_bytes(data[:-1])
    with pytest.raises(ValueError, match=r"short: header says shape \(2, 3, 4\), but 23 bytes of data follow"):
        read_idx(tmp_path / "short")
    (tmp_path / "float").write_bytes(b"\0\0\x0d\x01" + data[4:])
    with pytest.raises(ValueError, match="float: not a uint8 idx file"):
        read_idx(tmp_path / "float")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(data)[:-12])
    with pytest.raises(ValueError, match="bad.gz"):
        read_idx(tmp_path / "bad.gz")
