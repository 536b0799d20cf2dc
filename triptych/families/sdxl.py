"""Stable Diffusion XL: CLIP-L + CLIP-G text encoders with a pooled vector, a text-time UNet.

The encoder sends both encoders' penultimate hidden states concatenated, plus CLIP-G's pooled
projection. The size and crop micro-conditions (``add_time_ids``) are not sent: the denoiser's
pipeline computes them from the height and width, as it does when run whole.

With no negative prompt, SDXL base checkpoints (``force_zeros_for_empty_prompt``) guide against
zero embeddings rather than an encoded "". The encoder then sends no negative tensors and the
denoiser's pipeline makes the zeros itself, exactly where diffusers makes them.
"""

from __future__ import annotations

from typing import Any

import torch

from protocol.messages import RequestSpec, ResolvedParams
from protocol.stages import DECODER, DENOISER, ENCODER
from triptych.families.base import Family, Tensors


class StableDiffusionXL(Family):
    name = "stable-diffusion-xl"
    pipelines = ("StableDiffusionXLPipeline",)
    components = {
        ENCODER: ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"),
        DENOISER: ("unet", "scheduler"),
        DECODER: ("vae",),
    }

    @staticmethod
    def _zero_negative(pipe: Any, request: RequestSpec) -> bool:
        return request.negative_prompt is None and bool(pipe.config.get("force_zeros_for_empty_prompt"))

    def uses_negative(self, pipe: Any, request: RequestSpec) -> bool:
        # Zero negatives are the denoiser's own work; sending them would only cost bytes.
        return super().uses_negative(pipe, request) and not self._zero_negative(pipe, request)

    def encode_text(self, pipe: Any, text: str) -> Tensors:
        # (1, 77, 2048) and a pooled (1, 1280) for SDXL base. A negative prompt is encoded exactly
        # like a positive one (same padding, penultimate layer, pooled CLIP-G output).
        embeds, _, pooled, _ = pipe.encode_prompt(
            text, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def decode_latents(self, pipe: Any, latents: torch.Tensor, params: ResolvedParams) -> torch.Tensor:
        vae = pipe.vae
        if vae.dtype == torch.float16 and vae.config.force_upcast:
            # The SDXL VAE overflows in float16; the pipeline decodes in float32 for that reason.
            vae.to(torch.float32)
        latents = latents.to(vae.device, vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            # Checkpoints with normalized latents (e.g. Playground v2.5) un-normalize per channel.
            shape = (1, latents.shape[1], 1, 1)
            mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        if pipe.watermark is not None:
            image = pipe.watermark.apply_watermark(image)
        return image
