"""Which models the gateway offers: those of the nodes registered with the broker right now.

The list is asked of the broker again after a short time, so a node that registers or leaves shows
up within seconds without every request paying for a status call.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from protocol.stages import DENOISER
from triptych.client import GenerationError
from triptych.http.errors import ApiError, error_from_failure, invalid
from triptych.http.pool import ClientPool

logger = logging.getLogger(__name__)

MODELS_TTL = 2.0  # seconds the broker's model list is reused for


class ModelCatalog:
    """The broker's served models, cached for ``ttl`` seconds; ``call`` runs a blocking function off the event loop."""

    def __init__(
        self, pool: ClientPool, call: Callable[[Callable[[], Any]], Awaitable[Any]], ttl: float = MODELS_TTL
    ) -> None:
        self.pool = pool
        self.call = call
        self.ttl = ttl
        self._models: list[str] = []
        self._samplers: dict[str, list[str]] = {}  # model -> the sampler names its denoisers accept
        self._loras: dict[str, list[str]] = {}  # model -> the LoRA adapters in its denoisers' folders
        self._step_caches: dict[str, list[str]] = {}  # model -> the step-cache kinds its denoisers apply
        self._models_at = -math.inf

    async def served(self, fresh: bool = False) -> list[str]:
        """The models of the broker's registered nodes, asked again after ``ttl`` or when ``fresh``."""
        if fresh or time.monotonic() - self._models_at > self.ttl:

            def ask() -> list[dict]:
                with self.pool.client() as client:
                    return client.status().nodes

            try:
                nodes = await self.call(ask)
            except GenerationError as exc:
                raise error_from_failure(exc) from exc
            self._models = sorted({node["model"] for node in nodes})
            self._samplers = {
                node["model"]: list(node["info"]["samplers"])
                for node in nodes
                if node["service"] == DENOISER and isinstance(node.get("info", {}).get("samplers"), list)
            }
            self._loras, self._step_caches = {}, {}
            for node in nodes:
                for key, offers in (("loras", self._loras), ("step_caches", self._step_caches)):
                    names = node.get("info", {}).get(key)
                    if node["service"] == DENOISER and isinstance(names, list):
                        offers[node["model"]] = sorted(set(offers.get(node["model"], [])) | set(map(str, names)))
            self._models_at = time.monotonic()
        return self._models

    def samplers(self, model: str) -> list[str]:
        """The sampler names a model's denoiser accepts (as of the last :meth:`served`)."""
        return self._samplers.get(model, [])

    def loras(self, model: str) -> list[str]:
        """The LoRA adapters a model's denoisers had in their folders when they started (as of the last
        :meth:`served`)."""
        return self._loras.get(model, [])

    def step_caches(self, model: str) -> list[str]:
        """The step-cache kinds a model's denoisers apply (as of the last :meth:`served`)."""
        return self._step_caches.get(model, [])

    async def resolve(self, model: str) -> str:
        """The model to ask the broker for: a served one, or the only one when none is named."""
        models = await self.served()
        if model in models:
            return model
        models = await self.served(fresh=True)  # a node may have just registered
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
            raise invalid("model", f"model is required: this broker serves several models ({', '.join(models)})")
        return models[0]
