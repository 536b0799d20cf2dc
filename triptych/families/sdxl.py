"""Stable Diffusion XL: CLIP-L + CLIP-G text encoders with a pooled vector, a text-time UNet.

The encoder sends both encoders' penultimate hidden states concatenated, plus CLIP-G's pooled
projection. The size and crop micro-conditions (``add_time_ids``) are not sent: the denoiser's
pipeline computes them from the height and width, as it does when run whole.

With no negative prompt, SDXL base checkpoints (``force_zeros_for_empty_prompt``) guide against
zero embeddings rather than an encoded "". The encoder then sends no negative tensors and the
denoiser's pipeline makes the zeros itself, exactly where diffusers makes them.

Inpainting (``StableDiffusionXLInpaintPipeline``) runs with a text-to-image checkpoint's own
components, and a dedicated inpainting checkpoint (9-channel UNet: latents, mask, masked image)
loads as that pipeline itself. As for Stable Diffusion, the decoder node preprocesses the image and
mask to the requested size (default: the UNet's), samples the image's latents with each image's
generator and, for a 9-channel UNet, the masked image's after the pipeline's noise draw; the
denoiser's pipeline takes the latents in place of pixels and blends (4 channels) or concatenates
(9 channels) exactly as when run whole. A 4-channel UNet never reads the masked image, so it is
not encoded (diffusers encodes it and drops it). Where diffusers samples the masked image's
latents, the denoiser's pipeline draws as much from each generator, so a stochastic sampler's
per-step noise comes from the same point of the stream as in diffusers.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from protocol.errors import RequestError
from protocol.messages import INPAINT, ImageInputs, RequestSpec, ResolvedParams
from protocol.stages import DECODER, DENOISER, ENCODER
from triptych.families.base import Family, Tensors, draw_as_the_masked_encode


class StableDiffusionXL(Family):
    name = "stable-diffusion-xl"
    pipelines = ("StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline")
    img2img_pipeline = "StableDiffusionXLImg2ImgPipeline"
    inpaint_pipeline = "StableDiffusionXLInpaintPipeline"
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
        if len(images) != 1:
            raise RequestError("image", f"{self.name} takes one init image (got {len(images)})")
        runner = self.pipeline_for(pipe, request.workflow)
        if mask is not None:
            return self._encode_inpaint(runner, request, images[0], mask, denoiser)
        for side in ("height", "width"):
            if getattr(request, side) is not None:
                raise RequestError(side, f"{side}: {type(runner).__name__} makes the init image's size")
        return self.encode_img2img(runner, request, images[0], {}, sample=_sdxl_sample)

    def pipeline_for(self, pipe: Any, workflow: str) -> Any:
        runner = super().pipeline_for(pipe, workflow)
        if workflow == INPAINT and runner.unet is not None:
            draw_as_the_masked_encode(runner)
        return runner

    def _encode_inpaint(
        self, runner: Any, request: RequestSpec, image: Image.Image, mask: Image.Image, denoiser: dict
    ) -> ImageInputs:
        scale = runner.vae_scale_factor
        height = request.height or denoiser["sample_size"] * scale
        width = request.width or denoiser["sample_size"] * scale
        # StableDiffusionXLInpaintPipeline.__call__, steps 5 to 7, on this side.
        pixels = runner.image_processor.preprocess(image, height=height, width=width).float()  # (1, 3, H, W)
        condition = runner.mask_processor.preprocess(mask, height=height, width=width)  # (1, 1, H, W), 0 or 1
        channels = denoiser["in_channels"]
        # Its prepare_latents samples the image's latents when the UNet blends them in (4 channels) or
        # the strength keeps some of the image; then the noise; then prepare_mask_latents the masked image's.
        encodes_image = channels == 4 or self.strength(runner, request) < 1.0
        latent_shape = (1, runner.vae.config.latent_channels, height // scale, width // scale)
        image_latents, masked_latents, states = [], [], []
        for i in range(request.num_images):
            generator = torch.Generator("cpu").manual_seed(request.seed + i)
            if encodes_image:
                image_latents.append(_inpaint_sample(runner, pixels, generator))
            else:
                image_latents.append(torch.zeros(latent_shape))  # read by no step of the pipeline
            states.append(generator.get_state())
            if channels != 4:  # the 9-channel UNet's input; a 4-channel one never reads it
                torch.randn(latent_shape, generator=generator, dtype=torch.float32)  # the pipeline's noise draw
                masked_latents.append(_inpaint_sample(runner, pixels * (condition < 0.5), generator))
        tensors = {
            "image": torch.cat(image_latents),  # (N, 4, h, w)
            "mask_image": (condition > 0.5).expand(request.num_images, -1, -1, -1).contiguous(),  # (N, 1, H, W)
        }
        if masked_latents:
            tensors["masked_image_latents"] = torch.cat(masked_latents)  # (N, 4, h, w)
        return ImageInputs(tensors=tensors, generator_state=torch.stack(states), height=height, width=width)

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

    vae, dtype, vae_dtype = runner.vae, pixels.dtype, runner.vae.dtype
    if vae.config.force_upcast:
        pixels = pixels.float()
        vae.to(torch.float32)
    latents = retrieve_latents(vae.encode(pixels), generator=generator).to(dtype)
    if vae.config.force_upcast:
        vae.to(vae_dtype)  # as the pipeline does: later decodes run in the node's dtype again
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, latents.shape[1], 1, 1)
        mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        return (latents - mean) * vae.config.scaling_factor / std
    return vae.config.scaling_factor * latents


def _inpaint_sample(runner: Any, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """StableDiffusionXLInpaintPipeline's own VAE encode: scaled only (it does not normalize with
    latents_mean/std, as img2img does), in float32 where the VAE must be."""
    vae = runner.vae
    return runner._encode_vae_image(pixels.to(vae.device, vae.dtype), generator=generator).float().cpu()
