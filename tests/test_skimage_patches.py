"""`--source skimage-patches`: 64x64 RGB patches of scikit-image's bundled colour photographs,
train/val split by photograph (issue 14's colour benchmark data)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.__main__ import build_parser, main
from pipeline.manifest import read_manifest
from pipeline.shards import read_shard_images
from pipeline.sources import (MAX_PATCHES_PER_PHOTO, SKIMAGE_PHOTOS, SKIMAGE_VAL_PHOTOS, SOURCES, cut_patches,
                              load_skimage_patches, patch_stride)

pytest.importorskip("skimage", reason="scikit-image is not installed (pip install scikit-image)")


@pytest.fixture(scope="module")
def patches():
    return load_skimage_patches()


def test_patches_are_real_colour_and_split_by_photograph(patches):
    assert patches.images.shape[1:] == (64, 64, 3) and 2000 < len(patches.images) < 2600
    assert patches.class_names == SKIMAGE_PHOTOS
    val_labels = {SKIMAGE_PHOTOS.index(name) for name in SKIMAGE_VAL_PHOTOS}
    assert set(patches.labels[patches.val_mask].tolist()) == val_labels
    assert not val_labels & set(patches.labels[~patches.val_mask].tolist())  # no photograph on both sides
    assert 400 < patches.val_mask.sum() < 700
    # no photograph outweighs the rest (the stereo motorcycle is two views of one scene)
    counts = dict(zip(SKIMAGE_PHOTOS, np.bincount(patches.labels).tolist()))
    assert max(n for name, n in counts.items() if name != "stereo_motorcycle") <= MAX_PATCHES_PER_PHOTO
    assert counts["stereo_motorcycle"] <= 2 * MAX_PATCHES_PER_PHOTO and min(counts.values()) > 100
    flat = patches.images.reshape(len(patches.images), -1)
    assert flat.std(axis=1).min() >= 2.0  # no solid patches (the retina's black surround is left out)
    # colour, not grey stored as RGB
    assert np.abs(patches.images[..., 0].astype(int) - patches.images[..., 2]).mean() > 10


def test_large_photographs_get_a_wider_stride():
    assert patch_stride(512, 512) == 32  # 15 x 15 = 225 windows
    stride = patch_stride(1411, 1411)  # the retina: 43 x 43 windows at 32
    assert stride > 32 and ((1411 - 64) // stride + 1) ** 2 <= MAX_PATCHES_PER_PHOTO
    assert ((1411 - 64) // (stride - 1) + 1) ** 2 > MAX_PATCHES_PER_PHOTO  # the smallest such stride


def test_cut_patches_in_raster_order():
    photo = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    cut = cut_patches(photo, size=3, stride=2)
    assert cut.shape == (2 * 3, 3, 3, 3)  # rows at 0, 2; columns at 0, 2, 4
    assert np.array_equal(cut[0], photo[0:3, 0:3]) and np.array_equal(cut[5], photo[2:5, 4:7])


def test_cli_writes_them_with_val_photographs_held_out(patches, tmp_path):
    out = tmp_path / "shards"
    assert main(["shards", "--source", "skimage-patches", "--out", str(out), "--image-size", "16",
                 "--samples-per-shard", "4000", "--quiet"]) == 0
    manifest = read_manifest(out)
    assert manifest.source == "skimage-patches" and manifest.image_shape == (16, 16, 3)
    assert manifest.extra["split"] == "source" and manifest.class_names == SKIMAGE_PHOTOS
    assert manifest.num_samples("val") == patches.val_mask.sum()
    _, val_labels = read_shard_images(out / "val-000000.tar", (16, 16, 3))
    assert {SKIMAGE_PHOTOS[label] for label in val_labels} == set(SKIMAGE_VAL_PHOTOS)


def test_every_bundled_source_is_named_in_the_help():
    shards = build_parser()._subparsers._group_actions[0].choices["shards"]
    text = next(action.help for action in shards._actions if action.dest == "source")
    assert [name for name in SOURCES if f"{name} (" not in text] == []
