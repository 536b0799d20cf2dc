"""The gateway's routes: OpenAI's models and images endpoints, each served by one blocking client call
(AUTOMATIC1111's are in ``a1111``, the page's files in ``page``, the event streams in ``streaming``).

A call runs on a worker thread (at most ``max_in_flight`` generation calls at once, admitted in
turns per API key; status and model lists have slots of their own, so they answer while every
generation slot is taken) with a broker connection of its own; when the HTTP client hangs up, the
call's cancel event is set and the broker drops the work. A request body must arrive in time
(:mod:`triptych.http.connections`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocol.messages import StatusReply
from triptych.client import Client, GeneratedImage, GenerationError
from triptych.http import a1111, page
from triptych.http.admission import TakeTurns
from triptych.http.auth import RequireApiKey
from triptych.http.connections import BODY_TIMEOUT, BodyDeadline
from triptych.http.edits import parse_edit
from triptych.http.errors import HANDLERS, ApiError, error_from_failure
from triptych.http.models import ModelCatalog
from triptych.http.params import GenerationParams, parse_generation, read_json
from triptych.http.pool import ClientPool
from triptych.http.store import ImageStore
from triptych.http.streaming import openai_stream, progress_stream
from triptych.status import status_dict

logger = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64  # generate calls running at once (each holds a thread); more wait their turn
LIGHT_CALLS = 8  # status and model-list calls running at once, beside the generate calls


class Gateway:
    """What the routes share: broker connections, the served models, stored PNGs, a cap on calls at once."""

    def __init__(
        self, pool: ClientPool, *, store: ImageStore | None = None, max_in_flight: int = MAX_IN_FLIGHT
    ) -> None:
        self.pool = pool
        self.store = store or ImageStore()
        self.max_in_flight = max_in_flight
        self.started = int(time.time())
        self.turns = TakeTurns(max_in_flight)  # generation calls, in turns per API key
        self.limiter: anyio.CapacityLimiter | None = None  # threads for all calls; made in the event loop
        self.light: anyio.CapacityLimiter | None = None  # status and model-list calls
        self.models = ModelCatalog(pool, self._call)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.limiter = anyio.CapacityLimiter(self.max_in_flight + LIGHT_CALLS)
        self.light = anyio.CapacityLimiter(LIGHT_CALLS)
        try:
            yield
        finally:
            self.pool.close()

    async def _call(self, fn: Callable[[], Any], tenant: str | None = None) -> Any:
        """Run a blocking client call on a worker thread: a generation call for ``tenant`` (an API key)
        when it has its turn, any other call (``tenant`` None) within the light calls' cap."""
        if tenant is None:
            assert self.light is not None
            async with self.light:
                return await anyio.to_thread.run_sync(fn, limiter=self.limiter)
        async with self.turns.turn(tenant):
            return await anyio.to_thread.run_sync(fn, limiter=self.limiter)

    async def call(self, fn: Callable[[], Any], tenant: str | None = None) -> Any:
        """Run a blocking function (a client call) on a worker thread, within the cap on calls at once;
        generation calls name their ``tenant`` and wait for its turn."""
        return await self._call(fn, tenant)

    def caller(self, user: str) -> Callable[[Callable[[], Any]], Any]:
        """What runs generation calls on behalf of ``user`` (from :meth:`user_of`): in its API key's turn."""
        return lambda fn: self._call(fn, tenant=self.tenant_of(user))

    @staticmethod
    def tenant_of(user: str) -> str:
        """The API key part of a user (``key2/<end user>`` -> ``key2``): turns go per key."""
        return user.partition("/")[0]

    def _model_card(self, model: str) -> dict:
        card = {"id": model, "object": "model", "created": self.started, "owned_by": "triptych"}
        offers = {"samplers": self.models.samplers(model), "loras": self.models.loras(model)}
        return card | offers | {"step_caches": self.models.step_caches(model)}

    async def list_models(self, request: Request) -> JSONResponse:
        models = await self.models.served(fresh=True)
        return JSONResponse({"object": "list", "data": [self._model_card(m) for m in models]})

    async def get_model(self, request: Request) -> JSONResponse:
        model = request.path_params["model"]
        if model not in await self.models.served(fresh=True):
            raise ApiError(404, f"the model {model!r} does not exist", param="model", code="model_not_found")
        return JSONResponse(self._model_card(model))

    @staticmethod
    def user_of(request: Request, end_user: str = "") -> str:
        """Whom a request is for: the broker's queues take turns per API key, and per end user within it
        (hashed: a short, fixed length, and no end-user ids in the broker's state)."""
        tenant = getattr(request.state, "api_key", "http")
        return f"{tenant}/{hashlib.sha256(end_user.encode()).hexdigest()[:16]}" if end_user else tenant

    def run_generation(
        self, params: GenerationParams, user: str, cancel: threading.Event, **options: Any
    ) -> list[GeneratedImage]:
        """The blocking client call behind every images route (``options``: callbacks, preview_every)."""
        with self.pool.client() as client:
            return client.generate(
                params.prompt,
                model=params.model,
                negative_prompt=params.negative_prompt,
                steps=params.steps,
                guidance=params.guidance,
                true_cfg=params.true_cfg,
                height=params.height,
                width=params.width,
                seed=params.seed,
                num_images=params.n,
                scheduler=params.scheduler,
                loras=params.loras,
                step_cache=params.step_cache,
                image=params.images or None,
                mask=params.mask,
                mask_alpha=params.mask_alpha,
                strength=params.strength,
                cancel=cancel,
                user=user,
                **options,
            )

    async def generate(self, request: Request) -> Response:
        return await self.respond(request, parse_generation(await read_json(request)))

    async def edit(self, request: Request) -> Response:
        """OpenAI's images/edits: an image (and a mask) in; otherwise as generations."""
        return await self.respond(request, await parse_edit(request))

    async def respond(self, request: Request, params: GenerationParams) -> Response:
        params.model = await self.models.resolve(params.model)
        user = self.user_of(request, params.user)
        if params.stream:
            return openai_stream(self, params, user)
        cancel = threading.Event()

        def run() -> list[GeneratedImage]:
            return self.run_generation(params, user, cancel, preview_every=0)  # nobody sees previews here

        try:
            images = await self._run_until_disconnect(request, run, cancel)
        except GenerationError as exc:
            raise error_from_failure(exc) from exc
        if params.response_format == "url":
            data = [{"url": str(request.url_for("file", file_id=self.store.put(image.png)))} for image in images]
        else:
            data = [{"b64_json": base64.b64encode(image.png).decode("ascii")} for image in images]
        return JSONResponse({"created": int(time.time()), "data": data})

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
                result, error = await self._call(call, tenant=self.tenant_of(self.user_of(request)))
            finally:
                tasks.cancel_scope.cancel()
        if error is not None:
            raise error
        return result

    async def run_until_disconnect(self, request: Request, fn: Callable[[], Any], cancel: threading.Event) -> Any:
        """Run a blocking call on a worker thread until it returns; the HTTP client leaving sets ``cancel``."""
        return await self._run_until_disconnect(request, fn, cancel)

    async def generate_events(self, request: Request) -> Response:
        """The body of images/generations; answers every progress event, preview and image as server-sent events."""
        params = parse_generation(await read_json(request))
        params.model = await self.models.resolve(params.model)
        return progress_stream(self, params, self.user_of(request, params.user))

    async def status(self, request: Request) -> JSONResponse:
        """The broker's nodes (with their mean job times), queues and requests in flight."""

        def ask() -> StatusReply:
            with self.pool.client() as client:
                return client.status()

        try:
            reply = await self._call(ask)
        except GenerationError as exc:
            raise error_from_failure(exc) from exc
        return JSONResponse(status_dict(reply))

    async def get_file(self, request: Request) -> Response:
        png = self.store.get(request.path_params["file_id"])
        if png is None:
            raise ApiError(404, "no such file (they are kept for a limited time)", code="file_not_found")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def create_app(
    broker: str,
    *,
    timeout: float = 300.0,
    client_factory: Callable[[], Client] | None = None,
    max_in_flight: int = MAX_IN_FLIGHT,
    store: ImageStore | None = None,
    api_keys: Sequence[str] | None = None,
    body_timeout: float = BODY_TIMEOUT,
) -> Starlette:
    """The gateway app. Broker connections come from ``client_factory`` (default: a plain
    ``Client(broker, timeout=timeout)``), so CURVE keys and other options stay the caller's business.
    With ``api_keys``, requests must carry one of them (see :class:`RequireApiKey`). A request body
    must arrive within ``body_timeout`` seconds of its head."""
    factory = client_factory or (lambda: Client(broker, timeout=timeout))
    gateway = Gateway(ClientPool(factory), store=store, max_in_flight=max_in_flight)
    routes = [
        Route("/v1/models", gateway.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", gateway.get_model, methods=["GET"]),
        Route("/v1/images/generations", gateway.generate, methods=["POST"]),
        Route("/v1/images/edits", gateway.edit, methods=["POST"]),
        Route("/v1/images/generations/events", gateway.generate_events, methods=["POST"]),
        Route("/v1/status", gateway.status, methods=["GET"]),
        Route("/v1/files/{file_id}.png", gateway.get_file, methods=["GET"], name="file"),
        *a1111.routes(gateway),
        *page.routes(),
    ]
    middleware = [Middleware(BodyDeadline, timeout=body_timeout)]
    middleware += [Middleware(RequireApiKey, keys=list(api_keys))] if api_keys else []
    app = Starlette(routes=routes, exception_handlers=HANDLERS, lifespan=gateway.lifespan, middleware=middleware)
    app.state.gateway = gateway
    return app
