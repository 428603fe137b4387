"""Writing and reading WebDataset tar shards: numpy, Pillow and the standard library only.

Layouts (recorded in manifest.json as `layout`):
- "png": one image per sample, `KEY.png` + `KEY.cls` (label as ASCII): the plain WebDataset
  convention every WebDataset reader understands.
- "npy": the same with the raw pixels as `KEY.npy` (HxWxC uint8).
- "jpg" / "webp": the same with a lossy `KEY.jpg` (4:4:4) or `KEY.webp` at `quality` (recorded in
  the manifest's `extra`): for large colour images, where PNG costs 2-6x their bytes.
- "block": `samples_per_block` images per sample, `KEY.images.npy` ((n,H,W,C) uint8),
  `KEY.labels.npy` ((n,) int64) and `KEY.keys.json` (the n original sample keys). Still valid
  WebDataset (a reader sees pre-batched samples); it exists because Python tar-header parsing
  costs more than decoding a 28x28 image: one member per image caps a reader at a few thousand
  images/s (see BENCHMARKS.md, Loader).
Tar headers carry fixed owner and mtime and the encoders write no metadata, so the same inputs
(and quality) always give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from pipeline import __version__
from pipeline.images import (check_quality, decode_image, decode_npy, encode_jpeg, encode_npy, encode_png,
                             encode_webp, fit_image)
from pipeline.manifest import LAYOUTS, Manifest, ShardInfo, sha256_of, write_manifest
from pipeline.sources import ImageSet, Source, split_indices

DEFAULT_LAYOUT = "auto"
DEFAULT_SAMPLES_PER_BLOCK = 64
# "auto" picks "block" up to this many bytes of pixels per image (64x64 RGB is 12 KiB): there the
# per-member cost dominates reading. Larger images are PNG: decoding dominates, and raw pixels
# would multiply the bytes on disk and on the network.
AUTO_BLOCK_MAX_IMAGE_BYTES = 16 * 1024
# Lossy layouts and their default quality ("auto" never picks one: losing pixels is the user's call).
# On 64x64 patches of scikit-learn's two sample photographs: JPEG 95 (4:4:4) 1.8 and WebP 90 3.1
# grey levels RMS error, at 2.3x and 5.8x fewer bytes than PNG (4.6x and 12x fewer than raw pixels).
LOSSY_ENCODERS = {"jpg": encode_jpeg, "webp": encode_webp}
DEFAULT_QUALITY = {"jpg": 95, "webp": 90}


def check_layout(layout: str, quality: int | None = None) -> None:
    """A layout name (and quality) `write_shards` (and `serve generate --format wds`) accepts, or a ValueError."""
    if layout not in LAYOUTS + ("auto",):
        raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    if quality is not None:
        if layout not in LOSSY_ENCODERS:
            raise ValueError(f"quality applies to the lossy layouts {tuple(LOSSY_ENCODERS)}, "
                             f"not to layout {layout!r}")
        check_quality(quality)


def resolve_layout(layout: str, image_shape: tuple[int, int, int]) -> str:
    """"auto" -> "block" for small images, "png" for large ones; other layouts unchanged."""
    if layout != "auto":
        return layout
    return "block" if int(np.prod(image_shape)) <= AUTO_BLOCK_MAX_IMAGE_BYTES else "png"


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # fixed, so shards are reproducible byte for byte
    info.mode = 0o444
    info.uname = info.gname = "vae"
    tar.addfile(info, io.BytesIO(payload))


def write_tar(fileobj, keys: list[str], images: np.ndarray, labels: np.ndarray | None, *, layout: str,
              samples_per_block: int, block_prefix: str, quality: int | None = None) -> None:
    """(N,H,W,C) uint8 images as one tar shard in `layout`; labels None (unlabelled) writes no label members.

    `quality` is the jpg/webp encoder's (None: DEFAULT_QUALITY); other layouts are lossless.
    """
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        if layout == "block":
            for number, start in enumerate(range(0, len(keys), samples_per_block)):
                stop = start + samples_per_block
                key = f"{block_prefix}-b{number:05d}"
                _add_member(tar, f"{key}.images.npy", encode_npy(images[start:stop]))
                if labels is not None:
                    _add_member(tar, f"{key}.labels.npy", encode_npy(labels[start:stop].astype(np.int64)))
                _add_member(tar, f"{key}.keys.json", json.dumps(keys[start:stop]).encode("ascii"))
            return
        for index, (key, image) in enumerate(zip(keys, images)):
            if layout == "png":
                _add_member(tar, f"{key}.png", encode_png(image))
            elif layout in LOSSY_ENCODERS:
                _add_member(tar, f"{key}.{layout}",
                            LOSSY_ENCODERS[layout](image, quality or DEFAULT_QUALITY[layout]))
            else:
                _add_member(tar, f"{key}.npy", encode_npy(image))
            if labels is not None:
                _add_member(tar, f"{key}.cls", str(int(labels[index])).encode("ascii"))


@dataclass(frozen=True)
class ShardJob:
    """Everything one worker process needs to write one shard."""

    path: Path
    keys: list[str]
    source: Source  # already cut down to this shard's samples
    image_size: int | None
    channels: int | None
    image_shape: tuple[int, int, int]
    layout: str
    samples_per_block: int
    quality: int | None = None


def load_images(source: Source, keys: list[str], image_size: int | None, channels: int | None,
                image_shape: tuple[int, int, int]) -> np.ndarray:
    """A source's images fitted to the shard format, (N,H,W,C) uint8; a misfit names its key."""
    raw = source.read()
    if isinstance(raw, np.ndarray) and raw.shape[1:] == image_shape:
        return raw
    images = [fit_image(image, image_size, channels) for image in raw]
    for key, image in zip(keys, images):
        if image.shape != image_shape:
            raise ValueError(f"sample {key}: image shape {image.shape}, expected {image_shape} "
                             "(pass --image-size to resize and crop every image)")
    return np.stack(images) if images else np.zeros((0, *image_shape), np.uint8)


def write_shard(job: ShardJob) -> tuple[ShardInfo, np.ndarray]:
    """Write one tar shard; return its manifest entry and per-channel [sum, sum of squares, count]."""
    images = load_images(job.source, job.keys, job.image_size, job.channels, job.image_shape)
    temporary = job.path.with_suffix(".tar.tmp")
    with open(temporary, "wb") as handle:
        write_tar(handle, job.keys, images, job.source.labels, layout=job.layout,
                  samples_per_block=job.samples_per_block, block_prefix=job.path.stem, quality=job.quality)
    temporary.replace(job.path)
    flat = images.reshape(-1, images.shape[-1]).astype(np.int64)
    # Integer sums are exact, so the manifest's statistics do not depend on worker scheduling.
    stats = np.stack([flat.sum(0), (flat * flat).sum(0), np.full(flat.shape[1], len(flat))])
    return ShardInfo(job.path.name, len(job.keys), job.path.stat().st_size, sha256_of(job.path)), stats


def _probe_shape(source: Source, index: int, image_size: int | None, channels: int | None
                 ) -> tuple[tuple[int, int, int], int | None, int | None]:
    """The shard image shape, decided from the first sample, and the fitting to apply."""
    first = source.subset(np.asarray([index])).read()[0]
    first = first[:, :, None] if first.ndim == 2 else first
    channels = channels or first.shape[2]
    if image_size is None and not isinstance(source, ImageSet):
        image_size = min(first.shape[:2])  # folders: square crops at the first image's short side
    return fit_image(first, image_size, channels).shape, image_size, channels


def _samples_per_shard_for(source: Source, indices: np.ndarray, shard_size_mb: float, *,
                           image_size, channels, image_shape, layout, samples_per_block, quality) -> int:
    """How many samples fill `shard_size_mb`, measured by writing a few of them (deterministic)."""
    probe = indices[: max(samples_per_block, 64)]
    keys = [f"probe-{i:07d}" for i in range(len(probe))]
    images = load_images(source.subset(probe), keys, image_size, channels, image_shape)
    buffer = io.BytesIO()
    write_tar(buffer, keys, images, source.labels[probe], layout=layout,
              samples_per_block=samples_per_block, block_prefix="probe", quality=quality)
    bytes_per_sample = len(buffer.getvalue()) / len(probe)
    return max(1, int(shard_size_mb * (1 << 20) // bytes_per_sample))


def write_shards(
    image_set: Source,
    out_dir: str | Path,
    *,
    samples_per_shard: int | None = 1000,
    shard_size_mb: float | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    num_workers: int = 1,
    force: bool = False,
    progress: bool = True,
    image_size: int | None = None,
    channels: int | None = None,
    layout: str = DEFAULT_LAYOUT,
    samples_per_block: int = DEFAULT_SAMPLES_PER_BLOCK,
    quality: int | None = None,
) -> Manifest:
    """Split a source into train/val, shuffle, and write shards plus manifest.json.

    `val_fraction` None keeps a source's own split (Fashion-MNIST: test -> val) and holds out 10%
    of every class of the others; a number always holds out that share of every class.
    `quality` (1-100) is for the lossy layouts jpg and webp (None: DEFAULT_QUALITY).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} is not empty; pass --force to overwrite it")
    check_layout(layout, quality)
    if shard_size_mb is not None and shard_size_mb <= 0:
        raise ValueError(f"shard_size_mb must be > 0, got {shard_size_mb}")
    if shard_size_mb is None and (samples_per_shard is None or samples_per_shard < 1):
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if samples_per_block < 1:
        raise ValueError(f"samples_per_block must be >= 1, got {samples_per_block}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if len(image_set.labels) < 2:
        raise ValueError(f"source {image_set.name}: {len(image_set.labels)} samples; need at least 2")

    train_index, val_index, split_rule = split_indices(image_set, val_fraction, seed)
    image_shape, image_size, channels = _probe_shape(image_set, int(train_index[0]), image_size, channels)
    layout = resolve_layout(layout, image_shape)
    if layout in LOSSY_ENCODERS:
        quality = quality or DEFAULT_QUALITY[layout]
    if shard_size_mb is not None:
        samples_per_shard = _samples_per_shard_for(
            image_set, train_index, shard_size_mb, image_size=image_size, channels=channels,
            image_shape=image_shape, layout=layout, samples_per_block=samples_per_block, quality=quality)

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(out_dir.glob("*.tar")) + list(out_dir.glob("*.tar.tmp")):
        stale.unlink()
    jobs = []
    for split, indices in (("train", train_index), ("val", val_index)):
        for shard_number, start in enumerate(range(0, len(indices), samples_per_shard)):
            chunk = indices[start : start + samples_per_shard]
            jobs.append(ShardJob(out_dir / f"{split}-{shard_number:06d}.tar",
                                 [f"{split}-{int(i):07d}" for i in chunk], image_set.subset(chunk),
                                 image_size, channels, image_shape, layout, samples_per_block, quality))

    bar = tqdm(total=len(train_index) + len(val_index), desc="writing shards", unit="img",
               disable=not progress, smoothing=0.1)
    results = []
    pool = ProcessPoolExecutor(num_workers) if num_workers > 1 else None
    try:
        for result in (pool.map(write_shard, jobs) if pool else map(write_shard, jobs)):
            results.append(result)
            bar.update(result[0].num_samples)
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)

    splits: dict[str, list[ShardInfo]] = {"train": [], "val": []}
    for info, _ in results:
        splits[info.name.split("-")[0]].append(info)
    sums = np.sum([stats for _, stats in results], axis=0).astype(np.float64)
    count = sums[2]
    channel_mean = sums[0] / (255.0 * count)
    channel_var = np.maximum(sums[1] / (255.0**2 * count) - channel_mean**2, 0.0)
    pixel_mean = float(channel_mean.mean())
    pixel_var = float((channel_var + channel_mean**2).mean() - pixel_mean**2)
    extra: dict = {"split": split_rule}  # "source": the source's own split kept; "stratified": per class
    if image_set.labels.min() >= 0:
        extra["class_counts"] = {
            split: np.bincount(image_set.labels[index], minlength=int(image_set.labels.max()) + 1).tolist()
            for split, index in (("train", train_index), ("val", val_index))}
    if quality is not None:
        extra["quality"] = quality  # jpg/webp: the encoder quality the images were written at
    manifest = Manifest(
        source=image_set.name,
        seed=seed,
        image_shape=tuple(int(d) for d in image_shape),
        splits=splits,
        pixel_mean=pixel_mean,
        pixel_std=float(np.sqrt(max(pixel_var, 0.0))),
        num_classes=int(len(np.unique(image_set.labels))),
        tool_version=__version__,
        layout=layout,
        samples_per_block=samples_per_block if layout == "block" else 0,
        channel_mean=tuple(float(m) for m in channel_mean),
        channel_std=tuple(float(s) for s in np.sqrt(channel_var)),
        class_names=tuple(image_set.class_names),
        extra=extra,
    )
    write_manifest(out_dir, manifest)
    return manifest


class TarFormatError(tarfile.ReadError):
    """A tar stream that is cut short or has a damaged header; the message names the shard and byte."""


MAX_MEMBER_BYTES = 256 << 20
"""Largest tar member read (a block of 64 images of 1024x1024 RGB is 192 MiB): a header declaring
more makes the shard bad instead of costing that much memory."""
_MAX_META_BYTES = 1 << 20  # GNU long names and pax headers are parsed whole: keep them small
_READ_CHUNK = 1 << 20
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")
_META_TYPES = (b"L", b"x")


def _read_exact(stream, size: int) -> bytes:
    """`size` bytes, or fewer where the stream ends. Past 1 MiB it reads in 1 MiB chunks, so a size
    from a damaged header costs the memory of what the stream really holds, not of what it claims."""
    if size <= _READ_CHUNK:
        data = stream.read(size)
        while 0 < len(data) < size:  # sockets and pipes may return less than asked
            more = stream.read(size - len(data))
            if not more:
                break
            data += more
        return data
    parts, remaining = [], size
    while remaining:
        part = stream.read(min(remaining, _READ_CHUNK))
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def _number(field: bytes) -> int:
    """A tar header number: octal digits (NUL or space padded) or GNU base-256 (0x80 first); a
    negative base-256 number, a sign or any other byte raises ValueError."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    digits = field.strip(b"\0 ")
    if not digits.isdigit():
        if digits:
            raise ValueError(f"bad number {field!r}")
        return 0
    return int(digits, 8)  # 8 and 9 raise ValueError


def _pax_records(payload: bytes) -> dict[str, str]:
    """The `LENGTH KEY=VALUE\\n` records of a pax header; anything else raises ValueError.

    Every record is checked to end inside the payload with a newline after a non-empty key, so each
    one moves the position forward: a length of 0 (or negative, or not a number) cannot loop.
    """
    records, position = {}, 0
    while position < len(payload) and payload[position]:  # NUL padding ends the records (as in tarfile)
        space = payload.find(b" ", position, position + 20)
        digits = payload[position:space]
        if space < 0 or not digits.isdigit():
            raise ValueError(f"record length {payload[position:position + 20]!r} is not a number")
        end = position + int(digits)
        key, equals, value = payload[space + 1 : end - 1].partition(b"=")
        if not space + 4 <= end <= len(payload) or payload[end - 1] != 10 or not key or not equals:  # 10: b"\n"
            raise ValueError(f"record {payload[position:min(end, position + 40)]!r} is not 'LENGTH KEY=VALUE\\n' "
                             f"within the header's {len(payload)} bytes")
        try:
            records[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"record {key[:40]!r} is not UTF-8") from None
        position = end
    return records


def iter_tar_members(stream, source: str = "tar stream", max_member_bytes: int = MAX_MEMBER_BYTES
                     ) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of every regular file in a tar stream (ustar, GNU long names, pax).

    A small reader of our own instead of `tarfile`: parsing a header here costs a fraction of
    what `tarfile` spends, which is most of the time for one-image-per-member shards. Shards are
    untrusted, so it is strict: anything malformed (checksum, numbers, sizes over
    `max_member_bytes`, pax records, names that are not UTF-8, a stream that ends before the
    end-of-archive blocks) raises TarFormatError naming `source` and the byte offset, and no size
    read from a header allocates more than the stream holds (`tarfile`'s stream mode stops quietly
    at a cut between members).
    """
    offset = 0
    long_name: str | None = None
    pax_path: str | None = None
    pax_size: int | None = None
    while True:
        header = _read_exact(stream, _BLOCK)
        if len(header) < _BLOCK:
            raise TarFormatError(f"{source}: stream ends at byte {offset + len(header)} without the "
                                 "end-of-archive blocks")
        if header == _ZERO_BLOCK:
            return
        at = offset
        try:
            if _number(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
                raise ValueError
        except ValueError:
            raise TarFormatError(f"{source}: bad header checksum at byte {at}") from None
        kind = header[156:157]
        if pax_size is not None:
            size = pax_size
        else:
            try:
                size = _number(header[124:136])
            except ValueError:
                raise TarFormatError(f"{source}: bad size field {header[124:136]!r} in the header "
                                     f"at byte {at}") from None
        if size > max_member_bytes or (size > _MAX_META_BYTES and kind in _META_TYPES):
            raise TarFormatError(f"{source}: member at byte {at} declares size {size:,}, over the "
                                 f"{max_member_bytes if kind not in _META_TYPES else _MAX_META_BYTES:,}-byte limit")
        payload = _read_exact(stream, size)
        if len(payload) < size:
            raise TarFormatError(f"{source}: member at byte {at} cut short: {len(payload)} of {size} bytes")
        padding = -size % _BLOCK
        if padding and len(_read_exact(stream, padding)) < padding:
            raise TarFormatError(f"{source}: stream ends inside the padding after byte {at + _BLOCK + size}")
        offset += _BLOCK + size + padding
        if kind == b"L":  # GNU long name for the next member
            try:
                long_name = payload.rstrip(b"\0").decode("utf-8")
            except UnicodeDecodeError:
                raise TarFormatError(f"{source}: GNU long name at byte {at} is not UTF-8") from None
            continue
        if kind == b"x":  # pax extended header for the next member
            try:
                records = _pax_records(payload)
                pax_path = records.get("path")
                if "size" in records:
                    if not (records["size"].isascii() and records["size"].isdigit()):
                        raise ValueError(f"size {records['size'][:40]!r} is not a number")
                    pax_size = int(records["size"])
                    if pax_size > max_member_bytes:
                        raise ValueError(f"size {pax_size:,} is over the {max_member_bytes:,}-byte limit")
            except ValueError as error:  # also int()'s limit on digits
                raise TarFormatError(f"{source}: bad pax header at byte {at}: {error}") from None
            continue
        if kind in _FILE_TYPES:
            try:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8")
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8") if header[257:262] == b"ustar" else ""
            except UnicodeDecodeError:
                raise TarFormatError(f"{source}: member name at byte {at} is not UTF-8") from None
            yield pax_path or long_name or (f"{prefix}/{name}" if prefix else name), payload
        long_name = pax_path = pax_size = None


def iter_tar_samples(fileobj, source_name: str) -> Iterator[dict]:
    """Group a tar stream's members by key into `{__key__, __url__, ext: bytes}` samples.

    The key is the member path up to the first dot of its base name (WebDataset's rule), so
    `blk.images.npy` has key `blk` and extension `images.npy`.
    """
    current: dict | None = None
    for name, payload in iter_tar_members(fileobj, source_name):
        folder, slash, base = name.rpartition("/")
        stem, _, extension = base.partition(".")
        key = folder + slash + stem
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        if current is None:
            current = {"__key__": key, "__url__": source_name}
        current[extension] = payload
    if current is not None:
        yield current


def _fields(sample: dict) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


def decode_sample(sample: dict, expected_shape: tuple[int, int, int]) -> tuple[np.ndarray, int]:
    """A one-image `{png|jpg|webp|npy, cls}` sample to (HxWxC uint8 image, label); problems raise ValueError."""
    key = sample.get("__key__", "?")
    encoded = next((ext for ext in ("png", "jpg", "webp") if ext in sample), None)
    if encoded is None and "npy" not in sample:
        raise ValueError(f"sample {key}: no png, jpg, webp or npy member (has {_fields(sample)})")
    try:
        if encoded is not None:  # anything over the manifest's size is refused at the header, before decoding
            image = decode_image(sample[encoded], channels=expected_shape[2],
                                 max_pixels=expected_shape[0] * expected_shape[1])
        else:
            image = decode_npy(sample["npy"])
    except ValueError as error:
        raise ValueError(f"sample {key}: {error}") from None
    if image.dtype != np.uint8:
        raise ValueError(f"sample {key}: expected uint8 pixels, got {image.dtype}")
    if image.shape != tuple(expected_shape):
        raise ValueError(f"sample {key}: expected image shape {tuple(expected_shape)}, got {image.shape}")
    try:
        label = int(sample["cls"]) if "cls" in sample else -1
    except ValueError:
        raise ValueError(f"sample {key}: label {sample['cls'][:20]!r} is not an integer") from None
    return image, label


def decode_samples(sample: dict, expected_shape: tuple[int, int, int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Any layout's tar sample to ((n,H,W,C) uint8 images, (n,) int64 labels); n is 1 unless a block."""
    if "images.npy" not in sample:
        image, label = decode_sample(sample, expected_shape)
        return image[None], np.asarray([label], dtype=np.int64)
    key = sample.get("__key__", "?")
    try:
        images = decode_npy(sample["images.npy"])
    except ValueError as error:
        raise ValueError(f"block {key}: {error}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != tuple(expected_shape):
        raise ValueError(f"block {key}: expected uint8 (n, {', '.join(map(str, expected_shape))}) "
                         f"images, got {images.dtype} {images.shape}")
    if "labels.npy" in sample:
        try:
            labels = decode_npy(sample["labels.npy"])
        except ValueError as error:
            raise ValueError(f"block {key} labels: {error}") from None
        if labels.dtype.kind not in "iu":
            raise ValueError(f"block {key}: expected integer labels, got {labels.dtype}")
        labels = labels.astype(np.int64, copy=False).reshape(-1)
    else:
        labels = np.full(len(images), -1, dtype=np.int64)
    if len(labels) != len(images):
        raise ValueError(f"block {key}: {len(images)} images but {len(labels)} labels")
    return images, labels


def read_shard_images(path: str | Path, expected_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """All images and labels of one shard (a path or URL), as (N,H,W,C) uint8 and (N,) int64."""
    from pipeline.urls import open_url

    images, labels = [], []
    with open_url(str(path)) as handle:
        for sample in iter_tar_samples(handle, str(path)):
            block, block_labels = decode_samples(sample, expected_shape)
            images.append(block)
            labels.append(block_labels)
    if not images:
        return np.zeros((0, *expected_shape), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(images), np.concatenate(labels)
