"""Encoder jobs: a prompt (and negative prompt) in, the family's embedding tensors out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch

from encoder_node.cache import EmbeddingCache, Tensors
from protocol.messages import Embeddings, EncodeJob
from protocol.worker import ProgressFn
from triptych.families.loading import LoadedStage
from triptych.families.lora import LoraAdapters, lora_key

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 1 << 30


class EncoderHandler:
    """``adapters``: the text-encoder parts of the LoRA adapters (``--lora-dir``); without them a request's
    adapters are left to the denoiser, and the text is encoded as if it named none."""

    def __init__(
        self, stage: LoadedStage, cache_bytes: int = DEFAULT_CACHE_BYTES, adapters: LoraAdapters | None = None
    ) -> None:
        self.stage = stage
        self.cache = EmbeddingCache(cache_bytes)
        self.adapters = adapters

    def _cached(self, model: str, loras: Mapping[str, float]) -> Callable:
        # A text-encoder LoRA changes the embeddings: the adapters that ran are part of the key.
        def lookup(key: tuple, compute: Callable[[], Tensors]) -> Tensors:
            return self.cache((model, lora_key(loras), *key), compute)

        return lookup

    def __call__(self, jobs: list[EncodeJob], progress: ProgressFn) -> list[Embeddings]:
        with torch.inference_mode():
            return [self._encode(job) for job in jobs]

    def _encode(self, job: EncodeJob) -> Embeddings:
        request = job.request
        running = self.adapters.activate(request.loras) if self.adapters is not None else {}
        embeds = self.stage.family.encode(self.stage.pipe, request, self._cached(request.model, running))
        # Tensors cross the wire on CPU, e.g. {"prompt_embeds": (1, 77, 768), ...}.
        return Embeddings(job_id=job.job_id, embeds={name: tensor.detach().cpu() for name, tensor in embeds.items()})

    def stats(self) -> dict:
        stats = {"cache_hits": self.cache.hits, "cache_misses": self.cache.misses, "cache_bytes": self.cache.bytes}
        return stats | (self.adapters.stats() if self.adapters is not None else {})
