"""Denoiser jobs: embeddings in, latents for every image of the request out."""

from __future__ import annotations

import logging

import torch

from protocol.worker import Job, ProgressFn
from triptych.families.loading import LoadedStage

logger = logging.getLogger(__name__)


class DenoiserHandler:
    def __init__(self, stage: LoadedStage) -> None:
        self.stage = stage

    def __call__(self, job: Job, progress: ProgressFn) -> dict:
        request, embeds = job.payload["request"], job.payload["embeds"]
        if not isinstance(embeds, dict) or not all(isinstance(t, torch.Tensor) for t in embeds.values()):
            raise ValueError("embeds must map names to tensors")
        with torch.inference_mode():
            latents, params = self.stage.family.denoise(self.stage.pipe, embeds, request, progress)
        # (num_images, C, h, w) for UNets and DiTs; family-specific for packed latents.
        return {"latents": latents.contiguous(), "params": params}
