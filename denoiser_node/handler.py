"""Denoiser jobs: embeddings in, latents for every image of the request out, batched."""

from __future__ import annotations

import logging
from collections.abc import Hashable

import torch

from protocol.worker import Job, ProgressFn
from triptych.families.loading import LoadedStage

logger = logging.getLogger(__name__)


def _embeds(job: Job) -> dict[str, torch.Tensor]:
    embeds = job.payload["embeds"]
    if not isinstance(embeds, dict) or not all(isinstance(t, torch.Tensor) for t in embeds.values()):
        raise ValueError("embeds must map names to tensors")
    return embeds


class DenoiserHandler:
    def __init__(self, stage: LoadedStage) -> None:
        self.stage = stage
        self.images = 0
        self.batches = 0

    def batch_key(self, job: Job) -> Hashable:
        return self.stage.family.batch_key(self.stage.pipe, _embeds(job), job.payload["request"])

    def __call__(self, jobs: list[Job], progress: ProgressFn) -> list[dict]:
        batch = [(_embeds(job), job.payload["request"]) for job in jobs]
        with torch.inference_mode():
            results = self.stage.family.denoise(self.stage.pipe, batch, progress)
        self.batches += 1
        self.images += sum(int(request["num_images"]) for _, request in batch)
        # Per request: (num_images, C, h, w) for UNets and DiTs; family-specific for packed latents.
        return [{"latents": latents.contiguous(), "params": params} for latents, params in results]

    def stats(self) -> dict:
        return {"images": self.images, "batches": self.batches}
