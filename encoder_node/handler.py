"""Encoder jobs: a prompt (and negative prompt) in, the family's embedding tensors out; for editing
models whose text encoder reads the images too (Qwen-Image-Edit), the request's images with it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch

from encoder_node.cache import EmbeddingCache, Tensors
from protocol.messages import Embeddings, EncodeJob
from protocol.worker import ProgressFn
from triptych.families.images import open_image
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
        self.images = 0  # images the encoded requests make (a request's prompt serves all its images)

    def _cached(self, model: str, loras: Mapping[str, float]) -> Callable:
        # A text-encoder LoRA changes the embeddings: the adapters that ran are part of the key.
        def lookup(key: tuple, compute: Callable[[], Tensors]) -> Tensors:
            return self.cache((model, lora_key(loras), *key), compute)

        return lookup

    def __call__(self, jobs: list[EncodeJob], progress: ProgressFn) -> list[Embeddings]:
        with torch.inference_mode():
            results = [self._encode(job) for job in jobs]
        self.images += sum(job.request.num_images for job in jobs)
        return results

    def _encode(self, job: EncodeJob) -> Embeddings:
        request = job.request
        running = self.adapters.activate(request.loras) if self.adapters is not None else {}
        family, cache = self.stage.family, self._cached(request.model, running)
        read_images = getattr(family, "encode_with_images", None)  # families whose text encoder reads images
        if read_images is not None:
            field = "image" if len(job.images) == 1 else "image[]"
            images = [open_image(data, field) for data in job.images]  # decoded here only, with the pixel bound
            embeds = read_images(self.stage.pipe, request, images, cache)
        else:
            embeds = family.encode(self.stage.pipe, request, cache)
        # Tensors cross the wire on CPU, e.g. {"prompt_embeds": (1, 77, 768), ...}.
        return Embeddings(job_id=job.job_id, embeds={name: tensor.detach().cpu() for name, tensor in embeds.items()})

    def stats(self) -> dict:
        stats = {
            "images": self.images,
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
            "cache_bytes": self.cache.bytes,
        }
        return stats | (self.adapters.stats() if self.adapters is not None else {})
