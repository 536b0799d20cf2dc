"""Encoder jobs: a prompt (and negative prompt) in, the family's embedding tensors out."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from encoder_node.cache import EmbeddingCache, Tensors
from protocol.messages import Embeddings, EncodeJob
from protocol.worker import ProgressFn
from triptych.families.loading import LoadedStage

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 1 << 30


class EncoderHandler:
    def __init__(self, stage: LoadedStage, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.stage = stage
        self.cache = EmbeddingCache(cache_bytes)

    def _cached(self, model: str) -> Callable:
        def lookup(key: tuple, compute: Callable[[], Tensors]) -> Tensors:
            return self.cache((model, *key), compute)

        return lookup

    def __call__(self, jobs: list[EncodeJob], progress: ProgressFn) -> list[Embeddings]:
        with torch.inference_mode():
            return [self._encode(job) for job in jobs]

    def _encode(self, job: EncodeJob) -> Embeddings:
        request = job.request
        embeds = self.stage.family.encode(self.stage.pipe, request, self._cached(request.model))
        # Tensors cross the wire on CPU, e.g. {"prompt_embeds": (1, 77, 768), ...}.
        return Embeddings(job_id=job.job_id, embeds={name: tensor.detach().cpu() for name, tensor in embeds.items()})

    def stats(self) -> dict:
        return {"cache_hits": self.cache.hits, "cache_misses": self.cache.misses, "cache_bytes": self.cache.bytes}
