"""AUTOMATIC1111's web UI API (``/sdapi/v1``), for front ends that speak only it.

Open WebUI, SillyTavern and the ``webuiapi`` package drive a Stable Diffusion web UI through these
routes; the gateway answers them in front of the broker, so those front ends make images with
triptych unchanged. ``txt2img`` fields map onto triptych's options: ``cfg_scale`` is the
pipeline's ``guidance_scale``, ``batch_size`` x ``n_iter`` images are made with seeds ``seed + i``
(``-1``: a random seed), and ``sampler_name`` (with A1111's ``scheduler``, its noise schedule)
names one of the model's samplers: "Euler a" is ``euler_a``, "DPM++ 2M" with "Karras" is
``dpmpp_2m_karras``, and triptych's own names are taken as they are. Unset fields take the
model's pipeline defaults. ``<lora:NAME:WEIGHT>`` in the prompt (the web UI's extra-network
syntax, weight default 1) is taken out of it, as the web UI does, and becomes the request's LoRA
adapters; ``/sdapi/v1/loras`` lists the current model's. Features triptych does not have (hires
fix, face restoration, tiling, styles, scripts) are refused when asked for, naming the field; extension settings
(``alwayson_scripts``) and other ``override_settings`` are ignored.

The web UI has one current model for everyone; here each API key has its own
(``sd_model_checkpoint`` in ``POST /sdapi/v1/options``), else the first model the broker serves.
``/sdapi/v1/progress`` follows the key's latest ``txt2img``, with the denoiser's newest preview as
``current_image``. Errors come in the web UI's shape (``{"error", "detail", "body", "errors"}``).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocol.messages import GenerateRequest, ProgressEvent
from protocol.stages import DENOISE
from protocol.validation import MAX_IMAGE_BYTES, MAX_IMAGES, MAX_SEED, request_error
from triptych.client import GeneratedImage, GenerationError
from triptych.http.errors import ApiError, error_from_failure, invalid
from triptych.http.params import GenerationParams, read_json

if TYPE_CHECKING:
    from triptych.http.app import Gateway

logger = logging.getLogger(__name__)

# triptych's sampler names as the web UI shows them.
DISPLAY_NAMES: dict[str, str] = {
    "euler_a": "Euler a",
    "euler": "Euler",
    "lms": "LMS",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "ddim": "DDIM",
    "pndm": "PLMS",
    "unipc": "UniPC",
    "flow_euler": "Euler",
    "flow_euler_karras": "Euler Karras",
    "flow_euler_exponential": "Euler Exponential",
    "flow_heun": "Heun",
}
# A web UI sampler name (lower case) -> the triptych names it may mean: a model takes the one it has.
_BY_DISPLAY: dict[str, list[str]] = {}
for _name, _display in DISPLAY_NAMES.items():
    _BY_DISPLAY.setdefault(_display.lower(), []).append(_name)
_BY_DISPLAY["dpm++ 2m sde"] = ["dpmpp_2m_sde"]  # only with the Karras schedule
_SCHEDULES = {"automatic": "", "karras": "_karras", "exponential": "_exponential"}  # A1111 1.9's scheduler
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]+\]$")  # "name [6ce0161689]", as the web UI titles checkpoints
# Web UI features triptych has not: a request asking for one is refused, naming the field.
_UNSUPPORTED = {
    "enable_hr": "hires fix",
    "restore_faces": "face restoration",
    "tiling": "tiling",
    "styles": "prompt styles",
    "script_name": "scripts",
}
# `<lora:NAME>` or `<lora:NAME:WEIGHT>` in a prompt: the web UI's extra-network syntax (its `<(\w+):([^>]+)>`).
_LORA_TAG = re.compile(r"<lora:([^>]+)>")
# Lists the web UI has and triptych has nothing for (yet): answered empty, so front ends that ask work.
EMPTY_LISTS = ("hypernetworks", "sd-vae", "prompt-styles", "face-restorers", "realesrgan-models")


def sampler_for(name: str | None, schedule: str | None, accepted: list[str]) -> str | None:
    """The triptych sampler a web UI sampler name and schedule mean for a model taking ``accepted``.

    None (or "") is the checkpoint's own scheduler; an unknown or unavailable one is a 400 naming
    ``sampler_name`` (or ``scheduler``) and listing what the model takes.
    """
    if not name:
        return None
    suffix = _SCHEDULES.get((schedule or "automatic").lower())
    if suffix is None:
        known = ", ".join(_SCHEDULES)
        raise invalid("scheduler", f"scheduler {schedule!r} is not available; it takes {known}")
    if name in accepted and not suffix:
        return name
    candidates = _BY_DISPLAY.get(name.lower(), [name])
    for base in candidates:
        wanted = base if not suffix or base.endswith(suffix) else base + suffix
        for option in (wanted, f"flow_{wanted}"):  # flow models run "Euler" as flow-matching Euler
            if option in accepted:
                return option
    offered = ", ".join(dict.fromkeys(DISPLAY_NAMES.get(s, s) for s in accepted)) or "only its own scheduler"
    asked = f"{name!r}" + (f" with the {schedule} schedule" if suffix else "")
    raise invalid("sampler_name", f"sampler {asked} is not available for this model; it takes {offered}")


def prompt_loras(prompt: str) -> tuple[str, dict[str, float]]:
    """The prompt without its ``<lora:NAME[:WEIGHT]>`` tags, and the adapters they name, in order.

    As the web UI does, each tag is replaced by nothing (the text around it is kept as it is) and a
    missing weight is 1. A tag that is not NAME or NAME:WEIGHT with a finite number, or an adapter
    named twice, is a 400 naming ``prompt``. Whether the adapter exists is the denoiser's to say: it
    lists its folder as requests come.
    """
    loras: dict[str, float] = {}

    def take(match: re.Match) -> str:
        name, _, weight_text = match[1].partition(":")
        name = name.strip()
        try:
            weight = 1.0 if not weight_text else float(weight_text)
        except ValueError:
            weight = math.nan
        if not name or not math.isfinite(weight):
            raise invalid("prompt", f"{match[0]}: a LoRA tag is <lora:NAME> or <lora:NAME:WEIGHT> with a number")
        if name in loras:
            raise invalid("prompt", f"the prompt names LoRA {name!r} more than once")
        loras[name] = weight
        return ""

    return _LORA_TAG.sub(take, prompt), loras


@dataclass
class Progress:
    """One key's latest txt2img, as ``/sdapi/v1/progress`` reports it; written by the call's thread."""

    started: float = field(default_factory=time.time)
    step: int = 0
    total: int = 0
    image: bytes | None = None  # the newest preview of the first image
    done: bool = False
    interrupted: bool = False  # by POST /sdapi/v1/interrupt
    cancel: threading.Event = field(default_factory=threading.Event)

    def on_progress(self, event: ProgressEvent) -> None:
        if event.stage == DENOISE and event.total:
            self.step, self.total = event.step, event.total
        if event.previews:
            self.image = event.previews[0]

    def report(self, skip_image: bool) -> dict:
        busy = not self.done
        fraction = self.step / self.total if busy and self.total else 0.0
        elapsed = time.time() - self.started
        state = {
            "skipped": False,
            "interrupted": self.interrupted,
            "job": "txt2img" if busy else "",
            "job_count": 1 if busy else 0,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(self.started)),
            "job_no": 0,
            "sampling_step": self.step if busy else 0,
            "sampling_steps": self.total if busy else 0,
        }
        image = None if skip_image or not busy or self.image is None else base64.b64encode(self.image).decode()
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        return {"progress": fraction, "eta_relative": eta, "state": state, "current_image": image, "textinfo": None}


def _a1111_error(error: ApiError) -> JSONResponse:
    body = {"error": error.code or type(error).__name__, "detail": error.message, "body": "", "errors": error.message}
    return JSONResponse(body, status_code=error.status)


def _guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """A route answering its errors in the web UI's shape."""

    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as error:
            return _a1111_error(error)

    return route


class WebUIApi:
    """The ``/sdapi/v1`` routes over a gateway's broker connections and model list."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.checkpoints: dict[str, str] = {}  # API key (or "http") -> the model its options chose
        self.progress: dict[str, Progress] = {}  # API key -> its latest txt2img

    @staticmethod
    def _tenant(request: Request) -> str:
        return getattr(request.state, "api_key", "http")

    async def _current_model(self, request: Request) -> str:
        served = await self.gateway.models.served()
        chosen = self.checkpoints.get(self._tenant(request))
        if chosen in served:
            return chosen
        if not served:
            raise ApiError(503, "no node serves any model yet", code="no_node")
        return served[0]

    async def _model_named(self, title: str) -> str:
        name = _TITLE_HASH.sub("", title)
        if name not in await self.gateway.models.served(fresh=True):
            served = ", ".join(await self.gateway.models.served()) or "none yet"
            raise ApiError(404, f"no checkpoint {name!r} (served: {served})", param="sd_model_checkpoint")
        return name

    # --- lists ------------------------------------------------------------------------------

    async def sd_models(self, request: Request) -> Response:
        models = await self.gateway.models.served(fresh=True)
        return JSONResponse(
            [{"title": m, "model_name": m, "hash": None, "sha256": None, "filename": m, "config": None} for m in models]
        )

    async def samplers(self, request: Request) -> Response:
        model = await self._current_model(request)
        names = self.gateway.models.samplers(model)
        return JSONResponse([{"name": DISPLAY_NAMES.get(n, n), "aliases": [n], "options": {}} for n in names])

    async def schedulers(self, request: Request) -> Response:
        return JSONResponse(
            [
                {"name": name, "label": name.title(), "aliases": None, "default_rho": -1, "need_inner_model": False}
                for name in _SCHEDULES
            ]
        )

    async def loras(self, request: Request) -> Response:
        """The current model's adapters in the web UI's shape; ``path`` is the file within the nodes'
        ``--lora-dir`` (the nodes' own paths are theirs)."""
        model = await self._current_model(request)
        names = self.gateway.models.loras(model)
        return JSONResponse([{"name": n, "alias": n, "path": f"{n}.safetensors", "metadata": {}} for n in names])

    async def upscalers(self, request: Request) -> Response:
        none = {"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}
        return JSONResponse([none])

    async def scripts(self, request: Request) -> Response:
        return JSONResponse({"txt2img": [], "img2img": []})

    async def embeddings(self, request: Request) -> Response:
        return JSONResponse({"loaded": {}, "skipped": {}})

    async def empty(self, request: Request) -> Response:
        return JSONResponse([])

    async def refresh(self, request: Request) -> Response:
        await self.gateway.models.served(fresh=True)
        return JSONResponse(None)

    # --- options and progress ---------------------------------------------------------------

    async def get_options(self, request: Request) -> Response:
        model = await self._current_model(request)
        return JSONResponse({"sd_model_checkpoint": model, "sd_checkpoint_hash": None, "samples_format": "png"})

    async def set_options(self, request: Request) -> Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise invalid(None, "the options must be a JSON object")
        title = body.get("sd_model_checkpoint")
        if title is not None:
            if not isinstance(title, str):
                raise invalid("sd_model_checkpoint", "sd_model_checkpoint must be a string")
            self.checkpoints[self._tenant(request)] = await self._model_named(title)
        return JSONResponse(None)

    async def get_progress(self, request: Request) -> Response:
        skip = request.query_params.get("skip_current_image", "false").lower() == "true"
        job = self.progress.get(self._tenant(request)) or Progress(done=True)
        return JSONResponse(job.report(skip))

    async def interrupt(self, request: Request) -> Response:
        job = self.progress.get(self._tenant(request))
        if job is not None and not job.done:
            job.interrupted = True
            job.cancel.set()
        return JSONResponse(None)

    # --- txt2img ----------------------------------------------------------------------------

    async def txt2img(self, request: Request) -> Response:
        return await self._generate(request, await read_json(request), parse_txt2img)

    async def img2img(self, request: Request) -> Response:
        return await self._generate(request, await read_json(request, limit=MAX_IMAGE_BYTES * 2), parse_img2img)

    async def _generate(self, request: Request, body: Any, parse: Callable) -> Response:
        if not isinstance(body, dict):
            raise invalid(None, "the request body must be a JSON object")
        overrides = body.get("override_settings") or {}
        if not isinstance(overrides, dict):
            raise invalid("override_settings", "override_settings must be an object")
        title = overrides.get("sd_model_checkpoint")
        model = await self._model_named(title) if isinstance(title, str) else await self._current_model(request)
        params, sampler = parse(body, model, self.gateway.models.samplers(model))
        job = Progress()
        self.progress[self._tenant(request)] = job
        user = self.gateway.user_of(request)

        def run() -> list[GeneratedImage]:
            try:
                return self.gateway.run_generation(params, user, job.cancel, on_progress=job.on_progress)
            finally:
                job.done = True

        try:
            images = await self.gateway.run_until_disconnect(request, run, job.cancel)
        except GenerationError as exc:
            raise error_from_failure(exc) from exc
        send = body.get("send_images", True) is not False
        answer = {
            "images": [base64.b64encode(image.png).decode("ascii") for image in images] if send else [],
            "parameters": {key: value for key, value in body.items() if key not in ("init_images", "mask")},
            "info": json.dumps(info(params, sampler, images, job.started, prompt=body.get("prompt"))),
        }
        return JSONResponse(answer)


def _image(value: Any, field: str) -> bytes:
    """A web UI image: base64, bare or as a data URL. Its bytes are checked where they are decoded."""
    if not isinstance(value, str):
        raise invalid(field, f"{field} must be a base64 image")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise invalid(field, f"{field}: not valid base64") from None


def parse_img2img(body: dict, model: str, samplers: list[str]) -> tuple[GenerationParams, str]:
    """An img2img body: as txt2img, plus the init images, the mask and the denoising strength.

    The size is the pipeline's for images in (for Stable Diffusion img2img, the init image's own), so
    the web UI's ``width``/``height``, which its clients always send, apply to inpainting only.
    """
    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise invalid("init_images", "init_images must be a list of base64 images", code="missing_required_parameter")
    mask = body.get("mask")
    if mask is None:
        body = {key: value for key, value in body.items() if key not in ("width", "height")}
    params, sampler = parse_txt2img(body, model, samplers)
    params.images = [_image(value, "init_images") for value in images]
    if mask is not None:
        params.mask = _image(mask, "mask")
        if body.get("inpainting_mask_invert"):
            raise invalid("inpainting_mask_invert", "inpainting_mask_invert is not supported by this server")
    strength = _number(body, "denoising_strength", float)
    params.strength = 0.75 if strength is None else strength  # the web UI's default
    if not 0 < params.strength <= 1:
        raise invalid("denoising_strength", f"denoising_strength must be in (0, 1] (got {params.strength})")
    return params, sampler


def _number(body: dict, name: str, kind: type) -> Any:
    """``body[name]`` if a JSON number of ``kind`` (an int also passes as a float), None if absent or null."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise invalid(name, f"{name} must be {'an integer' if kind is int else 'a number'} (got {value!r})")
    return kind(value)


def _text(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise invalid(name, f"{name} must be a string")
    return value


def parse_txt2img(body: dict, model: str, samplers: list[str]) -> tuple[GenerationParams, str]:
    """A txt2img body -> the gateway's request and the sampler name to report; 400 naming a bad field."""
    for name, feature in _UNSUPPORTED.items():
        if body.get(name):
            raise invalid(name, f"{name}: {feature} is not supported by this server")
    if (_number(body, "subseed_strength", float) or 0) > 0:
        raise invalid("subseed_strength", "subseed_strength: variation seeds are not supported by this server")
    batch_size, n_iter = (_number(body, name, int) for name in ("batch_size", "n_iter"))
    batch_size, n_iter = 1 if batch_size is None else batch_size, 1 if n_iter is None else n_iter
    if batch_size < 1 or n_iter < 1 or batch_size * n_iter > MAX_IMAGES:
        raise invalid("batch_size", f"batch_size x n_iter must be between 1 and {MAX_IMAGES} images")
    count = batch_size * n_iter
    seed = _number(body, "seed", int)
    if seed is None or seed == -1:
        seed = secrets.randbelow(2**32)
    if not 0 <= seed <= MAX_SEED - count:
        raise invalid("seed", f"seed must be -1 or between 0 and {MAX_SEED - count} (got {seed})")
    name = _text(body, "sampler_name") or _text(body, "sampler_index")
    scheduler = sampler_for(name, _text(body, "scheduler"), samplers)
    prompt, loras = prompt_loras(_text(body, "prompt") or "")
    params = GenerationParams(
        prompt=prompt,
        model=model,
        n=count,
        width=_number(body, "width", int),
        height=_number(body, "height", int),
        response_format="b64_json",
        seed=seed,
        negative_prompt=_text(body, "negative_prompt") or None,  # "" is the web UI's "none"
        steps=_number(body, "steps", int),
        guidance=_number(body, "cfg_scale", float),
        true_cfg=None,
        scheduler=scheduler,
        user="",
        preview_every=None,
        loras=loras,
    )
    check = GenerateRequest(
        request_id="check",
        model=model,
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        steps=params.steps,
        guidance=params.guidance,
        height=params.height,
        width=params.width,
        seed=seed,
        num_images=count,
        scheduler=scheduler,
        loras=loras,
    )
    if (problem := request_error(check)) is not None:
        bad, message = problem
        names = {"guidance": "cfg_scale", "num_images": "batch_size", "scheduler": "sampler_name", "loras": "prompt"}
        raise invalid(names.get(bad, bad), message)
    return params, name or ""


def info(
    params: GenerationParams, sampler: str, images: list[GeneratedImage], started: float, prompt: str | None = None
) -> dict:
    """The web UI's ``info``: the settings every image was made with, as the pipeline resolved them;
    ``prompt`` is the prompt as sent, ``<lora:...>`` tags and all, as the web UI reports it."""
    prompt = prompt if isinstance(prompt, str) else params.prompt
    resolved = images[0].params if images else {}
    seeds = [image.seed for image in images]
    width, height = resolved.get("width", params.width), resolved.get("height", params.height)
    steps, cfg = resolved.get("steps", params.steps), resolved.get("guidance", params.guidance)
    sampler = sampler or str(resolved.get("scheduler", ""))
    negative = params.negative_prompt or ""
    texts = []
    for seed in seeds:
        lines = [prompt] + ([f"Negative prompt: {negative}"] if negative else [])
        lines.append(
            f"Steps: {steps}, Sampler: {sampler}, CFG scale: {cfg}, Seed: {seed}, Size: {width}x{height}, "
            f"Model: {params.model}, Version: triptych"
        )
        texts.append("\n".join(lines))
    return {
        "prompt": prompt,
        "all_prompts": [prompt] * len(images),
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * len(images),
        "seed": params.seed,
        "all_seeds": seeds,
        "subseed": params.seed,
        "all_subseeds": seeds,
        "subseed_strength": 0,
        "width": width,
        "height": height,
        "sampler_name": sampler,
        "cfg_scale": cfg,
        "steps": steps,
        "batch_size": len(images),
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": params.model,
        "sd_model_hash": None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": texts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": "triptych",
    }


def routes(gateway: Gateway) -> list[Route]:
    """The ``/sdapi/v1`` routes."""
    api = WebUIApi(gateway)
    table: list[tuple[str, Callable[[Request], Awaitable[Response]], str]] = [
        ("/sdapi/v1/txt2img", api.txt2img, "POST"),
        ("/sdapi/v1/img2img", api.img2img, "POST"),
        ("/sdapi/v1/sd-models", api.sd_models, "GET"),
        ("/sdapi/v1/samplers", api.samplers, "GET"),
        ("/sdapi/v1/schedulers", api.schedulers, "GET"),
        ("/sdapi/v1/upscalers", api.upscalers, "GET"),
        ("/sdapi/v1/scripts", api.scripts, "GET"),
        ("/sdapi/v1/embeddings", api.embeddings, "GET"),
        ("/sdapi/v1/options", api.get_options, "GET"),
        ("/sdapi/v1/options", api.set_options, "POST"),
        ("/sdapi/v1/progress", api.get_progress, "GET"),
        ("/sdapi/v1/interrupt", api.interrupt, "POST"),
        ("/sdapi/v1/refresh-checkpoints", api.refresh, "POST"),
        ("/sdapi/v1/loras", api.loras, "GET"),
        ("/sdapi/v1/refresh-loras", api.refresh, "POST"),
        *((f"/sdapi/v1/{name}", api.empty, "GET") for name in EMPTY_LISTS),
    ]
    return [Route(path, _guarded(handler), methods=[method]) for path, handler, method in table]
