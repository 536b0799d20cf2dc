"""The body of ``POST /v1/images/edits``: OpenAI's multipart form, read into the same checked parameters.

OpenAI's fields (``image`` — or several as ``image[]`` —, ``mask``, ``prompt``, ``model``, ``n``,
``size``, ``response_format``, ``user``) and triptych's extras as form fields (``seed``,
``strength``, ``negative_prompt``, ``num_inference_steps``, ``guidance_scale``,
``true_cfg_scale``, ``scheduler``, and ``loras`` as the JSON text of the generations body's array). The mask keeps OpenAI's convention here (fully transparent
pixels mark what to edit); the node that decodes it turns it into diffusers' (white repaints).
The gateway never decodes an image: it only bounds the bytes.
"""

from __future__ import annotations

import json
import math

from starlette.datastructures import UploadFile
from starlette.requests import Request

from protocol.validation import MAX_IMAGE_BYTES, MAX_INPUT_IMAGES
from triptych.http.errors import invalid
from triptych.http.params import GenerationParams, parse_generation

_INTS = ("n", "seed", "num_inference_steps", "partial_images", "preview_every")
_FLOATS = ("guidance_scale", "true_cfg_scale", "strength")
_BOOLS = ("stream",)
_JSON = ("loras",)  # [{"name": ..., "weight": ...}] as JSON text
_FILES = ("image", "image[]", "mask")


def _typed(name: str, text: str) -> object:
    """A form field's text as the JSON value the generations body would carry."""
    try:
        if name in _INTS:
            return int(text)
        if name in _FLOATS:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
            return value
    except ValueError:
        kind = "an integer" if name in _INTS else "a number"
        raise invalid(name, f"{name} must be {kind} (got {text!r})", code="invalid_type") from None
    if name in _BOOLS:
        return text.strip().lower() in ("1", "true", "yes")
    if name in _JSON:
        try:
            return json.loads(text)
        except ValueError:
            raise invalid(name, f"{name} must be JSON, as in the generations body (got {text[:80]!r})") from None
    return text


async def parse_edit(request: Request) -> GenerationParams:
    """Check an images/edits form; raises ApiError (400) naming the first bad field."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise invalid(None, "images/edits takes a multipart/form-data body (image, mask, prompt...)")
    form = await request.form(max_files=MAX_INPUT_IMAGES + 1, max_fields=64, max_part_size=MAX_IMAGE_BYTES)
    body: dict[str, object] = {}
    images: list[bytes] = []
    mask: bytes | None = None
    for name, value in form.multi_items():
        if isinstance(value, UploadFile) or name in _FILES:
            data = await value.read() if isinstance(value, UploadFile) else str(value).encode()
            if name in ("image", "image[]"):
                images.append(data)
            elif name == "mask":
                mask = data
            else:
                raise invalid(name, f"{name}: only image, image[] and mask may be files")
        else:
            body[name] = _typed(name, value)
    if not images:
        raise invalid("image", "image is required", code="missing_required_parameter")
    if len(images) > MAX_INPUT_IMAGES:
        raise invalid("image", f"image: at most {MAX_INPUT_IMAGES} images per request (got {len(images)})")
    if sum(map(len, images)) + len(mask or b"") > MAX_IMAGE_BYTES:
        raise invalid("image", f"image: the images must be at most {MAX_IMAGE_BYTES >> 20} MB in all")
    strength = body.pop("strength", None)
    if strength is not None and not 0 < float(strength) <= 1:  # type: ignore[arg-type]
        raise invalid("strength", f"strength must be in (0, 1] (got {strength})")
    params = parse_generation(body)
    params.images, params.mask, params.mask_alpha = images, mask, mask is not None
    params.strength = None if strength is None else float(strength)  # type: ignore[arg-type]
    return params
