"""Decoder jobs: one image's latents in, a PNG with its generation metadata out."""

from __future__ import annotations

import logging

import torch

from decoder_node.png import encode_png
from protocol.worker import Job, ProgressFn
from triptych.families.loading import LoadedStage

logger = logging.getLogger(__name__)


class DecoderHandler:
    def __init__(self, stage: LoadedStage) -> None:
        self.stage = stage
        self.images = 0

    def __call__(self, jobs: list[Job], progress: ProgressFn) -> list[dict]:
        return [self._decode(job) for job in jobs]

    def _decode(self, job: Job) -> dict:
        latents, params, index = job.payload["latents"], job.payload["params"], job.payload["index"]
        if not isinstance(latents, torch.Tensor) or not isinstance(params, dict) or not isinstance(index, int):
            raise ValueError("a decode job needs latents, params and an image index")
        with torch.inference_mode():
            (image,) = self.stage.family.decode(self.stage.pipe, latents, params)
        self.images += 1
        return {"png": encode_png(image, {**params, "seed": params["seed"] + index})}

    def stats(self) -> dict:
        return {"images": self.images}
