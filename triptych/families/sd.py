"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, an AutoencoderKL."""

from __future__ import annotations

from typing import Any

from triptych.families.base import Family, Tensors


class StableDiffusion(Family):
    name = "stable-diffusion"
    pipelines = ("StableDiffusionPipeline",)

    def encode(self, pipe: Any, request: dict) -> Tensors:
        # (1, 77, 768) for SD 1.x, (1, 77, 1024) for SD 2.x; the negative only when guidance needs it.
        positive, negative = pipe.encode_prompt(
            request["prompt"],
            device=pipe.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=self.uses_negative(pipe, request),
            negative_prompt=request.get("negative_prompt"),
        )
        embeds = {"prompt_embeds": positive}
        if negative is not None:
            embeds["negative_prompt_embeds"] = negative
        return embeds
