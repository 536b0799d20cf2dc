"""Decoder jobs: one image's latents in, a PNG with its generation metadata out; and, for requests
with images in, the VAE's other half: init images (and masks) in, their latents out."""

from __future__ import annotations

import logging

import torch

from decoder_node.png import encode_png
from protocol.errors import RequestError
from protocol.messages import DecodedImage, DecodeJob, EncodedImages, EncodeImagesJob, StageJob, StageResult
from protocol.worker import ProgressFn
from triptych.families.images import open_image, open_mask
from triptych.families.loading import LoadedStage

logger = logging.getLogger(__name__)


class DecoderHandler:
    def __init__(self, stage: LoadedStage, denoiser: dict | None = None) -> None:
        self.stage = stage
        self.denoiser = denoiser  # the denoiser's config (sample size, channels): what images in need of it
        self.images = 0
        self.encoded = 0

    def __call__(self, jobs: list[StageJob], progress: ProgressFn) -> list[StageResult]:
        return [self._encode(job) if isinstance(job, EncodeImagesJob) else self._decode(job) for job in jobs]

    def _decode(self, job: DecodeJob) -> DecodedImage:
        with torch.inference_mode():
            (image,) = self.stage.family.decode(self.stage.pipe, job.latents, job.params)
        self.images += 1
        return DecodedImage(job_id=job.job_id, png=encode_png(image, job.params, job.index))

    def _encode(self, job: EncodeImagesJob) -> EncodedImages:
        if self.denoiser is None:
            raise RequestError("image", "this checkpoint has no denoiser config.json: images in need one")
        field = "image" if len(job.images) == 1 else "image[]"
        images = [open_image(data, field) for data in job.images]
        mask = None if job.mask is None else open_mask(job.mask, "mask", alpha=job.mask_alpha)
        with torch.inference_mode():
            inputs = self.stage.family.encode_images(self.stage.pipe, job.request, images, mask, self.denoiser)
        self.encoded += len(images)
        return EncodedImages(job_id=job.job_id, inputs=inputs)

    def stats(self) -> dict:
        return {"images": self.images, "images_encoded": self.encoded}
