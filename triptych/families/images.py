"""Untrusted image files in: opened with a pixel bound checked before any pixel is decoded.

A 1-bit PNG of 40000 x 40000 is 200 KB on the wire and 1.6 GB once decoded, so the size in the
header is checked first, and only PNG, JPEG and WebP are read at all. Runs on the node that
encodes images (the decoder node), never in the broker.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from protocol.errors import RequestError

MAX_IMAGE_PIXELS = 4096 * 4096  # an image in may be at most this many pixels
FORMATS = ("PNG", "JPEG", "WEBP")


def open_mask(data: bytes, field: str, alpha: bool) -> Image.Image:
    """A mask in diffusers' convention (white repaints, black keeps), an "L" image.

    With ``alpha`` the file follows OpenAI's convention instead: its fully transparent pixels mark
    what to repaint. This is the one place that convention is turned into diffusers'.
    """
    if not alpha:
        return open_image(data, field, mode="L")
    rgba = open_image(data, field, mode="RGBA")
    return rgba.getchannel("A").point(lambda value: 255 if value == 0 else 0)


def open_image(data: bytes, field: str, mode: str = "RGB") -> Image.Image:
    """The decoded image, converted to ``mode``; a RequestError naming ``field`` for anything else."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(field, f"{field}: the image is over the limit of {MAX_IMAGE_PIXELS} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise RequestError(field, f"{field}: not an image (PNG, JPEG or WebP): {exc}") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise RequestError(
            field, f"{field}: {width} x {height} pixels is over the limit of {MAX_IMAGE_PIXELS} pixels per image"
        )
    try:
        image.load()
        # Keep the alpha channel for a mask (OpenAI's convention marks the area to edit by transparency).
        return image.convert(mode)
    except (OSError, ValueError, SyntaxError) as exc:
        raise RequestError(field, f"{field}: the image is truncated or corrupt: {exc}") from None
