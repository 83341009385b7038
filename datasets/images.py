"""Opening untrusted image bytes: only the formats the project uses, and only up to a pixel limit.

PIL opens 43 formats by default, EPS among them (it runs Ghostscript), and decodes whatever size a
header claims: a 13,000 x 13,000 PNG of 0.5 MB costs 1.5 GB to decode. Shards hold the JPEGs the
converters write (PNG and WebP from other writers), so decoding is limited to IMAGE_FORMATS, and an
image whose header says more than MAX_PIXELS is refused before a pixel is decoded. Both are bad
samples with their own kind (docs/reliability.md, Data path). Pictures given to `lesa predict` may
also be TIFF, as a conversion's sources may.

`decode_rgb` is the one decoder of every path (the training stream, the converters, `lesa
predict`, and so the attention overlays of what the model saw): the EXIF orientation applied,
16-bit and float pixels scaled to 8 bits by the range they hold instead of clipped (a 16-bit PNG
would turn white). No torch here: converters use it in Ray tasks.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # shard images
CONVERT_FORMATS = (*IMAGE_FORMATS, "TIFF")  # a conversion's source images, and pictures given to `lesa predict`
MAX_PIXELS = 8192 * 8192  # 64 megapixels: 256 MB as RGB; a DSLR photo is under 50
ORIENTATION = 0x0112  # the EXIF tag: 1 upright, 2-8 flipped and/or rotated
# What makes each stored orientation upright (as ImageOps.exif_transpose, which reads the tag from
# the image it transposes: a converted copy has none, and a TIFF keeps it outside the EXIF block).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Grey levels of more than 8 bits map to 0-255 by the range they hold, not clipped at 255.
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I" holds 32-bit ints; 16-bit values are read
FLOAT_RANGES = (1.0, 255.0, 65535.0)  # a float image is read on the first of these that holds its values


class BadSample(ValueError):
    """A sample that cannot be used: `kind` is the category counted, `detail` the specifics."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


def _looks_like(prefix: bytes, accepted: tuple[str, ...]) -> str | None:
    """The other format whose signature `prefix` has (PIL's own prefix checks; nothing is parsed)."""
    Image.init()
    others = (fmt for fmt, (_, accept) in Image.OPEN.items() if fmt not in accepted and accept and accept(prefix))
    return next(others, None)


def open_image(data: bytes, formats: tuple[str, ...] = IMAGE_FORMATS) -> Image.Image:
    """The image, opened (header read, nothing decoded) by the decoders of `formats` only."""
    try:
        return Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as exc:  # PIL's own limit, past 2 x its MAX_IMAGE_PIXELS
        raise BadSample("image too large", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        other = _looks_like(data[:16], formats)
        if other is not None:
            raise BadSample("unsupported image format", f"{other}; decoded are {', '.join(formats)}") from None
        # PIL's own message names the in-memory buffer (`<_io.BytesIO object at 0x...>`); the
        # caller names the file or sample.
        why = "not an image of any format decoded" if isinstance(exc, UnidentifiedImageError) else f"{exc}"
        raise BadSample("corrupt image", f"{type(exc).__name__}: {why} ({', '.join(formats)})") from None


def check_pixels(image: Image.Image, limit: int = MAX_PIXELS) -> None:
    w, h = image.size
    if w * h > limit:
        raise BadSample("image too large", f"{w} x {h} pixels, over the limit of {limit:,} (64 megapixels)")


def decode_rgb(data: bytes, formats: tuple[str, ...] = IMAGE_FORMATS, short_side: int | None = None) -> Image.Image:
    """The picture in `data` as 8-bit RGB, upright, decoded by the decoders of `formats` only and
    within the pixel limit. `short_side`: a JPEG may skip resolution beyond it (DCT scaling, `draft`:
    the short side stays at least this), which the converters use; the stream decodes at full size."""
    with open_image(data, formats) as image:
        w, h = image.size
        if short_side is not None and short_side < min(w, h):
            image.draft("RGB", (int(w * short_side / min(w, h)) + 1, int(h * short_side / min(w, h)) + 1))
        check_pixels(image)
        try:
            orientation = image.getexif().get(ORIENTATION, 1)
            rgb = eight_bit_rgb(image)
        except BadSample:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
            raise BadSample("corrupt image", f"{image.format}: {type(exc).__name__}: {exc}") from None
    method = UPRIGHT.get(orientation)
    return rgb if method is None else rgb.transpose(method)


def eight_bit_rgb(image: Image.Image) -> Image.Image:
    """RGB of any mode; 16-bit and float grey levels scaled from their range, not clipped at 255."""
    if image.mode not in SIXTEEN_BIT and image.mode != "F":
        try:
            return image.convert("RGB")
        except ValueError as exc:  # "conversion from La to RGB not supported"
            raise BadSample("unsupported image mode", f"{image.mode}: {exc}") from None
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        finite = np.isfinite(values).all()
        top = next((r for r in FLOAT_RANGES if finite and values.min() >= 0 and values.max() <= r), None)
    else:
        top = 65535.0 if values.min() >= 0 and values.max() <= 65535 else None
    if top is None:
        raise BadSample(
            "unsupported image mode",
            f"{image.mode} pixels from {values.min():g} to {values.max():g}; read are 0-65535 (16-bit) "
            f"and floats in 0-1, 0-255 or 0-65535",
        )
    return Image.fromarray(np.rint(values * (255.0 / top)).astype(np.uint8), "L").convert("RGB")
