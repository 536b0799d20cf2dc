"""Denoiser jobs: embeddings in, latents for every image of the request out, batched; previews on the way."""

from __future__ import annotations

import logging
from collections.abc import Hashable

import torch

from denoiser_node.previews import PreviewRequest, StepPreviews
from denoiser_node.step_cache import StepCaches
from protocol.messages import DenoisedLatents, DenoiseJob
from protocol.worker import ProgressFn
from triptych.families.loading import LoadedStage
from triptych.families.lora import LoraAdapters

logger = logging.getLogger(__name__)


class DenoiserHandler:
    """``adapters``: the LoRA adapters of ``--lora-dir``, activated for each batch (None: requests
    naming adapters are refused); ``step_caches``: the step caches applied per batch (default: none
    unless a request names one)."""

    def __init__(
        self, stage: LoadedStage, adapters: LoraAdapters | None = None, step_caches: StepCaches | None = None
    ) -> None:
        self.stage = stage
        self.adapters = adapters
        self.step_caches = step_caches if step_caches is not None else StepCaches(stage)
        self.images = 0
        self.batches = 0

    def batch_key(self, job: DenoiseJob) -> Hashable:
        family_key = self.stage.family.batch_key(self.stage.pipe, job.embeds, job.request, job.images)
        return (family_key, self.step_caches.key(job.request))

    def __call__(self, jobs: list[DenoiseJob], progress: ProgressFn) -> list[DenoisedLatents]:
        family, pipe = self.stage.family, self.stage.pipe
        warnings = [family.warnings(pipe, job.request) for job in jobs]  # also checks the options exist
        previews = StepPreviews(family.name, [self._preview_request(job) for job in jobs], progress)
        cache = self.step_caches.resolve(jobs[0].request)  # one per batch: the batch key holds it
        steps = family.resolve_params(pipe, jobs[0].request, jobs[0].images).steps
        with torch.inference_mode(), self.step_caches.applied(cache, steps):
            batch = [(job.embeds, job.request) for job in jobs]
            images = [job.images for job in jobs]
            results = family.denoise(
                pipe, batch, previews.step, images=images, on_latents=previews.keep, adapters=self.adapters
            )
        for _, params in results:
            params.step_cache = "" if cache is None else str(cache)
        self.batches += 1
        self.images += sum(job.request.num_images for job in jobs)
        # Per request: (num_images, C, h, w) for UNets and DiTs; family-specific for packed latents.
        return [
            DenoisedLatents(job_id=job.job_id, latents=latents.contiguous(), params=params, warnings=notes)
            for job, (latents, params), notes in zip(jobs, results, warnings, strict=True)
        ]

    def _preview_request(self, job: DenoiseJob) -> PreviewRequest:
        request = job.request
        if request.preview_every == 0:  # no previews: nothing to resolve
            return PreviewRequest(count=request.num_images, every=0, height=0, width=0)
        params = self.stage.family.resolve_params(self.stage.pipe, request, job.images)
        return PreviewRequest(request.num_images, request.preview_every, params.height, params.width)

    def stats(self) -> dict:
        stats = {"images": self.images, "batches": self.batches}
        return stats | (self.adapters.stats() if self.adapters is not None else {})
