"""PNG files that carry their generation parameters in text chunks."""

from __future__ import annotations

import io

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from protocol.messages import ResolvedParams

# PNG text keys, in the order they are written; a parameter the pipeline did not take is left out.
METADATA_KEYS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance",  # guidance_scale as passed to the pipeline
    "true_cfg",  # true_cfg_scale as passed to the pipeline
    "width",
    "height",
    "scheduler",
    "loras",  # the LoRA adapters as NAME:WEIGHT, comma-separated
    "strength",  # with images in
    "image_sha256",  # the init images', comma-separated
    "mask_sha256",
    "model",
    "family",
)


def encode_png(image: Image.Image, params: ResolvedParams, index: int = 0) -> bytes:
    """The image as PNG, with ``params`` in text chunks; image ``index`` of a request records its own seed."""
    values = {
        **vars(params),
        "seed": params.seed + index,
        "image_sha256": ",".join(params.image_sha256) or None,
        "loras": ",".join(f"{name}:{weight:g}" for name, weight in params.loras.items()) or None,
    }
    info = PngInfo()
    for key in METADATA_KEYS:
        if values.get(key) is not None:
            info.add_text(key, str(values[key]))
    info.add_text("generator", "triptych")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_metadata(png: bytes) -> dict[str, str]:
    with Image.open(io.BytesIO(png)) as image:
        return dict(image.text)
