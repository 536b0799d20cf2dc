"""Every message that crosses the wire, in one place.

A message is a small typed dataclass. On the wire it is a msgpack map
``{"v": PROTOCOL_VERSION, "kind": KIND, **fields}`` (plus tensor frames, see ``codec``); a
field whose type is a plain dataclass (:class:`RequestSpec`, :class:`ResolvedParams`) is a
nested map. Decoding checks the version, the kind and the type of every field, nested ones
included; anything else is a :class:`ProtocolError` naming the field, never an exception from
deep inside a handler. Tensors are accepted only in fields typed :data:`~protocol.tensors.Tensor`.

Directions: client -> broker, broker -> client, node -> broker, broker -> node. Between the
broker and the nodes a request travels as *stage jobs* and *stage results*, one typed pair per
stage (see :mod:`protocol.plans` for the order they run in):

    stage         job (broker -> node)    result (node -> broker)
    encode        EncodeJob               Embeddings          (with the images, for editing models)
    encode_image  EncodeImagesJob         EncodedImages       (images in: on the decoder node)
    denoise       DenoiseJob              DenoisedLatents
    decode        DecodeJob               DecodedImage
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from protocol import codec
from protocol.errors import MODEL_ERROR
from protocol.stages import DECODE, DECODER, DENOISE, DENOISER, ENCODE, ENCODE_IMAGE, ENCODER, SERVICES
from protocol.tensors import Tensor, is_tensor

PROTOCOL_VERSION = 3

__all__ = ["DECODER", "DENOISER", "ENCODER", "SERVICES"]  # re-exported: services are named in protocol.stages


class ProtocolError(ValueError):
    """A message is malformed, of an unknown kind or version, or has a field of the wrong type."""


@dataclass(kw_only=True)
class Message:
    KIND: ClassVar[str] = ""


# --- what the nodes read of a request ------------------------------------------------------


@dataclass(kw_only=True)
class RequestSpec:
    """A request as every stage sees it: what to make, not whom it is for or how long it may take.

    Unset (None) options take the pipeline's own defaults, resolved by the denoiser's family.
    """

    model: str
    prompt: str
    negative_prompt: str | None = None  # passed to the pipeline as given
    steps: int | None = None  # num_inference_steps
    guidance: float | None = None  # the pipeline's guidance_scale
    true_cfg: float | None = None  # the pipeline's true_cfg_scale (pipelines that have one)
    height: int | None = None
    width: int | None = None
    seed: int  # image i uses seed + i
    num_images: int = 1
    scheduler: str | None = None  # a sampler name (euler_a, dpmpp_2m...); None: the checkpoint's own
    loras: dict[str, float] = field(default_factory=dict)  # LoRA adapter name -> weight, from the nodes' --lora-dir
    step_cache: str | None = None  # "off" or KIND[:VALUE] ("first_block:0.1"); None: the denoiser's --step-cache
    preview_every: int | None = None  # a preview every N denoising steps; None: every quarter; 0: none
    # Images in (img2img, inpainting): the images themselves go only to the stage that encodes them.
    strength: float | None = None  # the pipeline's strength; None: its default
    image_sha256: list[str] = field(default_factory=list)  # one per init image, in order
    mask_sha256: str | None = None  # the inpainting mask's, when there is one

    @property
    def workflow(self) -> str:
        """text-to-image, image-to-image or inpaint: which of the family's pipelines serves it."""
        if self.mask_sha256 is not None:
            return INPAINT
        return IMAGE_TO_IMAGE if self.image_sha256 else TEXT_TO_IMAGE


TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINT = "text-to-image", "image-to-image", "inpaint"


@dataclass(kw_only=True)
class ResolvedParams:
    """The parameters a request's images were made with, as the pipeline used them (PNG metadata)."""

    model: str
    family: str
    prompt: str
    negative_prompt: str  # "" when none
    seed: int  # the request's seed: image i used seed + i
    steps: int
    guidance: float | None  # guidance_scale as passed to the pipeline (None: it takes none)
    true_cfg: float | None  # true_cfg_scale as passed (None: the pipeline has no such argument)
    height: int
    width: int
    scheduler: str = ""  # the sampler name asked for, or the checkpoint's scheduler class
    loras: dict[str, float] = field(default_factory=dict)  # the LoRA adapters and weights it ran with
    step_cache: str = ""  # the denoiser's step cache it ran with, KIND:VALUE ("" : none)
    strength: float | None = None  # with images in: the strength the pipeline ran with
    image_sha256: list[str] = field(default_factory=list)  # the init images'
    mask_sha256: str | None = None  # the inpainting mask's


@dataclass(kw_only=True)
class ImageInputs:
    """Images in, as the denoiser's pipeline takes them: encoded by the VAE on the decoder node.

    ``tensors`` are family-specific pipeline inputs, one row per image of the request, e.g. for
    Stable Diffusion ``{"image": (N, 4, h, w)}`` (scaled VAE latents, which the pipeline takes in
    place of pixels), and for inpainting also ``"mask_image"`` (N, 1, H, W) and
    ``"masked_image_latents"`` (N, 4, h, w). ``generator_state`` holds each image's generator after
    the VAE's sampling drew from it, (N, S) uint8, so the denoiser's draws continue where the
    pipeline's would.
    """

    tensors: dict[str, Tensor]
    generator_state: Tensor
    height: int  # the size the pipeline makes, from the image (img2img) or the request
    width: int


# --- client -> broker ---------------------------------------------------------------------


@dataclass(kw_only=True)
class GenerateRequest(Message):
    """Make ``num_images`` images of one prompt; image i uses seed ``seed + i``.

    Unset (None) options take the model's pipeline defaults, resolved by the nodes.
    """

    KIND: ClassVar[str] = "generate"
    request_id: str
    model: str = ""  # "" = the only model the broker serves
    prompt: str
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None  # the pipeline's guidance_scale
    true_cfg: float | None = None  # the pipeline's true_cfg_scale
    height: int | None = None
    width: int | None = None
    seed: int
    num_images: int = 1
    scheduler: str | None = None  # a sampler name; None: the checkpoint's scheduler
    loras: dict[str, float] = field(default_factory=dict)  # LoRA adapter name -> weight (at most 8)
    step_cache: str | None = None  # "off" or KIND[:VALUE]; None: the denoiser's --step-cache
    preview_every: int | None = None  # a preview every N denoising steps; None: every quarter; 0: none
    images: list[bytes] = field(default_factory=list)  # init images (PNG, JPEG, WebP files): img2img, inpaint
    mask: bytes | None = None  # inpainting mask (an image file): white repaints, black keeps
    mask_alpha: bool = False  # the mask marks what to repaint by full transparency instead (OpenAI's convention)
    strength: float | None = None  # how far from the init image (0, 1]; None: the pipeline's default
    timeout: float = 300.0  # seconds the request may wait and run before it fails
    user: str = ""  # whom it is for: queued work takes turns per user ("" = per client connection)

    def spec(self) -> RequestSpec:
        """What the nodes get of this request: all but whom it is for, its timeout and the image bytes."""
        names = {f.name for f in dataclasses.fields(RequestSpec)} - {"image_sha256", "mask_sha256"}
        return RequestSpec(
            **{name: getattr(self, name) for name in names},
            image_sha256=[hashlib.sha256(image).hexdigest() for image in self.images],
            mask_sha256=None if self.mask is None else hashlib.sha256(self.mask).hexdigest(),
        )


@dataclass(kw_only=True)
class CancelRequest(Message):
    KIND: ClassVar[str] = "cancel"
    request_id: str


@dataclass(kw_only=True)
class StatusRequest(Message):
    KIND: ClassVar[str] = "status"
    request_id: str


# --- broker -> client ---------------------------------------------------------------------


@dataclass(kw_only=True)
class RequestAccepted(Message):
    """The broker holds the request (sent again for every resend of it)."""

    KIND: ClassVar[str] = "accepted"
    request_id: str


@dataclass(kw_only=True)
class ProgressEvent(Message):
    """A stage of a request started on a node (step 0) or advanced (denoiser steps)."""

    KIND: ClassVar[str] = "progress"
    request_id: str
    stage: str  # a stage name: encode, denoise, decode...
    service: str = ""  # the kind of node running it
    node: str
    step: int = 0
    total: int = 0
    previews: list[bytes] = field(default_factory=list)  # a small PNG per image of the request, or none


@dataclass(kw_only=True)
class ImageResult(Message):
    KIND: ClassVar[str] = "image"
    request_id: str
    index: int
    seed: int  # the seed this image was made with: the request's seed + index
    png: bytes
    params: ResolvedParams
    warnings: list[str] = field(default_factory=list)  # options the pipeline ignored, and why


@dataclass(kw_only=True)
class RequestFailed(Message):
    KIND: ClassVar[str] = "failed"
    request_id: str
    error: str  # one sentence for people
    code: str = MODEL_ERROR  # one of protocol.errors.CODES, for programs
    field: str | None = None  # the GenerateRequest field at fault, where there is one
    retryable: bool = False


@dataclass(kw_only=True)
class StatusReply(Message):
    KIND: ClassVar[str] = "status_reply"
    request_id: str
    nodes: list = field(default_factory=list)  # [{service, model, node, state, jobs_done, ...}]
    queues: dict = field(default_factory=dict)  # "service/model" -> queued jobs
    requests_in_flight: int = 0
    nodes_left_out: int = 0  # registered nodes not listed: a reply lists a bounded number


# --- node -> broker -----------------------------------------------------------------------


@dataclass(kw_only=True)
class WorkerReady(Message):
    """A node announces itself: first as loading, before it reads its weights (requests for its model
    then wait for it instead of failing), then as ready; sent again after the broker asks it to reconnect."""

    KIND: ClassVar[str] = "ready"
    service: str
    model: str
    node: str  # host:pid, for people and logs
    capacity: int = 1  # jobs the node accepts at once
    info: dict = field(default_factory=dict)
    state: str = "ready"  # LOADING: it takes no jobs yet; READY


LOADING, READY = "loading", "ready"  # the states a node announces (WorkerReady.state)


@dataclass(kw_only=True)
class Heartbeat(Message):
    """Either way; from a node it may carry the node's counters."""

    KIND: ClassVar[str] = "heartbeat"
    stats: dict = field(default_factory=dict)  # cumulative since the node started, e.g. {"cache_hits": 3}


@dataclass(kw_only=True)
class WorkerGoodbye(Message):
    KIND: ClassVar[str] = "goodbye"


@dataclass(kw_only=True)
class JobProgress(Message):
    KIND: ClassVar[str] = "job_progress"
    job_id: str
    step: int
    total: int
    previews: list[bytes] = field(default_factory=list)  # a latent preview PNG per image of the request, or none


@dataclass(kw_only=True)
class JobFailed(Message):
    KIND: ClassVar[str] = "job_failed"
    job_id: str
    error: str
    code: str = MODEL_ERROR  # invalid_request when the request asked what the model cannot do
    field: str | None = None  # the request field at fault, with invalid_request


# --- stage results (node -> broker) ---------------------------------------------------------


@dataclass(kw_only=True)
class StageResult(Message):
    """A stage job's result; it also carries the node's counters, as a Heartbeat does."""

    job_id: str
    stats: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class Embeddings(StageResult):
    KIND: ClassVar[str] = "embeddings"
    # The pipeline's embedding arguments, batch of one, e.g. {"prompt_embeds": (1, 77, 768)}
    # for SD 1.x, {"prompt_embeds": (1, 512, 4096), "pooled_prompt_embeds": (1, 768)} for FLUX.1.
    embeds: dict[str, Tensor]


@dataclass(kw_only=True)
class DenoisedLatents(StageResult):
    KIND: ClassVar[str] = "latents"
    # Every image of the request: (num_images, C, h, w) for most families; packed families send
    # their pipeline's own layout, e.g. (num_images, h/2 * w/2, 4C) for FLUX.1.
    latents: Tensor
    params: ResolvedParams
    warnings: list[str] = field(default_factory=list)  # options the pipeline will ignore, and why


@dataclass(kw_only=True)
class EncodedImages(StageResult):
    KIND: ClassVar[str] = "encoded_images"
    inputs: ImageInputs


@dataclass(kw_only=True)
class DecodedImage(StageResult):
    KIND: ClassVar[str] = "decoded"
    png: bytes  # the image, with its parameters in PNG text chunks


# --- stage jobs (broker -> node) ------------------------------------------------------------


@dataclass(kw_only=True)
class StageJob(Message):
    """One stage's work for one request, held by the broker until its result arrives."""

    STAGE: ClassVar[str] = ""
    SERVICE: ClassVar[str] = ""
    RESULT: ClassVar[type[StageResult]] = StageResult  # what the node answers with
    job_id: str
    request_id: str


@dataclass(kw_only=True)
class EncodeJob(StageJob):
    KIND: ClassVar[str] = "encode_job"
    STAGE: ClassVar[str] = ENCODE
    SERVICE: ClassVar[str] = ENCODER
    RESULT: ClassVar[type[StageResult]] = Embeddings
    request: RequestSpec
    # The request's image files, for text encoders that read them (Qwen-Image-Edit's Qwen2.5-VL); decoded
    # only by a family that does, with a pixel bound. Empty for text to image and for inpainting.
    images: list[bytes] = field(default_factory=list)


@dataclass(kw_only=True)
class DenoiseJob(StageJob):
    KIND: ClassVar[str] = "denoise_job"
    STAGE: ClassVar[str] = DENOISE
    SERVICE: ClassVar[str] = DENOISER
    RESULT: ClassVar[type[StageResult]] = DenoisedLatents
    request: RequestSpec
    embeds: dict[str, Tensor]  # the encoder's Embeddings.embeds, batch of one
    images: ImageInputs | None = None  # images in, encoded by the decoder node (EncodedImages.inputs)


@dataclass(kw_only=True)
class DecodeJob(StageJob):
    KIND: ClassVar[str] = "decode_job"
    STAGE: ClassVar[str] = DECODE
    SERVICE: ClassVar[str] = DECODER
    RESULT: ClassVar[type[StageResult]] = DecodedImage
    params: ResolvedParams
    index: int  # which image of the request: its seed is params.seed + index
    latents: Tensor  # that image's row of DenoisedLatents.latents, e.g. (1, 4, 64, 64)


@dataclass(kw_only=True)
class EncodeImagesJob(StageJob):
    KIND: ClassVar[str] = "encode_images_job"
    STAGE: ClassVar[str] = ENCODE_IMAGE
    SERVICE: ClassVar[str] = DECODER
    RESULT: ClassVar[type[StageResult]] = EncodedImages
    request: RequestSpec
    images: list[bytes]  # the image files as the client sent them: decoded only here, with a pixel bound
    mask: bytes | None = None
    mask_alpha: bool = False  # repaint where the mask is fully transparent (else where it is white)


# --- broker -> node -----------------------------------------------------------------------


@dataclass(kw_only=True)
class JobCancel(Message):
    """Stop working on a job: its request was cancelled or failed elsewhere."""

    KIND: ClassVar[str] = "job_cancel"
    job_id: str


@dataclass(kw_only=True)
class Reconnect(Message):
    """The broker does not know this worker (it restarted, or declared it dead): re-register."""

    KIND: ClassVar[str] = "reconnect"


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (
        GenerateRequest,
        CancelRequest,
        StatusRequest,
        RequestAccepted,
        ProgressEvent,
        ImageResult,
        RequestFailed,
        StatusReply,
        WorkerReady,
        Heartbeat,
        WorkerGoodbye,
        JobProgress,
        JobFailed,
        Embeddings,
        DenoisedLatents,
        DecodedImage,
        EncodedImages,
        EncodeJob,
        EncodeImagesJob,
        DenoiseJob,
        DecodeJob,
        JobCancel,
        Reconnect,
    )
}


# --- checking decoded fields ----------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _HINTS[cls]


class _Mismatch(Exception):
    def __init__(self, where: str, got: Any) -> None:
        super().__init__(where)
        self.where, self.got = where, got


def _check(annotation: Any, value: Any, where: str) -> Any:
    """``value`` as a field typed ``annotation`` holds it (nested dataclasses built); raises _Mismatch."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        deepest: _Mismatch | None = None
        for arg in typing.get_args(annotation):
            try:
                return _check(arg, value, where)
            except _Mismatch as exc:
                if exc.where != where:  # the value had this arm's shape: name the field inside it
                    deepest = exc
        raise deepest or _Mismatch(where, value)
    if annotation is Tensor:
        if is_tensor(value):
            return value
        raise _Mismatch(where, value)
    if is_tensor(value):  # a tensor anywhere else is refused: it is no plain value
        raise _Mismatch(where, value)
    if annotation is type(None):
        ok = value is None
    elif annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise _Mismatch(where, value)
        return _build(annotation, value, where)
    elif origin is dict and typing.get_args(annotation):
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise _Mismatch(where, value)
        return {_check(key_type, k, f"{where} key"): _check(value_type, v, f"{where}[{k!r}]") for k, v in value.items()}
    elif origin is list and typing.get_args(annotation):
        if not isinstance(value, list):
            raise _Mismatch(where, value)
        (item_type,) = typing.get_args(annotation)
        return [_check(item_type, item, f"{where}[{i}]") for i, item in enumerate(value)]
    else:
        ok = isinstance(value, origin or annotation)
        if ok and isinstance(value, dict | list):
            _refuse_tensors(value, where)
    if not ok:
        raise _Mismatch(where, value)
    return value


def _refuse_tensors(value: Any, where: str) -> None:
    """An untyped map or list (status, counters) holds plain values only."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif is_tensor(item):
            raise _Mismatch(where, item)


def _build(cls: type, body: dict, where: str) -> Any:
    hints = _hints(cls)
    unknown = set(body) - set(hints)
    if unknown:
        raise ProtocolError(f"{where}: unknown field(s) {sorted(unknown, key=str)}")  # keys: str or bytes
    values = {name: _check(hints[name], value, f"{where}.{name}") for name, value in body.items()}
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise ProtocolError(f"{where}: {exc}") from exc


def _plain(value: Any) -> Any:
    """A message's fields as msgpack takes them: nested dataclasses as maps, tensors as they are."""
    if is_tensor(value):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def to_frames(message: Message) -> list[bytes | memoryview]:
    body = {f.name: _plain(getattr(message, f.name)) for f in dataclasses.fields(message)}
    return codec.encode({"v": PROTOCOL_VERSION, "kind": message.KIND, **body})


def job_of(frames: list[Any]) -> tuple[type[Message], str] | None:
    """The kind and job id of a stage job or result that failed its checks, when those two can be read.

    Lets the receiver answer for that job (fail it) instead of leaving it to time out, even when what
    failed was one of its tensors (they are not built here).
    """
    if not frames:
        return None
    try:
        body = codec.peek(frames[0])
    except codec.CodecError:
        return None
    if not isinstance(body, dict):
        return None
    cls, job_id = MESSAGE_TYPES.get(body.get("kind")), body.get("job_id")  # type: ignore[arg-type]
    if cls is None or not issubclass(cls, StageJob | StageResult):
        return None
    return (cls, job_id) if isinstance(job_id, str) and 0 < len(job_id) <= 128 else None


def from_frames(frames: list[Any], *, torch_tensors: bool = False) -> Message:
    """Decode and type-check one message; raises ProtocolError (or CodecError) when malformed.

    Tensor fields hold WireTensors, or torch tensors with ``torch_tensors`` (the nodes).
    """
    body = codec.decode(frames, torch_tensors=torch_tensors)
    if not isinstance(body, dict):
        raise ProtocolError("message is not a map")
    version = body.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r} (this side speaks {PROTOCOL_VERSION})")
    kind = body.pop("kind", None)
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    try:
        return _build(cls, body, kind)
    except _Mismatch as exc:
        raise ProtocolError(
            f"{kind}: field {exc.where.removeprefix(kind + '.')!r} has the wrong type ({type(exc.got).__name__})"
        ) from None
