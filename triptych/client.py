"""The Python client: send prompts to a broker, get PNGs back.

from triptych import Client
with Client("tcp://gpu-box:5555") as client:
    for image in client.generate("a red fox in snow", num_images=2, seed=7):
        image.save(f"fox-{image.seed}.png")
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from protocol import errors, messages
from protocol.codec import CodecError
from protocol.messages import (
    CancelRequest,
    GenerateRequest,
    ImageResult,
    ProgressEvent,
    RequestFailed,
    StatusReply,
    StatusRequest,
)
from protocol.security import Curve
from protocol.sockets import connect_dealer
from triptych.flags import DEFAULT_BROKER

logger = logging.getLogger(__name__)

BROKER_UNAVAILABLE = "broker_unavailable"  # the client's own code: no answer from the broker at all
RESEND_INTERVAL = 3.0  # seconds of silence about a request before it is sent again
CANCEL_POLL = 0.1  # seconds between looks at a generate call's cancel event


class GenerationError(RuntimeError):
    """A request failed; the message names the cause, ``code`` says what kind of failure it is.

    ``code`` is one of :data:`protocol.errors.CODES` (or ``broker_unavailable``), ``field`` the
    request option at fault (``"height"``, ``"true_cfg"``...) where there is one.
    """

    def __init__(
        self, message: str, retryable: bool = False, code: str = errors.MODEL_ERROR, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.code = code
        self.field = field


class GenerationCancelled(GenerationError):
    """The caller set the ``cancel`` event of a generate call; the broker was told to stop."""

    def __init__(self, message: str = "cancelled") -> None:
        super().__init__(message, code=errors.CANCELLED)


@dataclass
class GeneratedImage:
    index: int  # position within the request
    seed: int  # the seed this image was made with (request seed + index)
    png: bytes
    params: dict = field(default_factory=dict)  # resolved steps, guidance, true_cfg, size, model...
    warnings: list[str] = field(default_factory=list)  # options the pipeline ignored, and why

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.png)
        return path


ImageIn = bytes | str | Path | Any  # an image file's bytes, its path, or a PIL image


def _as_list(image: ImageIn | list[ImageIn] | None) -> list[ImageIn]:
    if image is None:
        return []
    return list(image) if isinstance(image, list | tuple) else [image]


def image_bytes(image: ImageIn, field: str) -> bytes:
    """An image as file bytes to send: bytes as they are, a path read, a PIL image saved as PNG.

    The client does not decode images (the node that encodes them does, with a pixel bound).
    """
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | Path):
        try:
            return Path(image).read_bytes()
        except OSError as exc:
            message = f"{field}: cannot read {image}: {exc}"
            raise GenerationError(message, code=errors.INVALID_REQUEST, field=field) from None
    if hasattr(image, "save"):  # a PIL image; PIL itself is not imported here
        import io

        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise GenerationError(
        f"{field}: expected image bytes, a path or a PIL image (got {type(image).__name__})",
        code=errors.INVALID_REQUEST,
        field=field,
    )


def lora_weights(loras: Mapping[str, float] | None) -> dict[str, float]:
    """``loras`` as the request carries them: adapter names to float weights, in the caller's order.

    Only types are checked here; the broker bounds the names and weights, and the nodes know which
    adapters they have.
    """
    if loras is None:
        return {}
    if not isinstance(loras, Mapping):
        message = f"loras: expected a mapping of adapter name to weight (got {type(loras).__name__})"
        raise GenerationError(message, code=errors.INVALID_REQUEST, field="loras")
    weights = {}
    for name, weight in loras.items():
        if not isinstance(name, str) or isinstance(weight, bool) or not isinstance(weight, int | float):
            message = f"loras: each adapter is a name with a number as its weight (got {name!r}: {weight!r})"
            raise GenerationError(message, code=errors.INVALID_REQUEST, field="loras")
        weights[name] = float(weight)
    return weights


class Client:
    def __init__(
        self,
        broker: str = DEFAULT_BROKER,
        *,
        timeout: float = 300.0,
        curve: Curve | None = None,
        ctx: zmq.Context | None = None,
    ):
        self.broker = broker
        self.timeout = timeout
        self.curve = curve
        self._ctx = ctx or zmq.Context.instance()
        self._socket = connect_dealer(self._ctx, broker, curve=curve)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._socket.close(linger=0)

    def generate(
        self,
        prompt: str,
        *,
        model: str = "",
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        true_cfg: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        num_images: int = 1,
        scheduler: str | None = None,
        loras: Mapping[str, float] | None = None,
        step_cache: str | None = None,
        image: ImageIn | list[ImageIn] | None = None,
        mask: ImageIn | None = None,
        mask_alpha: bool = False,
        strength: float | None = None,
        preview_every: int | None = None,
        timeout: float | None = None,
        on_progress: Callable[[ProgressEvent], None] | None = None,
        on_image: Callable[[GeneratedImage], None] | None = None,
        cancel: threading.Event | None = None,
        user: str = "",
    ) -> list[GeneratedImage]:
        """Generate ``num_images`` images; image i uses ``seed + i``. Unset options: model defaults.

        Each option is the pipeline argument of its name: ``guidance`` is ``guidance_scale``,
        ``true_cfg`` is ``true_cfg_scale`` (only pipelines that have one take it); ``scheduler`` is
        a sampler name (``euler_a``, ``dpmpp_2m_karras``, ``flow_euler``...), unset: the checkpoint's.
        ``loras`` maps LoRA adapter names (files of the nodes' ``--lora-dir``) to weights, e.g.
        ``{"ink": 0.8}``; their outputs add up in the order given. ``step_cache`` is the denoiser's
        step cache for this request: ``"off"`` or ``KIND[:VALUE]`` (``"first_block:0.1"``), unset: the
        node's ``--step-cache``.

        Images in: ``image`` (PNG/JPEG/WebP bytes, a path or a PIL image, or a list of them for
        models that take several) makes it img2img; with ``mask`` (white repaints, black keeps, as in
        diffusers) inpainting; ``mask_alpha`` reads the mask as OpenAI does instead (its fully
        transparent pixels mark what to repaint). ``strength`` is the pipeline's (unset: its default).

        ``user`` names whom the request is for (a gateway serving many people): the broker's
        queues take turns between users, and between clients that name none.

        Setting ``cancel`` (from any thread) makes the call raise :class:`GenerationCancelled`
        within a tenth of a second, and the broker drops the request's work.

        ``on_progress`` gets every :class:`ProgressEvent`; every ``preview_every`` denoising steps
        (unset: each quarter of them; 0: never) its ``previews`` hold a small PNG per image, a
        latent-space approximation. ``on_image`` gets each image as it arrives, in any order.
        """
        request = GenerateRequest(
            request_id=uuid.uuid4().hex,
            model=model,
            prompt=prompt,
            negative_prompt=negative_prompt,
            steps=steps,
            guidance=guidance,
            true_cfg=true_cfg,
            height=height,
            width=width,
            seed=secrets.randbelow(2**32) if seed is None else seed,
            num_images=num_images,
            scheduler=scheduler,
            loras=lora_weights(loras),
            step_cache=step_cache,
            images=[image_bytes(item, "image") for item in _as_list(image)],
            mask=None if mask is None else image_bytes(mask, "mask"),
            mask_alpha=mask_alpha,
            strength=strength,
            preview_every=preview_every,
            timeout=self.timeout if timeout is None else timeout,
            user=user,
        )
        try:
            return self._run(request, on_progress, cancel, on_image)
        except BaseException:
            self._send(CancelRequest(request_id=request.request_id))  # Ctrl-C, or anything else
            raise

    def _run(
        self,
        request: GenerateRequest,
        on_progress: Callable | None,
        cancel: threading.Event | None,
        on_image: Callable[[GeneratedImage], None] | None = None,
    ) -> list[GeneratedImage]:
        images: dict[int, GeneratedImage] = {}
        start = time.monotonic()
        deadline = start + request.timeout + 5.0  # the broker's own timeout message comes first
        heard = False  # anything at all from the broker about this request
        next_send = 0.0
        while len(images) < request.num_images:
            now = time.monotonic()
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled("cancelled")
            if not heard and now > start + request.timeout:
                raise GenerationError(self._silence(), code=BROKER_UNAVAILABLE)
            if now > deadline:
                raise GenerationError(f"timed out after {request.timeout:g}s", code=errors.TIMEOUT)
            if now >= next_send:
                # Sent again whenever the broker has been quiet about it: a restarted broker then
                # picks it up under the same id, and a live one only acknowledges it (it dedupes).
                self._send(request)
                next_send = now + RESEND_INTERVAL
            wait = min(deadline, next_send) - now
            msg = self._receive(max(min(wait, CANCEL_POLL) if cancel is not None else wait, 0.0))
            if msg is None or getattr(msg, "request_id", None) != request.request_id:
                continue
            heard = True
            next_send = time.monotonic() + RESEND_INTERVAL
            match msg:
                case ImageResult() if msg.index not in images and 0 <= msg.index < request.num_images:
                    params = dataclasses.asdict(msg.params)
                    image = GeneratedImage(msg.index, msg.seed, msg.png, params=params, warnings=msg.warnings)
                    images[msg.index] = image
                    if on_image is not None:
                        on_image(image)
                case RequestFailed():
                    raise GenerationError(msg.error, retryable=msg.retryable, code=msg.code, field=msg.field)
                case ProgressEvent() if on_progress is not None:
                    on_progress(msg)
        return [images[i] for i in range(request.num_images)]

    def generate_stream(self, prompt: str, **options: Any) -> Iterator[ProgressEvent | GeneratedImage]:
        """:meth:`generate` as an iterator: each :class:`ProgressEvent` (with its previews) and each
        :class:`GeneratedImage` as it arrives. Takes generate's options but the callbacks.

        The request runs on a thread of its own, which alone uses this client until it ends; a
        failure is raised here. Leaving the loop early cancels the request.
        """
        events: queue.Queue[Any] = queue.Queue()
        done = object()
        cancel = options.pop("cancel", None) or threading.Event()

        def run() -> None:
            try:
                self.generate(prompt, **options, on_progress=events.put, on_image=events.put, cancel=cancel)
            except BaseException as exc:  # raised in the caller's thread
                events.put(exc)
            finally:
                events.put(done)

        thread = threading.Thread(target=run, name="generate-stream", daemon=True)
        thread.start()
        try:
            while (item := events.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if thread.is_alive():
                cancel.set()
                thread.join()

    def _silence(self) -> str:
        if self.curve is not None:
            return f"the broker at {self.broker} did not answer: authentication failed or the broker is down"
        return f"the broker at {self.broker} did not answer: is it running (and does it require CURVE keys)?"

    def status(self, timeout: float = 5.0) -> StatusReply:
        """Nodes, queues and requests in flight, as the broker sees them."""
        request_id = uuid.uuid4().hex
        self._send(StatusRequest(request_id=request_id))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self._receive(left)
            if isinstance(msg, StatusReply) and msg.request_id == request_id:
                return msg
        raise GenerationError(self._silence(), code=BROKER_UNAVAILABLE)

    def _send(self, msg: messages.Message) -> None:
        try:
            self._socket.send_multipart(messages.to_frames(msg), copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            logger.debug("send queue full; %s not sent", msg.KIND)

    def _receive(self, timeout: float) -> messages.Message | None:
        if not self._socket.poll(int(timeout * 1000)):
            return None
        frames = self._socket.recv_multipart(copy=False)
        try:
            return messages.from_frames(frames)
        except (CodecError, messages.ProtocolError) as exc:
            logger.warning("dropping a malformed message from the broker: %s", exc)
            return None
