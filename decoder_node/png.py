"""PNG files that carry their generation parameters in text chunks."""

from __future__ import annotations

import io

from PIL import Image
from PIL.PngImagePlugin import PngInfo

# PNG text keys, in the order they are written.
METADATA_KEYS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance",
    "pipeline_guidance",  # the pipeline arguments --guidance set (a family may map it elsewhere)
    "width",
    "height",
    "model",
    "family",
)


def encode_png(image: Image.Image, params: dict) -> bytes:
    info = PngInfo()
    for key in METADATA_KEYS:
        if params.get(key) is not None:
            info.add_text(key, str(params[key]))
    info.add_text("generator", "triptych")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_metadata(png: bytes) -> dict[str, str]:
    with Image.open(io.BytesIO(png)) as image:
        return dict(image.text)
