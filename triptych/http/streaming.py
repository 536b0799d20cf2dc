"""Server-sent events for one generation: OpenAI's image stream, and the page's progress stream.

Both run the same blocking client call as the plain route, on a worker thread, with its progress
callback and image callback feeding an in-memory stream that the event loop turns into SSE frames:

- ``stream: true`` on ``/v1/images/generations`` answers OpenAI's events: up to ``partial_images``
  ``image_generation.partial_image`` events per image (the denoiser's previews, spread over the
  steps) and one ``image_generation.completed`` per image, in image order. The status line and
  headers wait for the first event, so a request that fails before any (a bad option, an unknown
  model) gets the same status and error body as without streaming; a later failure is an
  ``error`` event in OpenAI's error shape, which the SDKs raise.
- ``/v1/images/generations/events`` answers every event as it happens, for the page: ``queued``,
  ``progress`` (stage, node, step, total and the previews), ``image``, then ``done`` or ``error``.

The HTTP client hanging up cancels the call, and with it the broker's work, as for plain requests.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread

from protocol.messages import ProgressEvent
from triptych.client import GeneratedImage
from triptych.http.errors import ApiError, error_from_failure
from triptych.http.params import GenerationParams

if TYPE_CHECKING:
    from triptych.http.app import Gateway

logger = logging.getLogger(__name__)

KEEPALIVE_S = 15.0  # a comment line this often on a quiet stream, so proxies keep it open
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: pass events on as they come
]

Event = tuple[str, dict]  # (event name, JSON data)


def sse(name: str, data: dict) -> bytes:
    """One server-sent event: its name and one line of JSON."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def _error_body(exc: Exception) -> dict:
    error = exc if isinstance(exc, ApiError) else error_from_failure(exc)
    return {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}


class Events:
    """Turns what a generate call reports into named events; one instance per stream."""

    immediate = False  # send the headers at once, rather than with the first event

    def start(self) -> list[Event]:
        return []

    def progress(self, event: ProgressEvent) -> list[Event]:
        return []

    def image(self, image: GeneratedImage) -> list[Event]:
        return []

    def end(self) -> list[Event]:
        return []

    def error(self, exc: Exception) -> list[Event]:
        return [("error", {"type": "error", "error": _error_body(exc)})]


@dataclass
class OpenAIEvents(Events):
    """OpenAI's ``image_generation.*`` events; partial images are previews nearest an even spread of steps."""

    partial_images: int
    n: int
    size: str  # as asked ("WIDTHxHEIGHT" or "auto"), for the partial images
    shown: list[int] = field(default_factory=list)  # partial images sent, per image
    waiting: dict[int, GeneratedImage] = field(default_factory=dict)  # finished, behind a lower index
    next_index: int = 0

    def __post_init__(self) -> None:
        self.shown = [0] * self.n

    def _common(self, size: str) -> dict:
        return {
            "created_at": int(time.time()),
            "size": size,
            "quality": "auto",
            "background": "opaque",
            "output_format": "png",
        }

    def progress(self, event: ProgressEvent) -> list[Event]:
        events = []
        for index, png in enumerate(event.previews[: self.n]):
            count = self.shown[index]
            # The k-th partial image is the first preview at or past k / (N + 1) of the steps.
            if count >= self.partial_images or event.step < (count + 1) * event.total / (self.partial_images + 1):
                continue
            self.shown[index] += 1
            data = {"type": "image_generation.partial_image", "b64_json": _b64(png), "partial_image_index": count}
            events.append(("image_generation.partial_image", data | self._common(self.size)))
        return events

    def image(self, image: GeneratedImage) -> list[Event]:
        self.waiting[image.index] = image
        events = []
        while self.next_index in self.waiting:
            done = self.waiting.pop(self.next_index)
            self.next_index += 1
            size = f"{done.params.get('width')}x{done.params.get('height')}" if done.params else self.size
            usage = {
                "input_tokens": 0,
                "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                "output_tokens": 0,
                "total_tokens": 0,
            }
            data = {"type": "image_generation.completed", "b64_json": _b64(done.png), "usage": usage}
            events.append(("image_generation.completed", data | self._common(size)))
        return events


@dataclass
class ProgressEvents(Events):
    """Every event of the request, for the page."""

    immediate = True
    images: int = 0

    def start(self) -> list[Event]:
        return [("queued", {"type": "queued"})]

    def progress(self, event: ProgressEvent) -> list[Event]:
        data = {
            "type": "progress",
            "stage": event.stage,
            "service": event.service,
            "node": event.node,
            "step": event.step,
            "total": event.total,
            "previews": [_b64(png) for png in event.previews],
        }
        return [("progress", data)]

    def image(self, image: GeneratedImage) -> list[Event]:
        self.images += 1
        data = {
            "type": "image",
            "index": image.index,
            "seed": image.seed,
            "b64_json": _b64(image.png),
            "params": image.params,
            "warnings": image.warnings,
        }
        return [("image", data)]

    def end(self) -> list[Event]:
        return [("done", {"type": "done", "images": self.images})]


_DONE = object()
_PING = object()


@dataclass
class _Failed:
    error: Exception


Run = Callable[[Callable[[Any], None], threading.Event], Any]  # (emit, cancel) -> anything; blocking


class EventStream:
    """An ASGI response: ``run`` on a worker thread (through ``call``), its reports sent as events."""

    def __init__(self, call: Callable[[Callable[[], Any]], Any], run: Run, events: Events) -> None:
        self.call = call  # runs a blocking function off the event loop, within the gateway's cap
        self.run = run
        self.events = events

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        items_in, items_out = anyio.create_memory_object_stream[Any](math.inf)
        cancel = threading.Event()
        started = False

        def emit(item: Any) -> None:  # on the worker thread
            anyio.from_thread.run_sync(items_in.send_nowait, item)

        def work() -> Exception | None:
            try:
                self.run(emit, cancel)
            except Exception as exc:  # reported as an event: out of a task group it would come wrapped
                return exc
            return None

        async def produce() -> None:
            with items_in:
                error = await self.call(work)
                items_in.send_nowait(_DONE if error is None else _Failed(error))

        async def keepalive() -> None:
            with contextlib.suppress(anyio.ClosedResourceError):  # the call is over
                while True:
                    await anyio.sleep(KEEPALIVE_S)
                    items_in.send_nowait(_PING)

        async def watch() -> None:
            with contextlib.suppress(Exception):  # a server that can no longer tell: as good as gone
                while (await receive())["type"] != "http.disconnect":
                    pass
            cancel.set()  # the client left: stop the broker's work
            tasks.cancel_scope.cancel()

        async def write(events: list[Event]) -> None:
            nonlocal started
            if not events:
                return
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
                started = True
            body = b"".join(sse(name, data) for name, data in events)
            await send({"type": "http.response.body", "body": body, "more_body": True})

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(produce)
            tasks.start_soon(watch)
            tasks.start_soon(keepalive)
            try:
                if self.events.immediate:
                    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
                    started = True
                await write(self.events.start())
                async for item in items_out:
                    if item is _PING:
                        if started:
                            await send({"type": "http.response.body", "body": b": keepalive\n\n", "more_body": True})
                    elif isinstance(item, _Failed):
                        if not started:  # nothing sent yet: the error gets its own status, as without streaming
                            error = item.error if isinstance(item.error, ApiError) else error_from_failure(item.error)
                            await error.response()(scope, receive, send)
                            return
                        await write(self.events.error(item.error))
                        break
                    elif item is _DONE:
                        await write(self.events.end())
                        break
                    elif isinstance(item, ProgressEvent):
                        await write(self.events.progress(item))
                    elif isinstance(item, GeneratedImage):
                        await write(self.events.image(item))
                if not started:
                    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                cancel.set()
                tasks.cancel_scope.cancel()


def _stream_call(gateway: Gateway, params: GenerationParams, user: str, preview_every: int | None) -> Run:
    def run(emit: Callable[[Any], None], cancel: threading.Event) -> Any:
        return gateway.run_generation(
            params, user, cancel, preview_every=preview_every, on_progress=emit, on_image=emit
        )

    return run


def openai_stream(gateway: Gateway, params: GenerationParams, user: str) -> EventStream:
    """OpenAI's image generation stream for a checked request."""
    wanted = params.partial_images
    if wanted == 0:
        every: int | None = 0
    elif params.steps is not None:  # previews often enough that each partial image has one near its step
        every = max(1, params.steps // (wanted + 1))
    else:
        every = None  # a quarter of the model's default steps: three previews to choose from
    size = f"{params.width}x{params.height}" if params.width else "auto"
    events = OpenAIEvents(partial_images=wanted, n=params.n, size=size)
    return EventStream(gateway.caller(user), _stream_call(gateway, params, user, every), events)


def progress_stream(gateway: Gateway, params: GenerationParams, user: str) -> EventStream:
    """Every progress event, preview and image of a checked request, for the page."""
    return EventStream(
        gateway.caller(user), _stream_call(gateway, params, user, params.preview_every), ProgressEvents()
    )
