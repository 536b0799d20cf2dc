"""An HTTP gateway that speaks OpenAI's images API in front of a broker.

    triptych http --broker tcp://gpu-box:5555 --port 8000

``POST /v1/images/generations`` takes OpenAI's fields (``model``, ``prompt``, ``n``, ``size``,
``response_format``) and triptych's own (``seed``, ``negative_prompt``, ``num_inference_steps``,
``guidance_scale``) in the same JSON body; ``GET /v1/models`` lists the models the broker serves.
Errors come in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. With
``--api-keys FILE``, requests must carry one of the file's keys as ``Authorization: Bearer <key>``.

Every request runs one blocking :class:`~triptych.client.Client` call on a worker thread, with a
client (one zmq socket) of its own taken from a small pool: zmq sockets are not thread-safe. When
the HTTP client goes away, the call's cancel event is set and the broker drops the work.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

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
from triptych.client import Client, GeneratedImage, GenerationCancelled, GenerationError

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a request body is a prompt and a few numbers
MAX_IN_FLIGHT = 64  # generate calls running at once (each holds a thread); more wait their turn
IDLE_CLIENTS = 8  # broker connections kept open between requests
MODELS_TTL = 2.0  # seconds the broker's model list is reused for
STORE_BYTES = 256 << 20  # PNGs kept for response_format=url, newest first
STORE_TTL = 3600.0  # seconds a PNG stays fetchable by its URL
RESPONSE_FORMATS = ("b64_json", "url")
_SIZE = re.compile(r"(\d{1,6})x(\d{1,6})")
_JSON_TYPES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
}


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _invalid(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --- request fields -------------------------------------------------------------------------


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
    guidance: float | None
    user: str  # OpenAI's end-user id ("" = none)


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
        raise _invalid(name, f"{name} must be {_JSON_TYPES[kind]} (got {got})", code="invalid_type")
    return value


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    match = _SIZE.fullmatch(size)
    if match is None:
        raise _invalid("size", f"size must be WIDTHxHEIGHT in pixels, e.g. 512x512, or auto (got {size!r})")
    width, height = int(match[1]), int(match[2])
    if not all(SIZE_MULTIPLE <= side <= MAX_SIDE and side % SIZE_MULTIPLE == 0 for side in (width, height)):
        raise _invalid(
            "size",
            f"size: width and height must be multiples of {SIZE_MULTIPLE} from {SIZE_MULTIPLE} to {MAX_SIDE} (got {size})",
        )
    if width * height > MAX_PIXELS:
        raise _invalid("size", f"size must be at most {MAX_PIXELS} pixels (got {size})")
    return width, height


# The broker's field names, as they start its validation messages, and the names they have here.
_PARAM_OF = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "model": "model",
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "height": "size",
    "width": "size",
    "num_images": "n",
    "seed": "seed",
    "user": "user",
}


def parse_generation(body: Any) -> GenerationParams:
    """Check an images/generations body; raises :class:`ApiError` (400) naming the first bad field."""
    if not isinstance(body, dict):
        raise _invalid(None, "the request body must be a JSON object")
    prompt = _field(body, "prompt", str)
    if prompt is None:
        raise _invalid("prompt", "prompt is required", code="missing_required_parameter")
    n = _field(body, "n", int)
    n = 1 if n is None else n
    if not 1 <= n <= MAX_IMAGES:
        raise _invalid("n", f"n must be between 1 and {MAX_IMAGES} (got {n})")
    width, height = _parse_size(_field(body, "size", str))
    response_format = _field(body, "response_format", str) or "b64_json"
    if response_format not in RESPONSE_FORMATS:
        raise _invalid("response_format", f"response_format must be b64_json or url (got {response_format!r})")
    output_format = _field(body, "output_format", str)
    if output_format not in (None, "png"):
        raise _invalid("output_format", f"output_format must be png (got {output_format!r})")
    seed = _field(body, "seed", int)
    if seed is not None and not 0 <= seed <= MAX_SEED - n:
        raise _invalid("seed", f"seed must be between 0 and {MAX_SEED - n} (got {seed})")
    steps = _field(body, "num_inference_steps", int)
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise _invalid("num_inference_steps", f"num_inference_steps must be between 1 and {MAX_STEPS} (got {steps})")
    guidance = _field(body, "guidance_scale", float)
    if guidance is not None and not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise _invalid("guidance_scale", f"guidance_scale must be between 0 and {MAX_GUIDANCE:g} (got {guidance})")
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
        guidance=float(guidance) if guidance is not None else None,
        user=_field(body, "user", str) or "",
    )
    # The broker's own bounds (prompt length...), so that they too come back naming the field.
    check = GenerateRequest(
        request_id="check",
        model=params.model,
        prompt=prompt,
        negative_prompt=params.negative_prompt,
        steps=steps,
        guidance=params.guidance,
        height=height,
        width=width,
        seed=seed or 0,
        num_images=n,
        user=params.user,
    )
    if (error := request_error(check)) is not None:
        raise _invalid(_PARAM_OF.get(error.split()[0]), error)
    return params


def error_from_broker(exc: GenerationError) -> ApiError:
    """The HTTP status of a failed request: 503 when nothing can serve it now, 504 when it ran too long."""
    message = str(exc)
    if isinstance(exc, GenerationCancelled):
        return ApiError(499, "the client closed the request", code="cancelled")
    if re.match(r"no (\w+ )?node serves", message):
        return ApiError(503, message, code="no_node")
    if exc.retryable or "busy" in message:
        return ApiError(503, message, code="busy")
    if message.startswith("timed out"):
        return ApiError(504, message, code="timeout")
    if "did not answer" in message:
        return ApiError(503, message, code="broker_unavailable")
    if "several models" in message:
        return _invalid("model", message)
    if re.search(r"failed: ValueError: (height|width) must be", message):
        return _invalid("size", message)  # a size this model's family cannot make
    if (param := _PARAM_OF.get(message.split(" ", 1)[0])) is not None and " must be " in message:
        return _invalid(param, message)
    return ApiError(500, message, code="generation_failed")


# --- broker connections and stored images --------------------------------------------------


class ClientPool:
    """Broker clients for worker threads: one per call at a time, a few kept open between calls."""

    def __init__(self, factory: Callable[[], Client], keep: int = IDLE_CLIENTS) -> None:
        self.factory = factory
        self.keep = keep
        self._idle: list[Client] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def client(self) -> Iterator[Client]:
        with self._lock:
            client = self._idle.pop() if self._idle else None
        client = client or self.factory()
        try:
            yield client
        except GenerationError:
            self._release(client)  # the broker answered (or was silent): the socket is fine
            raise
        except BaseException:
            client.close()
            raise
        self._release(client)

    def _release(self, client: Client) -> None:
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(client)
                return
        client.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()


class ImageStore:
    """PNGs fetchable by URL: the newest up to ``max_bytes``, each for at most ``ttl`` seconds.

    Used from the event loop only, so it needs no lock. Ids are unguessable: the URLs are the only key.
    """

    def __init__(self, max_bytes: int = STORE_BYTES, ttl: float = STORE_TTL) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    def put(self, png: bytes) -> str:
        file_id = secrets.token_urlsafe(18)
        self._items[file_id] = (time.monotonic() + self.ttl, png)
        self._bytes += len(png)
        self._evict()
        return file_id

    def get(self, file_id: str) -> bytes | None:
        self._evict()
        item = self._items.get(file_id)
        return item[1] if item is not None else None

    def _evict(self) -> None:
        now = time.monotonic()
        while self._items:
            file_id, (expires, png) = next(iter(self._items.items()))
            if self._bytes <= self.max_bytes and expires > now:
                break
            del self._items[file_id]
            self._bytes -= len(png)


# --- the app --------------------------------------------------------------------------------


class Gateway:
    def __init__(
        self, pool: ClientPool, *, store: ImageStore | None = None, max_in_flight: int = MAX_IN_FLIGHT
    ) -> None:
        self.pool = pool
        self.store = store or ImageStore()
        self.max_in_flight = max_in_flight
        self.started = int(time.time())
        self.limiter: anyio.CapacityLimiter | None = None  # made in the event loop, at startup
        self._models: list[str] = []
        self._models_at = -math.inf

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.limiter = anyio.CapacityLimiter(self.max_in_flight)
        try:
            yield
        finally:
            self.pool.close()

    async def _call(self, fn: Callable[[], Any]) -> Any:
        return await anyio.to_thread.run_sync(fn, limiter=self.limiter)

    async def served_models(self, fresh: bool = False) -> list[str]:
        """The models of the broker's registered nodes, asked again after MODELS_TTL or when ``fresh``."""
        if fresh or time.monotonic() - self._models_at > MODELS_TTL:

            def ask() -> list[str]:
                with self.pool.client() as client:
                    return sorted({node["model"] for node in client.status().nodes})

            try:
                self._models = await self._call(ask)
            except GenerationError as exc:
                raise error_from_broker(exc) from exc
            self._models_at = time.monotonic()
        return self._models

    def _model_card(self, model: str) -> dict:
        return {"id": model, "object": "model", "created": self.started, "owned_by": "triptych"}

    async def list_models(self, request: Request) -> JSONResponse:
        models = await self.served_models(fresh=True)
        return JSONResponse({"object": "list", "data": [self._model_card(m) for m in models]})

    async def get_model(self, request: Request) -> JSONResponse:
        model = request.path_params["model"]
        if model not in await self.served_models(fresh=True):
            raise ApiError(404, f"the model {model!r} does not exist", param="model", code="model_not_found")
        return JSONResponse(self._model_card(model))

    async def generate(self, request: Request) -> JSONResponse:
        params = parse_generation(await _read_json(request))
        params.model = await self._resolve_model(params.model)
        # The broker's queues take turns per user: per API key, and OpenAI's "user" within it
        # (hashed: a short, fixed length, and no end-user ids in the broker's state).
        tenant = getattr(request.state, "api_key", "http")
        user = f"{tenant}/{hashlib.sha256(params.user.encode()).hexdigest()[:16]}" if params.user else tenant
        cancel = threading.Event()

        def run() -> list[GeneratedImage]:
            with self.pool.client() as client:
                return client.generate(
                    params.prompt,
                    model=params.model,
                    negative_prompt=params.negative_prompt,
                    steps=params.steps,
                    guidance=params.guidance,
                    height=params.height,
                    width=params.width,
                    seed=params.seed,
                    num_images=params.n,
                    cancel=cancel,
                    user=user,
                )

        try:
            images = await self._run_until_disconnect(request, run, cancel)
        except GenerationError as exc:
            raise error_from_broker(exc) from exc
        if params.response_format == "url":
            data = [{"url": str(request.url_for("file", file_id=self.store.put(image.png)))} for image in images]
        else:
            data = [{"b64_json": base64.b64encode(image.png).decode("ascii")} for image in images]
        return JSONResponse({"created": int(time.time()), "data": data})

    async def _resolve_model(self, model: str) -> str:
        """The model to ask the broker for: a served one, or the only one when none is named."""
        models = await self.served_models()
        if model in models:
            return model
        models = await self.served_models(fresh=True)  # a node may have just registered
        if model:
            if model not in models:
                served = ", ".join(models) or "none yet"
                raise ApiError(
                    404,
                    f"the model {model!r} is not served here (served: {served})",
                    param="model",
                    code="model_not_found",
                )
            return model
        if not models:
            raise ApiError(503, "no node serves any model yet", code="no_node")
        if len(models) > 1:
            raise _invalid("model", f"model is required: this broker serves several models ({', '.join(models)})")
        return models[0]

    async def _run_until_disconnect(self, request: Request, fn: Callable[[], Any], cancel: threading.Event) -> Any:
        """Run ``fn`` on a worker thread; the HTTP client leaving (or shutdown) sets ``cancel``."""

        async def watch() -> None:
            try:
                with contextlib.suppress(Exception):  # a server that can no longer tell: as good as gone
                    while (await request.receive())["type"] != "http.disconnect":
                        pass
            finally:  # disconnected, or the request is done or being torn down
                cancel.set()

        def call() -> tuple[Any, Exception | None]:
            try:
                return fn(), None
            except Exception as exc:  # raised below: out of a task group it would come wrapped in a group
                return None, exc

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch)
            try:
                result, error = await self._call(call)
            finally:
                tasks.cancel_scope.cancel()
        if error is not None:
            raise error
        return result

    async def get_file(self, request: Request) -> Response:
        png = self.store.get(request.path_params["file_id"])
        if png is None:
            raise ApiError(404, "no such file (they are kept for a limited time)", code="file_not_found")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


async def _read_json(request: Request) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body must be at most {MAX_BODY_BYTES} bytes", code="body_too_large")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise _invalid(None, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).response()


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    logger.error("error serving %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, "internal error in the gateway", code="internal_error").response()


# --- API keys -------------------------------------------------------------------------------


def read_api_keys(path: str | Path) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped. Raises ValueError if none."""
    lines = Path(path).read_text().splitlines()
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"{path} holds no API key")
    return keys


class RequireApiKey:
    """ASGI middleware: every /v1 route but the image files wants ``Authorization: Bearer <key>``.

    Image URLs stay open, as OpenAI's do: their ids are unguessable and expire, so a URL can be
    handed to a browser. Keys are compared in constant time.
    """

    def __init__(self, app: Any, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/v1/files/"):
            found = self._key_index(dict(scope["headers"]).get(b"authorization", b""))
            if isinstance(found, ApiError):
                await found.response()(scope, receive, send)
                return
            scope.setdefault("state", {})["api_key"] = f"key{found + 1}"  # which key, never the key
        await self.app(scope, receive, send)

    def _key_index(self, header: bytes) -> int | ApiError:
        scheme, _, key = header.partition(b" ")
        if scheme.lower() != b"bearer" or not key.strip():
            message = "no API key: send it as 'Authorization: Bearer <key>'"
            return ApiError(401, message, code="invalid_api_key", kind="invalid_request_error")
        matches = [hmac.compare_digest(key.strip(), known) for known in self.keys]  # every key compared
        if not any(matches):
            return ApiError(401, "incorrect API key", code="invalid_api_key", kind="invalid_request_error")
        return matches.index(True)


def create_app(
    broker: str,
    *,
    timeout: float = 300.0,
    client_factory: Callable[[], Client] | None = None,
    max_in_flight: int = MAX_IN_FLIGHT,
    store: ImageStore | None = None,
    api_keys: Sequence[str] | None = None,
) -> Starlette:
    """The gateway app. Broker connections come from ``client_factory`` (default: a plain
    ``Client(broker, timeout=timeout)``), so CURVE keys and other options stay the caller's business.
    With ``api_keys``, requests must carry one of them (see :class:`RequireApiKey`)."""
    factory = client_factory or (lambda: Client(broker, timeout=timeout))
    gateway = Gateway(ClientPool(factory), store=store, max_in_flight=max_in_flight)
    routes = [
        Route("/v1/models", gateway.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", gateway.get_model, methods=["GET"]),
        Route("/v1/images/generations", gateway.generate, methods=["POST"]),
        Route("/v1/files/{file_id}.png", gateway.get_file, methods=["GET"], name="file"),
    ]
    handlers = {ApiError: _on_api_error, HTTPException: _on_http_error, Exception: _on_unexpected}
    middleware = [Middleware(RequireApiKey, keys=list(api_keys))] if api_keys else []
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=gateway.lifespan, middleware=middleware)
    app.state.gateway = gateway
    return app


def serve(args: argparse.Namespace) -> int:
    """``triptych http``: serve the gateway until SIGINT/SIGTERM."""
    import uvicorn

    from protocol.allocator import keep_freed_buffers
    from triptych.node import curve_from_args

    keep_freed_buffers()  # a long-lived receiver of PNGs, like the broker
    curve = curve_from_args(args)
    keys = None
    if args.api_keys is not None:
        try:
            keys = read_api_keys(args.api_keys)
        except (OSError, ValueError) as exc:
            print(f"triptych http: --api-keys: {exc}", file=sys.stderr)
            return 2
    app = create_app(
        args.broker, client_factory=lambda: Client(args.broker, timeout=args.timeout, curve=curve), api_keys=keys
    )
    guarded = f", {len(keys)} API key(s)" if keys else ", no API key needed"
    print(
        f"triptych http: http://{args.host}:{args.port}/v1 -> broker {args.broker}{guarded}",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=5,  # then running calls are cancelled, and the broker told
    )
    return 0
