"""datasets/images.py `decode_rgb`, the one decoder of the reader, the converters and `lesa predict`:
EXIF orientation, 16-bit and float pixels, and errors that the caller can put a file name to.

Real image files written by PIL; PIL's own `ImageOps.exif_transpose` is the reference for what
upright means.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from datasets.images import CONVERT_FORMATS, BadSample, decode_rgb
from datasets.makers.convert import ImageOptions, reencode_image
from datasets.stream import decode_image

SIZE = 24


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def grey_levels(seed: int = 0, shape=(30, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize(
    "fmt, mode, scale",
    [
        ("PNG", "I;16", 257),  # 65535 / 255: a 16-bit PNG
        ("TIFF", "I;16B", 257),  # big-endian 16-bit TIFF
        ("TIFF", "I", 257),  # 32-bit ints holding 16-bit values
        ("TIFF", "F", 1 / 255),  # floats in 0-1
        ("TIFF", "F", 1),  # floats in 0-255
    ],
)
def test_high_bit_depth_decodes_to_the_pixels_of_its_8_bit_equivalent(fmt, mode, scale):
    levels = grey_levels()
    dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4", "F": "<f4"}[mode]
    deep = Image.frombytes(mode, (40, 30), (levels.astype(np.float64) * scale).astype(dtype).tobytes())
    data = encoded(deep, fmt)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == mode
    eight_bit = encoded(Image.fromarray(levels, "L"), "PNG")
    np.testing.assert_array_equal(decode_image(data, SIZE, CONVERT_FORMATS), decode_image(eight_bit, SIZE))
    np.testing.assert_array_equal(np.asarray(decode_rgb(data, CONVERT_FORMATS))[..., 0], levels)  # not clipped


def test_a_16_bit_source_converts_to_its_grey_levels_not_white():
    levels = np.full((40, 40), 100, np.uint8)
    data = encoded(Image.frombytes("I;16", (40, 40), (levels.astype("<u2") * 257).tobytes()), "PNG")
    jpeg = reencode_image(data, ImageOptions(short_side=32))
    assert abs(np.asarray(Image.open(io.BytesIO(jpeg))).astype(float).mean() - 100) < 2


def test_values_outside_every_range_are_refused_not_clipped():
    floats = Image.frombytes("F", (4, 4), np.full(16, -3.0, "<f4").tobytes())
    with pytest.raises(BadSample) as caught:
        decode_rgb(encoded(floats, "TIFF"), CONVERT_FORMATS)
    assert caught.value.kind == "unsupported image mode" and "from -3 to -3" in caught.value.detail


def rotated_jpeg(orientation: int) -> bytes:
    """A photo as a phone stores it: pixels as the sensor read them, the turn in the EXIF tag."""
    rng = np.random.default_rng(orientation)
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[:16] = (250, 10, 10)  # a red band on the stored picture's top, so every turn shows
    pixels[16:] = rng.integers(0, 256, (32, 64, 3))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(Image.fromarray(pixels), "JPEG", quality=90, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pil_reads_it(orientation):
    data = rotated_jpeg(orientation)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))  # PIL's reference
    decoded = decode_rgb(data)
    assert decoded.size == upright.size
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(upright.convert("RGB")))
    # ... and so does the reader's crop: the same as the upright picture saved without a tag
    np.testing.assert_array_equal(decode_image(data, SIZE), decode_image(encoded(upright, "PNG"), SIZE))


def test_orientation_6_turns_the_top_band_to_the_right():
    """Orientation 6: the camera was turned a quarter clockwise; the stored top is the right side."""
    right_column = np.asarray(decode_rgb(rotated_jpeg(6)))[:, -1]
    assert right_column.shape == (64, 3) and (right_column[:, 0] > 200).all() and (right_column[:, 1] < 60).all()


def test_an_undecodable_file_is_described_without_pil_buffer_reprs():
    with pytest.raises(BadSample) as caught:
        decode_rgb(b"this is not an image at all", CONVERT_FORMATS)
    assert caught.value.kind == "corrupt image"
    assert "BytesIO" not in str(caught.value) and "0x" not in str(caught.value)
