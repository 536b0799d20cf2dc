"""Bounds on request fields, checked at the broker before any work is queued.

Family-specific constraints (e.g. the size multiple a model needs) are checked again by the
node that depends on them; these are the limits every model shares.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from protocol.messages import GenerateRequest

MAX_PROMPT_CHARS = 10_000
MAX_STEPS = 1_000
MAX_IMAGES = 16
MAX_SIDE = 8_192
MAX_PIXELS = 4096 * 4096
SIZE_MULTIPLE = 8
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit value
MAX_GUIDANCE = 1_000.0
MAX_TIMEOUT = 24 * 3600.0
MAX_PREVIEW_BYTES = 1 << 20  # one preview PNG: a picture of the latent grid, a few KB
MAX_INPUT_IMAGES = 8  # init images of one request (multi-image edit models take a few)
MAX_IMAGE_BYTES = 48 << 20  # all image bytes of one request, mask included
MAX_LORAS = 8  # LoRA adapters one request may combine
MAX_LORA_WEIGHT = 10.0  # |weight| of one adapter; diffusers' set_adapters scale
# An adapter is NAME.safetensors in a node's --lora-dir: a plain file name, never a path.
LORA_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


def _guidance_problem(name: str, value: float | None) -> tuple[str, str] | None:
    if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_GUIDANCE):
        return name, f"{name} must be a finite number between 0 and {MAX_GUIDANCE:g} (got {value})"
    return None


def loras_problem(loras: Mapping[str, float]) -> tuple[str, str] | None:
    """Bounds on a request's LoRA adapters; whether a name is in a node's folder is the node's to say."""
    if len(loras) > MAX_LORAS:
        return "loras", f"loras: at most {MAX_LORAS} adapters per request (got {len(loras)})"
    for name, weight in loras.items():
        if not isinstance(name, str) or LORA_NAME.fullmatch(name) is None:
            return "loras", f"loras: an adapter name is 1 to 128 characters of A-Z a-z 0-9 . _ - (got {name!r})"
        number = isinstance(weight, int | float) and not isinstance(weight, bool)
        if not (number and math.isfinite(weight) and -MAX_LORA_WEIGHT <= weight <= MAX_LORA_WEIGHT):
            return (
                "loras",
                f"loras: the weight of {name!r} must be a finite number between {-MAX_LORA_WEIGHT:g} and "
                f"{MAX_LORA_WEIGHT:g} (got {weight!r})",
            )
    return None


def _images_problem(req: GenerateRequest) -> tuple[str, str] | None:
    """Bounds on images in; what they hold is checked by the node that decodes them, never here."""
    if len(req.images) > MAX_INPUT_IMAGES:
        return "image", f"image: at most {MAX_INPUT_IMAGES} images per request (got {len(req.images)})"
    total = sum(len(image) for image in req.images) + len(req.mask or b"")
    if total > MAX_IMAGE_BYTES:
        return "image", f"image: the images of a request must be at most {MAX_IMAGE_BYTES >> 20} MB in all"
    if any(not image for image in req.images):
        return "image", "image: an image is empty"
    if req.mask is not None and not req.images:
        return "mask", "mask: a mask needs an image to repaint (--image)"
    if req.mask is not None and len(req.images) != 1:
        return "mask", f"mask: inpainting repaints one image (got {len(req.images)})"
    if req.strength is not None:
        if not req.images:
            return "strength", "strength: only requests with an image (--image) take a strength"
        if not (math.isfinite(req.strength) and 0 < req.strength <= 1):
            return "strength", f"strength must be in (0, 1] (got {req.strength})"
    return None


def request_error(req: GenerateRequest) -> tuple[str, str] | None:
    """The first problem with ``req``: the field at fault, and a sentence naming it and its allowed range."""
    if not req.request_id or len(req.request_id) > 128:
        return "request_id", "request_id must be 1 to 128 characters"
    if len(req.model) > 256:
        return "model", "model must be at most 256 characters"
    if len(req.user) > 256:
        return "user", "user must be at most 256 characters"
    if len(req.prompt) > MAX_PROMPT_CHARS:
        return "prompt", f"prompt must be at most {MAX_PROMPT_CHARS} characters (got {len(req.prompt)})"
    if req.negative_prompt is not None and len(req.negative_prompt) > MAX_PROMPT_CHARS:
        return "negative_prompt", f"negative_prompt must be at most {MAX_PROMPT_CHARS} characters"
    if req.steps is not None and not 1 <= req.steps <= MAX_STEPS:
        return "steps", f"steps must be between 1 and {MAX_STEPS} (got {req.steps})"
    if (
        problem := _guidance_problem("guidance", req.guidance) or _guidance_problem("true_cfg", req.true_cfg)
    ) is not None:
        return problem
    for name in ("height", "width"):
        side = getattr(req, name)
        if side is not None and not (SIZE_MULTIPLE <= side <= MAX_SIDE and side % SIZE_MULTIPLE == 0):
            return (
                name,
                f"{name} must be a multiple of {SIZE_MULTIPLE} between {SIZE_MULTIPLE} and {MAX_SIDE} (got {side})",
            )
    if req.height is not None and req.width is not None and req.height * req.width > MAX_PIXELS:
        return "height", f"height x width must be at most {MAX_PIXELS} pixels (got {req.height * req.width})"
    if req.scheduler is not None and not 1 <= len(req.scheduler) <= 64:
        return "scheduler", "scheduler must be a sampler name of 1 to 64 characters"
    if (problem := loras_problem(req.loras)) is not None:
        return problem
    if req.preview_every is not None and not 0 <= req.preview_every <= MAX_STEPS:
        return "preview_every", f"preview_every must be between 0 and {MAX_STEPS} steps (got {req.preview_every})"
    if (problem := _images_problem(req)) is not None:
        return problem
    if not 1 <= req.num_images <= MAX_IMAGES:
        return "num_images", f"num_images must be between 1 and {MAX_IMAGES} (got {req.num_images})"
    if not 0 <= req.seed <= MAX_SEED - req.num_images:
        return "seed", f"seed must be between 0 and {MAX_SEED - req.num_images} (got {req.seed})"
    if not (math.isfinite(req.timeout) and 0 < req.timeout <= MAX_TIMEOUT):
        return "timeout", f"timeout must be between 0 and {MAX_TIMEOUT:g} seconds (got {req.timeout})"
    return None
