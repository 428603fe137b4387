"""WebDataset samples written by any tool (webdataset.TarWriter, img2dataset, ...) as our (image, label).

A foreign sample is `{__key__, jpg|jpeg|png|webp|ppm|npy, [cls|txt|json|...]}`. Its image is decoded
with `pipeline.images.decode_image` (bounded by max_pixels) and fitted to the model's channels and
size with `fit_image` (resize the short side, centre-crop): exactly what `pipeline shards` does,
so training, export and serving preprocess alike. Labels are optional.

Shards, plain `.tar` or gzipped (`.tar.gz`, `.tgz`), go through our strict, bounded tar reader
(`pipeline.shards.iter_tar_samples`); labels are parsed with webdataset's decoders for them.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from pipeline.images import DEFAULT_MAX_PIXELS, decode_image, decode_npy, fit_image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "npy")
"""Image members looked for, in this order, when the image key is "auto" (WebDataset's conventions)."""
LABEL_KEYS = ("cls", "txt", "json")
"""Label members: `cls` (an integer), `txt` (an integer or a class name), `json:FIELD` (a field of a
JSON object, integer or class name); "auto" takes `cls` if the sample has one; "none" reads none."""
GZIP_SUFFIXES = (".tar.gz", ".tgz")


def check_image_key(spec: str) -> str:
    """An image key ("auto" or a member extension), or a ValueError naming what is accepted."""
    if spec != "auto" and (not spec or "/" in spec or spec.startswith(".")):
        raise ValueError(f"image key {spec!r}: expected 'auto' or a member extension such as "
                         f"{', '.join(IMAGE_KEYS)}")
    return spec.lower()


def check_label_key(spec: str) -> str:
    """A label key: auto, none, cls, txt, json:FIELD; anything else is a ValueError."""
    name, _, field = spec.partition(":")
    if spec in ("auto", "none", "cls", "txt") or (name == "json" and field):
        return spec
    raise ValueError(f"label key {spec!r}: expected auto, none, cls, txt or json:FIELD "
                     "(e.g. json:label)")


def find_image_key(sample: dict, image_key: str = "auto") -> str:
    """The member holding the sample's image; a ValueError names the members it has."""
    if image_key != "auto":
        if image_key in sample:
            return image_key
        missing = f"no {image_key} member"
    else:
        for key in IMAGE_KEYS:
            if key in sample:
                return key
        missing = f"no image member ({'/'.join(IMAGE_KEYS)})"
    members = sorted(k for k in sample if not k.startswith("__"))
    raise ValueError(f"sample {sample.get('__key__', '?')}: {missing}; it has {members}")


def label_value(sample: dict, label_key: str) -> int | str | None:
    """The raw label (an int or a string) under `label_key`, None when there is none to read.

    cls, txt and json members are parsed with webdataset's decoders for them (only those three:
    its other decoders unpickle, which untrusted shards must never reach).
    """
    from webdataset.autodecode import decoders

    key = sample.get("__key__", "?")
    if label_key == "none" or (label_key == "auto" and "cls" not in sample):
        return None
    name, _, field = ("cls" if label_key == "auto" else label_key).partition(":")
    if name not in sample:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"sample {key}: no {name} member for the label; it has {members}")
    data = sample[name]
    try:
        if name == "cls":
            return decoders["cls"](data)
        if name == "txt":
            text = decoders["txt"](data).strip()
            return int(text) if text.lstrip("-").isdigit() else text
        value = decoders["json"](data)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"sample {key}: {name} label {bytes(data[:20])!r} does not parse: {error}") from None
    if not isinstance(value, dict) or field not in value:
        raise ValueError(f"sample {key}: json member has no field {field!r} "
                         f"(has {sorted(value) if isinstance(value, dict) else type(value).__name__})")
    value = value[field]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"sample {key}: json label {field}={value!r} is neither an integer nor a name")
    return value


@dataclass(frozen=True)
class SampleDecoder:
    """One foreign sample to ((1,H,W,C) uint8 image, (1,) int64 label); bad samples raise ValueError.

    Picklable (plain fields), so DataLoader worker processes get their own copy.
    """

    image_shape: tuple[int, int, int]
    """(height, width, channels) every image is fitted to: the model's."""
    image_key: str = "auto"
    label_key: str = "auto"
    class_names: tuple[str, ...] = ()
    """Text labels are looked up here (label i is class_names[i]); integer labels are used as they are."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images declaring more pixels are refused before decoding."""

    def __call__(self, sample: dict) -> tuple[np.ndarray, np.ndarray]:
        image = self.image(sample)
        return image[None], np.asarray([self.label(sample)], dtype=np.int64)

    def image(self, sample: dict) -> np.ndarray:
        key = sample.get("__key__", "?")
        member = find_image_key(sample, self.image_key)
        height, width, channels = self.image_shape
        if height != width:
            raise ValueError(f"model images must be square, got {height}x{width}")
        try:
            if member == "npy":
                image = decode_npy(sample[member])
                if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
                        image.ndim == 3 and image.shape[2] not in (1, 3)):
                    raise ValueError(f"expected an HxW or HxWx(1|3) uint8 array, got {image.dtype} {image.shape}")
                if image.shape[0] * image.shape[1] > self.max_pixels:
                    raise ValueError(f"array of {image.shape[1]}x{image.shape[0]} pixels, more than the "
                                     f"{self.max_pixels:,} allowed")
            else:
                image = decode_image(sample[member], channels=channels, max_pixels=self.max_pixels)
            return fit_image(image, height, channels)
        except ValueError as error:
            raise ValueError(f"sample {key}: {member}: {error}") from None

    def label(self, sample: dict) -> int:
        value = label_value(sample, self.label_key)
        if value is None:
            return -1
        if isinstance(value, int):
            return value
        if value in self.class_names:
            return self.class_names.index(value)
        raise ValueError(f"sample {sample.get('__key__', '?')}: label {value[:40]!r} is not an integer"
                         + (" nor one of the indexed class names" if self.class_names else
                            " (index the set with `python -m pipeline index` to map class names)"))


def iter_shard_samples(stream, url: str) -> Iterator[dict]:
    """`{__key__, __url__, ext: bytes}` samples of one shard stream, plain or gzipped tar.

    Both go through our strict tar reader (pipeline.shards): a gzipped shard is only decompressed
    on the way in. Not webdataset's tar stage: it reads each member whole whatever size its header
    declares, so a small gzip bomb (GBs of zeros) would take that much memory; ours refuses a
    member over its limit before reading it. Extensions are lower-cased (webdataset's rule), so
    `KEY.JPG` is a `jpg` member.
    """
    from pipeline.shards import iter_tar_samples
    from pipeline.urls import shard_name

    if shard_name(url).lower().endswith(GZIP_SUFFIXES):
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    for sample in iter_tar_samples(stream, url):
        if any(name != name.lower() for name in sample):
            sample = {name if name.startswith("__") else name.lower(): value for name, value in sample.items()}
        yield sample
