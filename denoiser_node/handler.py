"""Denoiser jobs: embeddings in, latents for every image of the request out, batched."""

from __future__ import annotations

import logging
from collections.abc import Hashable

import torch

from protocol.messages import DenoisedLatents, DenoiseJob
from protocol.worker import ProgressFn
from triptych.families.loading import LoadedStage

logger = logging.getLogger(__name__)


class DenoiserHandler:
    def __init__(self, stage: LoadedStage) -> None:
        self.stage = stage
        self.images = 0
        self.batches = 0

    def batch_key(self, job: DenoiseJob) -> Hashable:
        return self.stage.family.batch_key(self.stage.pipe, job.embeds, job.request)

    def __call__(self, jobs: list[DenoiseJob], progress: ProgressFn) -> list[DenoisedLatents]:
        family, pipe = self.stage.family, self.stage.pipe
        warnings = [family.warnings(pipe, job.request) for job in jobs]  # also checks the options exist
        with torch.inference_mode():
            results = family.denoise(pipe, [(job.embeds, job.request) for job in jobs], progress)
        self.batches += 1
        self.images += sum(job.request.num_images for job in jobs)
        # Per request: (num_images, C, h, w) for UNets and DiTs; family-specific for packed latents.
        return [
            DenoisedLatents(job_id=job.job_id, latents=latents.contiguous(), params=params, warnings=notes)
            for job, (latents, params), notes in zip(jobs, results, warnings, strict=True)
        ]

    def stats(self) -> dict:
        return {"images": self.images, "batches": self.batches}
