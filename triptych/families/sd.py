"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, an AutoencoderKL.

Images in. img2img (``StableDiffusionImg2ImgPipeline``) and inpainting
(``StableDiffusionInpaintPipeline``) run with a text-to-image checkpoint's own components, and a
dedicated inpainting checkpoint (9-channel UNet) loads as the inpainting pipeline itself. The
decoder node, which holds the VAE, preprocesses the image (and mask) exactly as the pipeline does
and encodes it, sampling from the VAE's latent distribution with each image's generator; the
denoiser's pipeline takes the scaled latents in place of pixels (its latent pass-through) and its
generators go on from the state the sampling left them in. So the pipeline draws the same noise as
when run whole. For inpainting the masked image's latents are encoded there too, after the draws
the pipeline makes before them, and the denoiser's pipeline draws what that encode drew, so a
stochastic sampler's later draws come from the same point of each generator's stream as in diffusers.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from protocol.errors import RequestError
from protocol.messages import IMAGE_TO_IMAGE, INPAINT, ImageInputs, RequestSpec
from triptych.families.base import Family, Tensors, draw_as_the_masked_encode


class StableDiffusion(Family):
    name = "stable-diffusion"
    pipelines = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline")
    img2img_pipeline = "StableDiffusionImg2ImgPipeline"
    inpaint_pipeline = "StableDiffusionInpaintPipeline"

    def encode_text(self, pipe: Any, text: str) -> Tensors:
        # (1, 77, 768) for SD 1.x, (1, 77, 1024) for SD 2.x. The pipeline encodes a negative
        # prompt exactly like a positive one (same padding and mask), so one path serves both.
        (embeds, _) = pipe.encode_prompt(
            text, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": embeds}

    # --- images in --------------------------------------------------------------------------

    def pipeline_for(self, pipe: Any, workflow: str) -> Any:
        runner = super().pipeline_for(pipe, workflow)
        if workflow == INPAINT and runner.unet is not None:  # the denoiser's
            draw_as_the_masked_encode(runner)
        return runner

    def encode_images(
        self, pipe: Any, request: RequestSpec, images: list[Image.Image], mask: Image.Image | None, denoiser: dict
    ) -> ImageInputs:
        if len(images) != 1:
            raise RequestError("image", f"{self.name} takes one init image (got {len(images)})")
        runner = self.pipeline_for(pipe, request.workflow)
        if request.workflow == IMAGE_TO_IMAGE:
            for side in ("height", "width"):
                if getattr(request, side) is not None and not self.takes(runner, side):
                    raise RequestError(side, f"{side}: {type(runner).__name__} makes the init image's size")
            return self._encode_img2img(runner, request, images[0])
        return self._encode_inpaint(runner, request, images[0], mask, denoiser)

    @staticmethod
    def _generators(request: RequestSpec) -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.num_images)]

    @staticmethod
    def _sample(runner: Any, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The pipeline's own VAE encode: a sample of the latent distribution, scaled (1, 4, h, w)."""
        vae = runner.vae
        return runner._encode_vae_image(pixels.to(vae.device, vae.dtype), generator=generator).float().cpu()

    def _encode_img2img(self, runner: Any, request: RequestSpec, image: Image.Image) -> ImageInputs:
        # StableDiffusionImg2ImgPipeline: the image at its own size (rounded down to a multiple of 8).
        pixels = runner.image_processor.preprocess(image)  # (1, 3, H, W) in [-1, 1]
        latents, states = [], []
        for generator in self._generators(request):
            latents.append(_img2img_sample(runner, pixels, generator))
            states.append(generator.get_state())
        height, width = pixels.shape[-2:]
        return ImageInputs(
            tensors={"image": torch.cat(latents)},  # (N, 4, h, w): the pipeline's latent pass-through
            generator_state=torch.stack(states),
            height=int(height),
            width=int(width),
        )

    def _encode_inpaint(
        self, runner: Any, request: RequestSpec, image: Image.Image, mask: Image.Image | None, denoiser: dict
    ) -> ImageInputs:
        assert mask is not None
        scale = runner.vae_scale_factor
        height = request.height or denoiser["sample_size"] * scale
        width = request.width or denoiser["sample_size"] * scale
        # StableDiffusionInpaintPipeline.__call__, steps 5 and 7, on this side.
        pixels = runner.image_processor.preprocess(image, height=height, width=width).float()  # (1, 3, H, W)
        condition = runner.mask_processor.preprocess(mask, height=height, width=width)  # (1, 1, H, W), 0 or 1
        masked = pixels * (condition < 0.5)
        strength = self.strength(runner, request)
        channels = denoiser["in_channels"]
        # The pipeline samples the image's latents first when its UNet blends them in (4 channels) or
        # the strength keeps some of the image; then the noise; then the masked image's latents.
        encodes_image = channels == 4 or strength < 1.0
        latent_shape = (1, runner.vae.config.latent_channels, height // scale, width // scale)
        image_latents, masked_latents, states = [], [], []
        for generator in self._generators(request):
            if encodes_image:
                image_latents.append(self._sample(runner, pixels, generator))
            else:
                image_latents.append(torch.zeros(latent_shape))  # unused by the pipeline
            states.append(generator.get_state())
            torch.randn(latent_shape, generator=generator, dtype=torch.float32)  # the pipeline's noise draw
            masked_latents.append(self._sample(runner, masked, generator))
        count = request.num_images
        return ImageInputs(
            tensors={
                "image": torch.cat(image_latents),  # (N, 4, h, w)
                "mask_image": (condition > 0.5).expand(count, -1, -1, -1).contiguous(),  # (N, 1, H, W) bool
                "masked_image_latents": torch.cat(masked_latents),  # (N, 4, h, w)
            },
            generator_state=torch.stack(states),
            height=height,
            width=width,
        )


def _img2img_sample(runner: Any, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """StableDiffusionImg2ImgPipeline.prepare_latents' encode: a latent sample times the scaling factor."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    vae = runner.vae
    sample = retrieve_latents(vae.encode(pixels.to(vae.device, vae.dtype)), generator=generator)
    return (vae.config.scaling_factor * sample).float().cpu()
