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
from PIL import Image

from protocol.errors import RequestError
from protocol.messages import ImageInputs, RequestSpec, ResolvedParams
from protocol.stages import DECODER, DENOISER, ENCODER
from triptych.families.base import Family, Tensors


class StableDiffusionXL(Family):
    name = "stable-diffusion-xl"
    pipelines = ("StableDiffusionXLPipeline",)
    img2img_pipeline = "StableDiffusionXLImg2ImgPipeline"
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

    def encode_images(
        self, pipe: Any, request: RequestSpec, images: list[Image.Image], mask: Image.Image | None, denoiser: dict
    ) -> ImageInputs:
        if len(images) != 1 or mask is not None:
            raise RequestError("image", f"{self.name} takes one init image, and no mask")
        runner = self.pipeline_for(pipe, request.workflow)
        for side in ("height", "width"):
            if getattr(request, side) is not None:
                raise RequestError(side, f"{side}: {type(runner).__name__} makes the init image's size")
        return self.encode_img2img(runner, request, images[0], {}, sample=_sdxl_sample)

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


def _sdxl_sample(runner: Any, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """StableDiffusionXLImg2ImgPipeline.prepare_latents' encode: in float32 where the VAE must be
    (force_upcast), then normalized per channel (latents_mean/std) or scaled."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import retrieve_latents

    vae, dtype = runner.vae, pixels.dtype
    if vae.config.force_upcast:
        pixels = pixels.float()
        vae.to(torch.float32)
    latents = retrieve_latents(vae.encode(pixels), generator=generator).to(dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, latents.shape[1], 1, 1)
        mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        return (latents - mean) * vae.config.scaling_factor / std
    return vae.config.scaling_factor * latents
