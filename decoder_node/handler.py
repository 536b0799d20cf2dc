"""Decoder jobs: one image's latents in, a PNG with its generation metadata out."""

from __future__ import annotations

import logging

import torch

from decoder_node.png import encode_png
from protocol.messages import DecodedImage, DecodeJob
from protocol.worker import ProgressFn
from triptych.families.loading import LoadedStage

logger = logging.getLogger(__name__)


class DecoderHandler:
    def __init__(self, stage: LoadedStage) -> None:
        self.stage = stage
        self.images = 0

    def __call__(self, jobs: list[DecodeJob], progress: ProgressFn) -> list[DecodedImage]:
        return [self._decode(job) for job in jobs]

    def _decode(self, job: DecodeJob) -> DecodedImage:
        with torch.inference_mode():
            (image,) = self.stage.family.decode(self.stage.pipe, job.latents, job.params)
        self.images += 1
        return DecodedImage(job_id=job.job_id, png=encode_png(image, job.params, job.index))

    def stats(self) -> dict:
        return {"images": self.images}
