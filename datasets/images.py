"""Opening untrusted image bytes: only the formats the project uses, and only up to a pixel limit.

PIL opens 43 formats by default, EPS among them (it runs Ghostscript), and decodes whatever size a
header claims: a 13,000 x 13,000 PNG of 0.5 MB costs 1.5 GB to decode. Shards hold the JPEGs the
converters write (PNG and WebP from other writers), so decoding is limited to IMAGE_FORMATS, and an
image whose header says more than MAX_PIXELS is refused before a pixel is decoded. Both are bad
samples with their own kind (docs/reliability.md, Data path). Pictures given to `lesa predict` may
also be TIFF, as a conversion's sources may (`as_shard_image`). No torch here: converters use it in
Ray tasks.
"""

from __future__ import annotations

import io

from PIL import Image

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # shard images
CONVERT_FORMATS = (*IMAGE_FORMATS, "TIFF")  # a conversion's source images, and pictures given to `lesa predict`
MAX_PIXELS = 8192 * 8192  # 64 megapixels: 256 MB as RGB; a DSLR photo is under 50


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
        raise BadSample("corrupt image", f"{type(exc).__name__}: {exc} (decoded are {', '.join(formats)})") from None


def check_pixels(image: Image.Image, limit: int = MAX_PIXELS) -> None:
    w, h = image.size
    if w * h > limit:
        raise BadSample("image too large", f"{w} x {h} pixels, over the limit of {limit:,} (64 megapixels)")


def as_shard_image(data: bytes, formats: tuple[str, ...] = CONVERT_FORMATS) -> bytes:
    """Bytes the shard decoder reads (IMAGE_FORMATS) for an image in any of `formats`: an image in
    IMAGE_FORMATS as it is, another (a TIFF) within the pixel limit re-encoded losslessly as an RGB
    PNG, so the decoder sees the same pixels it would decode from the original."""
    with open_image(data, formats) as image:
        if image.format in IMAGE_FORMATS:
            return data
        check_pixels(image)
        try:
            rgb = image.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
            raise BadSample("corrupt image", f"{image.format}: {type(exc).__name__}: {exc}") from None
    out = io.BytesIO()
    rgb.save(out, format="PNG", compress_level=1)  # read back at once: speed over size
    return out.getvalue()
