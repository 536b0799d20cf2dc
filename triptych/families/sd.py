"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, an AutoencoderKL."""

from __future__ import annotations

from typing import Any

from triptych.families.base import Family, Tensors


class StableDiffusion(Family):
    name = "stable-diffusion"
    pipelines = ("StableDiffusionPipeline",)

    def encode_text(self, pipe: Any, text: str) -> Tensors:
        # (1, 77, 768) for SD 1.x, (1, 77, 1024) for SD 2.x. The pipeline encodes a negative
        # prompt exactly like a positive one (same padding and mask), so one path serves both.
        (embeds, _) = pipe.encode_prompt(
            text, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": embeds}
