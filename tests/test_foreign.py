"""Foreign WebDatasets (written by webdataset.TarWriter here, in the test): jpg + cls, webp + json,
png + txt class names, .tar.gz, no labels, no manifest. Read by our loader as they are, indexed
by `pipeline index`, verified; bad samples skipped, counted and named. And our shards read with
webdataset.WebDataset. Real files, real worker processes, no mocks."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.data import open_train_val
from pipeline.errors import DataError, DataErrors, DataWarning, ErrorBudget
from pipeline.foreign import SampleDecoder
from pipeline.images import encode_npy, fit_image
from pipeline.index import index_shards, verify_foreign
from pipeline.loader import batches_per_epoch, iter_eval_batches, make_train_loader, read_shard
from pipeline.manifest import sha256_of
from pipeline.shards import read_shard_images, write_shards
from pipeline.urls import RetryPolicy

FAST_RETRY = RetryPolicy(attempts=2, backoff_s=0.01, timeout_s=5)
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MODEL_SHAPE = (28, 28, 3)


def colour_digits(images: np.ndarray) -> np.ndarray:
    """28x28 grey digits as 36x32 RGB (tinted, padded): not the model's size or channels."""
    rgb = np.repeat(images, 3, axis=3)
    rgb[..., 0] = 255 - rgb[..., 0] // 2
    return np.pad(rgb, ((0, 0), (4, 4), (2, 2), (0, 0)))


def encode(image: np.ndarray, ext: str) -> bytes:
    if ext == "npy":
        return encode_npy(image)
    buffer = io.BytesIO()
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    pil.save(buffer, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "ppm": "PPM"}[ext],
             **({"lossless": True} if ext == "webp" else {}))
    return buffer.getvalue()


def label_member(label: int, kind: str) -> dict:
    if kind == "cls":
        return {"cls": str(label).encode()}
    if kind == "json":
        return {"json": json.dumps({"label": label, "caption": "a digit"}).encode()}
    if kind == "txt":
        return {"txt": NAMES[label].encode()}
    return {}


def write_foreign(folder: Path, images: np.ndarray, labels: np.ndarray, *, ext: str, label: str,
                  per_shard: int, suffix: str = ".tar") -> list[Path]:
    """Shards `000000{suffix}`, ... written by webdataset.TarWriter (gzip when suffix is .tar.gz)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, start in enumerate(range(0, len(images), per_shard)):
        path = folder / f"{number:06d}{suffix}"
        with wds.TarWriter(str(path)) as writer:
            for index in range(start, min(start + per_shard, len(images))):
                writer.write({"__key__": f"sample{index:06d}", ext: encode(images[index], ext),
                              **label_member(int(labels[index]), label)})
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def digits(digit_slice):
    """480 real digits (48 per class), shuffled, as 36x32 RGB."""
    order = np.random.default_rng(0).permutation(len(digit_slice.labels))[:480]
    return colour_digits(digit_slice.images[order]), digit_slice.labels[order].astype(np.int64)


FORMATS = {  # name: (image member, label member, label key for training, shard suffix)
    "jpg+cls": ("jpg", "cls", "auto", ".tar"),
    "webp+json": ("webp", "json", "json:label", ".tar"),
    "png+txt": ("png", "txt", "txt", ".tar"),
    "jpg+cls.tar.gz": ("jpg", "cls", "auto", ".tar.gz"),
    "npy, no labels": ("npy", "none", "auto", ".tgz"),
}


def decoded_by_hand(images: np.ndarray, ext: str) -> np.ndarray:
    """What training must see: the stored image decoded, then fitted as `pipeline shards` fits."""
    from pipeline.images import decode_image, decode_npy

    raw = [decode_npy(encode(i, ext)) if ext == "npy" else decode_image(encode(i, ext), channels=3)
           for i in images]
    return np.stack([fit_image(i, 28, 3) for i in raw])


@pytest.mark.parametrize("name", FORMATS)
def test_indexed_tarwriter_set_reads_every_sample_fitted_to_the_model(name, digits, tmp_path):
    ext, label, label_key, suffix = FORMATS[name]
    images, labels = digits
    write_foreign(tmp_path, images, labels, ext=ext, label=label, per_shard=80, suffix=suffix)
    manifest, where = index_shards(str(tmp_path), progress=False, label_key=label_key)  # last of 6 validates
    assert where == f"{tmp_path}/manifest.json"
    assert manifest.layout == "wds" and manifest.num_samples("train") == 400 and manifest.num_samples("val") == 80
    index = manifest.extra["index"]
    assert index["image_key"] == ext and index["image_sizes"] == {"36x32x3": 480} and index["num_problems"] == 0
    if label == "txt":  # class names become labels 0..9 in sorted-name order
        assert manifest.class_names == tuple(sorted(NAMES))
    elif label != "none":
        assert manifest.num_classes == 10 and [c for _, c in index["labels"]] == np.bincount(labels).tolist()
    for shard in manifest.splits["train"]:
        assert shard.sha256 == sha256_of(tmp_path / shard.name)

    train, val = open_train_val(str(tmp_path), image_shape=MODEL_SHAPE)  # keys from the index
    got = [(x, y, m) for x, y, m in iter_eval_batches(train, batch_size=64, rank=0, world_size=1)]
    x = np.concatenate([b[0].numpy()[b[2].numpy()] for b in got]).transpose(0, 2, 3, 1)
    y = np.concatenate([b[1].numpy()[b[2].numpy()] for b in got])
    assert x.shape == (400, 28, 28, 3)
    expected_labels = labels[:400] if label in ("cls", "json") else (
        np.asarray([sorted(NAMES).index(NAMES[c]) for c in labels[:400]]) if label == "txt" else np.full(400, -1))
    np.testing.assert_array_equal(y, expected_labels)
    np.testing.assert_array_equal(x, decoded_by_hand(images[:400], ext))
    assert verify_foreign(str(tmp_path)) == []


def test_no_manifest_approximate_epochs_equal_batches_on_uneven_shards(digits, tmp_path):
    images, labels = digits
    write_foreign(tmp_path, images[:410], labels[:410], ext="jpg", label="cls", per_shard=90)  # 90 x4 + 50
    counts = []
    for rank in range(2):
        train, val = open_train_val(f"{tmp_path}/{{000000..000004}}.tar", image_shape=MODEL_SHAPE,
                                    samples_per_epoch=640, announce=False)
        assert train.num_samples == 640 and len(train.urls) == 4 and val.counts == [50]
        steps = batches_per_epoch(train.num_samples, 32, 2)
        loader = make_train_loader(train, batch_size=32, rank=rank, world_size=2, seed=1, num_workers=2, epoch=2)
        batches = list(itertools.islice(loader, steps))
        counts.append([len(x) for x, _ in batches])
        assert all(x.shape == (32, 3, 28, 28) for x, _ in batches) and loader.dataset.errors.num_skipped_samples == 0
    assert counts[0] == counts[1] == [32] * 10


def test_indexed_set_is_each_sample_once_per_epoch_across_ranks_and_workers(digits, tmp_path):
    images, _ = digits
    labels = np.arange(480)  # the label names the sample
    write_foreign(tmp_path, images, labels, ext="png", label="cls", per_shard=48)  # 8 train shards + 2 val
    index_shards(str(tmp_path), progress=False, workers=2, val_shards=2)
    train, _ = open_train_val(str(tmp_path), image_shape=MODEL_SHAPE)
    for epoch in (0, 1):
        seen = []
        for rank in range(2):  # 8 shards over 2 ranks x 2 workers: they divide evenly
            loader = make_train_loader(train, batch_size=24, rank=rank, world_size=2, seed=3, num_workers=2,
                                       epoch=epoch)
            seen += [int(v) for _, y in itertools.islice(loader, batches_per_epoch(384, 24, 2)) for v in y]
        assert sorted(seen) == list(range(384))  # every training sample exactly once


def test_our_shards_read_with_webdataset(digit_slice, tmp_path):
    write_shards(digit_slice, tmp_path, samples_per_shard=300, progress=False, layout="png")
    urls = sorted(str(p) for p in tmp_path.glob("train-*.tar"))
    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False)
               .decode("l8").to_tuple("png", "cls"))
    theirs = list(dataset)
    ours = [read_shard_images(url, (28, 28, 1)) for url in urls]
    ours_x, ours_y = np.concatenate([x for x, _ in ours]), np.concatenate([y for _, y in ours])
    assert len(theirs) == len(ours_x) == 1080
    np.testing.assert_array_equal(np.stack([x for x, _ in theirs]), ours_x[:, :, :, 0])
    np.testing.assert_array_equal([y for _, y in theirs], ours_y)


def bad_samples_set(images, labels, folder: Path) -> Path:
    """One TarWriter shard of 40 digits with six damaged samples, and a clean one."""
    write_foreign(folder, images[40:80], labels[40:80], ext="jpg", label="cls", per_shard=40)
    (folder / "000000.tar").rename(folder / "000001.tar")
    jpg = encode(images[0], "jpg")
    samples = [{"__key__": f"good{i:03d}", "jpg": encode(images[i], "jpg"), "cls": b"1"} for i in range(34)]
    samples += [
        {"__key__": "garbage", "jpg": b"\xff\xd8\xff\xe0 not a jpeg at all", "cls": b"1"},
        {"__key__": "truncated", "jpg": jpg[: len(jpg) // 3], "cls": b"1"},
        {"__key__": "noimage", "cls": b"1", "txt": b"caption only"},
        {"__key__": "badlabel", "jpg": jpg, "cls": b"seven"},
        {"__key__": "floatnpy", "npy": encode_npy(np.zeros((8, 8), np.float32)), "cls": b"1"},
        {"__key__": "bomb", "png": _huge_png_header(), "cls": b"1"},
    ]
    with wds.TarWriter(str(folder / "000000.tar")) as writer:
        for sample in samples:
            writer.write(sample)
    return folder / "000000.tar"


def _huge_png_header() -> bytes:
    """A decompression bomb's header: a real PNG declaring 5000x5000 pixels (over the 4096x4096
    default bound), tiny on disk."""
    from tests.test_images import _png_declaring

    return _png_declaring(5000, 5000)


def test_bad_foreign_samples_are_skipped_counted_and_named(digits, tmp_path):
    images, labels = digits
    shard = bad_samples_set(images, labels, tmp_path)
    manifest, _ = index_shards(str(tmp_path), progress=False, val_shards=1)
    assert manifest.extra["index"]["num_problems"] == 6  # image headers and labels are enough to find them
    decoder = SampleDecoder(MODEL_SHAPE)
    errors = DataErrors(ErrorBudget(max_bad_samples=10))
    with pytest.warns(DataWarning) as caught:
        chunks = list(read_shard(str(shard), MODEL_SHAPE, 40, errors, FAST_RETRY, decoder))
    assert sum(len(x) for x, _ in chunks) == 34 and errors.num_skipped_samples == 6
    named = "\n".join(str(w.message) for w in caught)
    for key in ("garbage", "truncated", "noimage", "badlabel", "floatnpy", "bomb"):
        assert f"000000.tar key {key}" in named, named
    assert "no image member" in named and "does not parse" in named and "refused before decoding" in named
    problems = verify_foreign(str(tmp_path))
    assert len(problems) == 6 and all(p.startswith("000000.tar: ") for p in problems), problems

    with pytest.raises(DataError, match=r"000000\.tar key \w+: .*over the error budget"):
        list(read_shard(str(shard), MODEL_SHAPE, 40, DataErrors(ErrorBudget(max_bad_samples=3)), FAST_RETRY, decoder))


def test_a_vanished_shard_is_counted_once_and_training_goes_on(digits, tmp_path):
    images, labels = digits
    write_foreign(tmp_path, images, labels, ext="jpg", label="cls", per_shard=60)
    index_shards(str(tmp_path), progress=False)
    train, _ = open_train_val(str(tmp_path), image_shape=MODEL_SHAPE)
    (tmp_path / "000002.tar").unlink()
    loader = make_train_loader(train, batch_size=30, rank=0, world_size=1, seed=0, num_workers=0,
                               error_budget=ErrorBudget(max_bad_samples=60), retry=FAST_RETRY)
    with pytest.warns(DataWarning, match=r"000002\.tar: .*cannot open"):
        batches = list(itertools.islice(loader, 3 * batches_per_epoch(420, 30, 1)))  # three epochs
    assert len(batches) == 42 and all(len(x) == 30 for x, _ in batches)
    assert loader.dataset.errors.num_bad_shards == 1 and loader.dataset.errors.num_skipped_samples == 60


def test_index_cli_and_verify_cli_name_a_damaged_shard(digits, tmp_path):
    from pipeline.__main__ import main

    images, labels = digits
    write_foreign(tmp_path / "set", images[:200], labels[:200], ext="webp", label="json", per_shard=50)
    out = tmp_path / "elsewhere" / "faces.json"
    out.parent.mkdir()
    assert main(["index", f"{tmp_path}/set/{{000000..000003}}.tar", "--out", str(out), "--label-key",
                 "json:label", "--workers", "2", "--quiet"]) == 0
    assert json.loads(out.read_text())["extra"]["index"]["base"] == str(tmp_path / "set")
    assert main(["verify", str(out)]) == 0
    train, val = open_train_val(str(out), image_shape=MODEL_SHAPE)
    assert train.counts == [50, 50, 50] and val.counts == [50]
    shard = tmp_path / "set" / "000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    problems = verify_foreign(str(out))
    assert any(p.startswith("000001.tar: unreadable tar") for p in problems), problems
    assert any(p.startswith("000001.tar: sha256") for p in problems), problems
    assert main(["verify", str(out)]) == 1


def test_foreign_flags_are_checked_where_they_enter():
    from train.config import ConfigError, build_config

    with pytest.raises(ConfigError) as error:
        build_config({"data": {"label_key": "json", "image_key": ".jpg", "samples_per_epoch": -1}})
    for text in ("data.label_key", "json:FIELD", "data.image_key", "data.samples_per_epoch"):
        assert text in str(error.value)


def test_gzip_shard_cut_short_is_a_counted_bad_shard(digits, tmp_path):
    images, labels = digits
    (path,) = write_foreign(tmp_path, images[:60], labels[:60], ext="jpg", label="cls", per_shard=60,
                            suffix=".tar.gz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    errors = DataErrors(ErrorBudget(max_bad_samples=100))
    with pytest.warns(DataWarning, match=r"000000\.tar\.gz: skipped \d+ samples: unreadable tar"):
        got = sum(len(x) for x, _ in read_shard(str(path), MODEL_SHAPE, 60, errors, FAST_RETRY,
                                                SampleDecoder(MODEL_SHAPE)))
    assert 0 < got < 60 and errors.num_skipped_samples == 60 - got and errors.num_bad_shards == 1
    with tarfile.open(path) as broken, pytest.raises((EOFError, tarfile.ReadError)):
        broken.getmembers()  # really damaged


def test_a_manifest_elsewhere_may_name_a_folder_never_a_command(digits, tmp_path):
    images, labels = digits
    write_foreign(tmp_path / "set", images[:100], labels[:100], ext="jpg", label="cls", per_shard=50)
    out = tmp_path / "m.json"
    index_shards(str(tmp_path / "set"), out=str(out), progress=False)
    data = json.loads(out.read_text())
    for base in (f"pipe:touch {tmp_path}/owned #", "relative/folder"):
        data["extra"]["index"]["base"] = base
        out.write_text(json.dumps(data))
        with pytest.raises(ValueError, match="extra.index.base .* is not a folder URL or absolute path"):
            open_train_val(str(out), image_shape=MODEL_SHAPE)
    assert not (tmp_path / "owned").exists()


def test_inspect_describes_an_indexed_foreign_set_and_previews_it(digits, tmp_path):
    from pipeline.summary import describe

    images, labels = digits
    write_foreign(tmp_path / "set", images[:100], labels[:100], ext="webp", label="cls", per_shard=50)
    index_shards(str(tmp_path / "set"), progress=False)
    text = describe(str(tmp_path / "set"), preview=tmp_path / "grid.png", num_preview=16)
    assert "layout wds" in text and "image webp, label cls" in text and "'36x32x3': 100" in text
    assert Image.open(tmp_path / "grid.png").size[0] > 0


def test_a_gzip_bomb_member_is_refused_before_it_is_read(tmp_path):
    """A .tar.gz holding one 300 MB member of zeros (300 KB compressed): the shard is bad, and the
    reader never holds the member (webdataset's tar stage would read it whole into memory)."""
    import gzip
    import tracemalloc

    from pipeline.shards import MAX_MEMBER_BYTES

    size = MAX_MEMBER_BYTES + (44 << 20)
    path = tmp_path / "000000.tar.gz"
    with gzip.open(path, "wb", compresslevel=1) as raw, tarfile.open(fileobj=raw, mode="w|") as tar:
        info = tarfile.TarInfo("bomb.npy")
        info.size = size
        chunk = bytes(1 << 20)
        tar.addfile(info, io.BufferedReader(io.BytesIO(chunk * (size >> 20))))
    errors = DataErrors(ErrorBudget(max_bad_samples=10))
    tracemalloc.start()
    try:
        with pytest.warns(DataWarning, match=r"000000\.tar\.gz: skipped 1 sample: unreadable tar after 0 samples"):
            assert list(read_shard(str(path), MODEL_SHAPE, 1, errors, FAST_RETRY, SampleDecoder(MODEL_SHAPE))) == []
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert errors.num_bad_shards == 1
    assert peak_bytes < 64 << 20  # the member was never read (300 MB)


def test_index_takes_validation_shards_by_pattern(digits, tmp_path):
    images, labels = digits
    write_foreign(tmp_path, images[:160], labels[:160], ext="jpg", label="cls", per_shard=40)
    manifest, _ = index_shards(f"{tmp_path}/{{000000..000003}}.tar", val=f"{tmp_path}/000001.tar", progress=False)
    assert [s.name for s in manifest.splits["train"]] == ["000000.tar", "000002.tar", "000003.tar"]
    assert [s.name for s in manifest.splits["val"]] == ["000001.tar"]
    with pytest.raises(ValueError, match="--val-shards 4 must leave at least one for training"):
        index_shards(f"{tmp_path}/{{000000..000003}}.tar", val_shards=4, progress=False)
