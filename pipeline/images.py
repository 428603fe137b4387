"""Image helpers shared by training and serving: numpy and Pillow only, no torch."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image


def _pil_image(image: np.ndarray) -> Image.Image:
    """An HxWxC uint8 array (C is 1 or 3) as a Pillow image; anything else is refused by name."""
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected an HxWxC image with C in (1, 3), got shape {image.shape}")
    return Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)


def encode_png(image: np.ndarray, compress_level: int = 6) -> bytes:
    """Encode an HxWxC uint8 image (C is 1 or 3) as PNG bytes, losslessly (any compress_level 0-9)."""
    buffer = io.BytesIO()
    # Any fixed level is deterministic across runs, which keeps shards byte-identical.
    _pil_image(image).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def check_quality(quality: int) -> None:
    """A lossy encoder's quality: a whole number from 1 to 100, or a ValueError naming the value."""
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be a whole number from 1 to 100, got {quality!r}")


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """HxWxC uint8 (C is 1 or 3) as baseline JPEG; the same pixels and quality give the same bytes."""
    check_quality(quality)
    buffer = io.BytesIO()
    # 4:4:4: colour kept at full resolution (Pillow's default 4:2:0 halves it, and a VAE learns
    # whatever the codec smears). No EXIF, ICC or timestamps: bytes depend on pixels and quality only.
    _pil_image(image).save(buffer, format="JPEG", quality=int(quality), subsampling=0)
    return buffer.getvalue()


def encode_webp(image: np.ndarray, quality: int = 90) -> bytes:
    """HxWxC uint8 (C is 1 or 3) as lossy WebP (grey is stored as RGB); deterministic for fixed quality."""
    check_quality(quality)
    buffer = io.BytesIO()
    _pil_image(image).save(buffer, format="WEBP", quality=int(quality), method=4)
    return buffer.getvalue()


DEFAULT_MAX_PIXELS = 4096 * 4096
"""Largest image (width x height) decoded when the caller gives no tighter bound: 16.8 MP, 50 MB as RGB."""


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than allowed; refused before any pixel is decoded."""


def decode_image(data: bytes, channels: int | None = None, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
                 ) -> np.ndarray:
    """Decode PNG/JPEG/... bytes to an HxWxC uint8 array; convert to `channels` if given.

    The declared size is read from the header first: an image of more than `max_pixels` pixels is
    refused before decoding (a 1 MB PNG can declare 13,000 x 13,000 and take 850 MB to decode).
    `max_pixels=None` lifts the bound (only for data the operator trusts).
    """
    try:
        pil = Image.open(io.BytesIO(data))
    except Exception as error:  # Pillow raises many types for bad bytes; name it once
        raise ValueError(f"undecodable image ({len(data)} bytes): {error}") from error
    width, height = pil.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"image declares {width}x{height} pixels, more than the {max_pixels:,} "
                                 f"allowed; refused before decoding")
    try:
        pil.load()
    except Exception as error:  # truncated or corrupt pixel data
        raise ValueError(f"undecodable image ({len(data)} bytes): {error}") from error
    if channels is None:
        channels = 1 if pil.mode in ("1", "L", "I", "I;16", "F") else 3
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if channels == 1:
        array = np.asarray(pil.convert("L"), dtype=np.uint8)[:, :, None]
    else:
        array = np.asarray(pil.convert("RGB"), dtype=np.uint8)
    return array


def to_unit_float(images: np.ndarray) -> np.ndarray:
    """uint8 pixels in [0, 255] to float32 in [0, 1], the scaling every model here is trained on."""
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {images.dtype}")
    return images.astype(np.float32) / 255.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] to uint8, rounding and clipping."""
    return np.clip(np.rint(np.asarray(images, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def nhwc_to_nchw(images: np.ndarray) -> np.ndarray:
    """NxHxWxC to NxCxHxW (the layout the networks take)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def nchw_to_nhwc(images: np.ndarray) -> np.ndarray:
    """NxCxHxW to NxHxWxC (the layout images are stored in)."""
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def png_code_nats(images: np.ndarray) -> np.ndarray:
    """Each image's lossless PNG code length (level 9) in nats, (B,) from (B, C, H, W) floats in [0, 1].

    A generic compressor's idea of how complex an image is. Likelihood models give simple inputs (little
    ink, flat regions) high likelihood whatever their class; subtracting this length from a negative ELBO
    leaves what the model finds unusual beyond that (Serra et al., "Input complexity and out-of-distribution
    detection with likelihood-based generative models", ICLR 2020). Export fits the default anomaly score
    with it and serve computes it, so both live here."""
    pixels = to_uint8(nchw_to_nhwc(np.asarray(images)))
    return np.array([len(encode_png(image, compress_level=9)) * 8 * math.log(2) for image in pixels])


def make_grid(images: np.ndarray, num_cols: int = 8, pad: int = 2) -> np.ndarray:
    """Tile N images (NxHxWxC uint8) into one image with `num_cols` columns and a dark border."""
    if images.ndim != 4:
        raise ValueError(f"expected NxHxWxC images, got shape {images.shape}")
    num, height, width, channels = images.shape
    num_cols = max(1, min(num_cols, num))
    num_rows = -(-num // num_cols)
    grid = np.zeros(
        (num_rows * (height + pad) + pad, num_cols * (width + pad) + pad, channels), dtype=np.uint8
    )
    for index in range(num):
        row, col = divmod(index, num_cols)
        top, left = pad + row * (height + pad), pad + col * (width + pad)
        grid[top : top + height, left : left + width] = images[index]
    return grid


def save_grid(images: np.ndarray, path: str | Path, num_cols: int = 8, scale: int = 2) -> Path:
    """Write a PNG contact sheet of NxHxWxC uint8 images, enlarged `scale` times for viewing."""
    grid = make_grid(images, num_cols)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid).save(path)
    return path


def convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """HxWxC uint8 to `channels` (1: ITU-R 601 luma, as Pillow's "L"; 3: grey repeated)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    have = image.shape[2]
    if have == channels:
        return image
    if have == 3 and channels == 1:
        return np.asarray(Image.fromarray(image).convert("L"), dtype=np.uint8)[:, :, None]
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=2)
    raise ValueError(f"cannot convert a {have}-channel image to {channels} channels")


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Scale an HxWxC uint8 image so its shorter side is `size`, then crop the centre square."""
    if size < 1:
        raise ValueError(f"image size must be >= 1, got {size}")
    height, width, channels = image.shape
    if (height, width) == (size, size):
        return image
    pil = Image.fromarray(image[:, :, 0] if channels == 1 else image)
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    pil = pil.crop((left, top, left + size, top + size))
    array = np.asarray(pil, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def fit_image(image: np.ndarray, size: int | None, channels: int | None) -> np.ndarray:
    """One image to the shard format: `channels` channels, `size` x `size` (None keeps either)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if channels is not None:
        image = convert_channels(image, channels)
    if size is not None:
        image = resize_center_crop(image, size)
    return np.ascontiguousarray(image)


def encode_npy(array: np.ndarray) -> bytes:
    """A numpy array as .npy bytes (no pickle); deterministic for the same array."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


_NPY_HEADER = re.compile(rb"\{'descr': '([<>|=]?[a-z]\d+)', 'fortran_order': False, 'shape': \(([\d, ]*)\), \}")
_NPY_MAX_HEADER_BYTES = 10_000  # numpy's own default limit on header size


def _npy_header(data: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, offset of the data) from .npy bytes; bad headers raise.

    The header numpy writes for a C-ordered array is parsed here directly: `np.load` parses it
    with `ast.literal_eval`, which cost more than the rest of reading a 64-image block. Others go
    through numpy's own (size-limited, literal-only) header parser.
    """
    if data[:6] == b"\x93NUMPY" and len(data) > 12:
        start = 8 + (2 if data[6] == 1 else 4)
        header_length = int.from_bytes(data[8:start], "little")
        match = _NPY_HEADER.match(data, start, start + header_length)
        if match:
            shape = tuple(int(n) for n in match[2].split(b",") if n.strip())
            return np.dtype(match[1].decode("ascii")), shape, False, start + header_length
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f".npy version {version} is not read here (1.0 and 2.0 are)")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream, max_header_size=_NPY_MAX_HEADER_BYTES)
    return dtype, shape, fortran_order, stream.tell()


def decode_npy(data: bytes) -> np.ndarray:
    """.npy bytes to a read-only array that views them; never unpickles; bad bytes raise ValueError.

    The declared dtype and shape must account for exactly the bytes after the header, checked
    before anything is made: the array is a view of `data`, so a header cannot make this allocate
    (np.load allocates the declared size before it reads), and `data` itself is bounded by the
    tar reader's member limit.
    """
    try:
        dtype, shape, fortran_order, offset = _npy_header(data)
    except Exception as error:  # numpy raises ValueError, TypeError, SyntaxError... for bad headers
        raise ValueError(f"undecodable .npy ({len(data)} bytes): {error}") from None
    if dtype.hasobject:
        raise ValueError(f"undecodable .npy ({len(data)} bytes): holds Python objects, which are never unpickled")
    count = math.prod(shape)
    if dtype.itemsize == 0 or min(shape, default=0) < 0 or count * dtype.itemsize != len(data) - offset:
        raise ValueError(f"undecodable .npy ({len(data)} bytes): header declares {shape} {dtype} but holds "
                         f"{len(data) - offset} bytes of data")
    try:
        return np.frombuffer(data, dtype, count, offset).reshape(shape, order="F" if fortran_order else "C")
    except ValueError as error:  # e.g. a zero-size array with dimensions past numpy's limits
        raise ValueError(f"undecodable .npy ({len(data)} bytes): {error}") from None
