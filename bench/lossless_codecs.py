"""Lossless codecs as bits per dimension on 8-bit images: the floor a likelihood model must beat.

Each is measured on exactly the images the models are scored on. PNG and WebP are per image files
(headers included, as a user would store them); xz compresses the whole set as one raw byte stream.
"""

from __future__ import annotations

import io
import lzma

import numpy as np
from PIL import Image


def _image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def _encoded_bytes(image: np.ndarray, **save_args) -> int:
    buffer = io.BytesIO()
    _image(image).save(buffer, **save_args)
    return buffer.tell()


def codec_bits_per_dim(images: np.ndarray) -> dict[str, float]:
    """{codec: bits/dim} for NxHxWxC uint8 images: PNG (level 9, optimised), WebP lossless (method 6), xz -9e."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected NxHxWxC uint8 images, got {images.dtype} of shape {images.shape}")
    dims = images.size
    png = sum(_encoded_bytes(image, format="PNG", optimize=True, compress_level=9) for image in images)
    webp = sum(_encoded_bytes(image, format="WEBP", lossless=True, quality=100, method=6) for image in images)
    xz = len(lzma.compress(np.ascontiguousarray(images).tobytes(), preset=9 | lzma.PRESET_EXTREME))
    return {"png": 8 * png / dims, "webp_lossless": 8 * webp / dims, "xz_whole_set": 8 * xz / dims}
