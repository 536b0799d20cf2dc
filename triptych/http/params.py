"""The body of ``POST /v1/images/generations``: read, type-checked and bounded before the broker sees it.

Every bad field comes back as a 400 naming it in OpenAI's ``param``, so a client learns what to fix
without a round trip through the broker.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from protocol.messages import GenerateRequest
from protocol.validation import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_PIXELS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    SIZE_MULTIPLE,
    request_error,
)
from triptych.http.errors import ApiError, invalid, param_of

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a request body is a prompt and a few numbers
RESPONSE_FORMATS = ("b64_json", "url")
MAX_PARTIAL_IMAGES = 3  # OpenAI's bound on partial_images
_SIZE = re.compile(r"(\d{1,6})x(\d{1,6})")
_JSON_TYPES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
}


@dataclass
class GenerationParams:
    prompt: str
    model: str  # "" = the broker's only model
    n: int
    width: int | None  # None = the model's default size
    height: int | None
    response_format: str  # b64_json or url
    seed: int | None  # None = random; image i uses seed + i
    negative_prompt: str | None
    steps: int | None
    guidance: float | None  # the pipeline's guidance_scale
    true_cfg: float | None  # the pipeline's true_cfg_scale (a real negative-prompt pass), where it has one
    scheduler: str | None  # a sampler name (euler_a, dpmpp_2m...); None = the checkpoint's scheduler
    user: str  # OpenAI's end-user id ("" = none)
    stream: bool = False  # answer with server-sent events (OpenAI's image generation stream)
    partial_images: int = 0  # previews sent as partial images when streaming, 0 to 3
    preview_every: int | None = None  # denoising steps between previews (progress stream); None: a quarter
    images: list[bytes] = field(default_factory=list)  # images/edits: the init images' file bytes
    mask: bytes | None = None  # images/edits: the mask's file bytes
    mask_alpha: bool = False  # the mask is OpenAI's: transparent pixels mark what to edit
    strength: float | None = None  # images/edits: the pipeline's strength
    loras: dict[str, float] = field(default_factory=dict)  # LoRA adapter name -> weight, in the body's order
    step_cache: str | None = None  # the denoiser's step cache, "off" or KIND[:VALUE]; None: the node's default


async def read_json(request: Request, limit: int = MAX_BODY_BYTES) -> Any:
    """The request body as JSON, refused past ``limit`` bytes without reading the rest."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body must be at most {limit} bytes", code="body_too_large")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise invalid(None, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc


def _field(body: dict, name: str, kind: type) -> Any:
    """``body[name]`` if of JSON type ``kind`` (int: not a boolean; float: any number), None if absent or null."""
    value = body.get(name)
    if value is None:
        return None
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        got = next((text for t, text in _JSON_TYPES.items() if isinstance(value, t)), type(value).__name__)
        raise invalid(name, f"{name} must be {_JSON_TYPES[kind]} (got {got})", code="invalid_type")
    return value


def _scale(body: dict, name: str) -> float | None:
    """A guidance scale: a finite number from 0 to MAX_GUIDANCE (Python's JSON reads NaN and Infinity)."""
    value = _field(body, name, float)
    if value is None:
        return None
    if not (math.isfinite(value) and 0 <= value <= MAX_GUIDANCE):
        raise invalid(name, f"{name} must be between 0 and {MAX_GUIDANCE:g} (got {value})")
    return float(value)


def _loras(body: dict) -> dict[str, float]:
    """``loras: [{"name": ..., "weight": ...}, ...]`` (weight default 1) as name -> weight; bounds are the broker's."""
    items = body.get("loras")
    if items is None:
        return {}
    if not isinstance(items, list):
        raise invalid("loras", 'loras must be an array of {"name": ..., "weight": ...}', code="invalid_type")
    loras: dict[str, float] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or set(item) - {"name", "weight"}:
            raise invalid("loras", 'each of loras must be {"name": a string, "weight": a number}', code="invalid_type")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise invalid("loras", f"the weight of LoRA {item['name']!r} must be a number", code="invalid_type")
        if item["name"] in loras:
            raise invalid("loras", f"loras names {item['name']!r} more than once")
        loras[item["name"]] = float(weight)
    return loras


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    match = _SIZE.fullmatch(size)
    if match is None:
        raise invalid("size", f"size must be WIDTHxHEIGHT in pixels, e.g. 512x512, or auto (got {size!r})")
    width, height = int(match[1]), int(match[2])
    if not all(SIZE_MULTIPLE <= side <= MAX_SIDE and side % SIZE_MULTIPLE == 0 for side in (width, height)):
        raise invalid(
            "size",
            f"size: width and height must be multiples of {SIZE_MULTIPLE} from {SIZE_MULTIPLE} to {MAX_SIDE} (got {size})",
        )
    if width * height > MAX_PIXELS:
        raise invalid("size", f"size must be at most {MAX_PIXELS} pixels (got {size})")
    return width, height


def parse_generation(body: Any) -> GenerationParams:
    """Check an images/generations body; raises :class:`ApiError` (400) naming the first bad field."""
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object")
    prompt = _field(body, "prompt", str)
    if prompt is None:
        raise invalid("prompt", "prompt is required", code="missing_required_parameter")
    n = _field(body, "n", int)
    n = 1 if n is None else n
    if not 1 <= n <= MAX_IMAGES:
        raise invalid("n", f"n must be between 1 and {MAX_IMAGES} (got {n})")
    width, height = _parse_size(_field(body, "size", str))
    response_format = _field(body, "response_format", str) or "b64_json"
    if response_format not in RESPONSE_FORMATS:
        raise invalid("response_format", f"response_format must be b64_json or url (got {response_format!r})")
    output_format = _field(body, "output_format", str)
    if output_format not in (None, "png"):
        raise invalid("output_format", f"output_format must be png (got {output_format!r})")
    seed = _field(body, "seed", int)
    if seed is not None and not 0 <= seed <= MAX_SEED - n:
        raise invalid("seed", f"seed must be between 0 and {MAX_SEED - n} (got {seed})")
    steps = _field(body, "num_inference_steps", int)
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise invalid("num_inference_steps", f"num_inference_steps must be between 1 and {MAX_STEPS} (got {steps})")
    guidance, true_cfg = _scale(body, "guidance_scale"), _scale(body, "true_cfg_scale")
    partial_images = _field(body, "partial_images", int) or 0
    if not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
        raise invalid(
            "partial_images", f"partial_images must be between 0 and {MAX_PARTIAL_IMAGES} (got {partial_images})"
        )
    params = GenerationParams(
        prompt=prompt,
        model=_field(body, "model", str) or "",
        n=n,
        width=width,
        height=height,
        response_format=response_format,
        seed=seed,
        negative_prompt=_field(body, "negative_prompt", str),
        steps=steps,
        guidance=guidance,
        true_cfg=true_cfg,
        scheduler=_field(body, "scheduler", str),
        user=_field(body, "user", str) or "",
        stream=bool(_field(body, "stream", bool)),
        partial_images=partial_images,
        preview_every=_field(body, "preview_every", int),
        loras=_loras(body),
        step_cache=_field(body, "step_cache", str),
    )
    # The broker's own bounds (prompt length...), so that they too come back naming the field.
    check = GenerateRequest(
        request_id="check",
        model=params.model,
        prompt=prompt,
        negative_prompt=params.negative_prompt,
        steps=steps,
        guidance=params.guidance,
        true_cfg=params.true_cfg,
        height=height,
        width=width,
        seed=seed or 0,
        num_images=n,
        scheduler=params.scheduler,
        loras=params.loras,
        step_cache=params.step_cache,
        preview_every=params.preview_every,
        user=params.user,
    )
    if (problem := request_error(check)) is not None:
        field, message = problem
        raise invalid(param_of(field), message)
    return params
