import numpy as np
import pytest

from pipeline.images import decode_image, encode_png, make_grid, nchw_to_nhwc, nhwc_to_nchw, to_uint8, to_unit_float


def test_png_round_trip_is_lossless_on_real_digits(mnist5k):
    for image in mnist5k.images[::500]:
        assert np.array_equal(decode_image(encode_png(image), channels=1), image)


def test_rgb_round_trip_and_channel_conversion():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(encode_png(rgb)), rgb)
    assert decode_image(encode_png(rgb), channels=1).shape == (8, 8, 1)


def test_undecodable_bytes_name_the_problem():
    with pytest.raises(ValueError, match="undecodable image"):
        decode_image(b"definitely not a png")


def test_encode_rejects_wrong_dtype_and_shape():
    with pytest.raises(TypeError, match="uint8"):
        encode_png(np.zeros((4, 4, 1), np.float32))
    with pytest.raises(ValueError, match="HxWxC"):
        encode_png(np.zeros((4, 4), np.uint8))


def test_float_conversions_invert():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    assert np.array_equal(to_uint8(to_unit_float(pixels)), pixels)
    assert np.array_equal(nchw_to_nhwc(nhwc_to_nchw(pixels)), pixels)


def test_grid_places_every_image():
    images = np.stack([np.full((4, 4, 1), i * 20, np.uint8) for i in range(10)])
    grid = make_grid(images, num_cols=4, pad=1)
    assert grid.shape == (3 * 5 + 1, 4 * 5 + 1, 1)
    assert grid[0, 0, 0] == 0 and grid[6, 6, 0] == 5 * 20  # row 1, col 1 -> image 5
    assert grid[11, 16, 0] == 0 and grid[11, 6, 0] == 9 * 20  # image 9 at row 2, col 1; col 2 empty



def _png_declaring(width: int, height: int) -> bytes:
    """A small real PNG whose IHDR claims width x height (CRC fixed): what a decompression bomb shows a header reader."""
    import struct
    import zlib

    png = bytearray(encode_png(np.zeros((8, 8, 1), np.uint8)))
    ihdr = 8  # signature, then the IHDR chunk: length(4) type(4) data(13) crc(4)
    png[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    png[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(png[ihdr + 4 : ihdr + 21])))
    return bytes(png)


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding():
    from pipeline.images import ImageTooLargeError

    bomb = _png_declaring(13_000, 13_000)
    with pytest.raises(ImageTooLargeError, match="13000x13000"):
        decode_image(bomb)
    with pytest.raises(ImageTooLargeError, match="more than the 64 allowed"):
        decode_image(encode_png(np.zeros((9, 8, 1), np.uint8)), max_pixels=64)
    assert decode_image(encode_png(np.zeros((8, 8, 1), np.uint8)), max_pixels=64).shape == (8, 8, 1)
