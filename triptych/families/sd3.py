"""Stable Diffusion 3 / 3.5: CLIP-L + CLIP-G + T5 text encoders, an MMDiT, a 16-channel VAE.

The encoder sends the pipeline's joint sequence -- both CLIPs' penultimate hidden states side by
side, zero-padded to T5's width, followed by T5's tokens -- and both CLIPs' pooled projections
side by side. The VAE's latents are shifted as well as scaled.

Inpainting (``StableDiffusion3InpaintPipeline``, with a text-to-image checkpoint's components): the
decoder node preprocesses the image and mask to the requested size (default: the transformer's) and
samples the image's latents with each image's generator; the denoiser's pipeline takes them in
place of pixels and blends them back outside the mask at every step. Its 16-channel transformer
never reads the masked image's latents, which diffusers encodes and drops: they are not encoded,
and the denoiser hands the pipeline zeros of their shape. The pipeline decodes its latents un-scaled
but not un-shifted (unlike SD3's other pipelines, and its own encode); the decoder does the same.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image

from protocol.errors import RequestError
from protocol.messages import ImageInputs, RequestSpec, ResolvedParams
from protocol.stages import ENCODER
from triptych.families.base import Tensors, TransformerFamily
from triptych.families.samplers import FLOW_SAMPLERS


class StableDiffusion3(TransformerFamily):
    name = "stable-diffusion-3"
    pipelines = ("StableDiffusion3Pipeline",)
    components = {
        **TransformerFamily.components,
        ENCODER: ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3"),
    }
    optional_t5 = ("text_encoder_3", "tokenizer_3")
    samplers = (*FLOW_SAMPLERS, "flow_heun")  # its pipeline passes no custom sigmas, so Heun can run
    img2img_pipeline = "StableDiffusion3Img2ImgPipeline"
    inpaint_pipeline = "StableDiffusion3InpaintPipeline"

    def encode_images(
        self, pipe: Any, request: RequestSpec, images: list[Image.Image], mask: Image.Image | None, denoiser: dict
    ) -> ImageInputs:
        if len(images) != 1:
            raise RequestError("image", f"{self.name} takes one init image (got {len(images)})")
        runner = self.pipeline_for(pipe, request.workflow)
        # Both pipelines make the request's size, by default the transformer's.
        default = denoiser["sample_size"] * pipe.vae_scale_factor
        size = {"height": request.height or default, "width": request.width or default}
        if mask is None:
            return self.encode_img2img(runner, request, images[0], size, sample=_sd3_sample)
        latent_channels = runner.vae.config.latent_channels
        if denoiser["in_channels"] != latent_channels:
            raise RequestError(
                "mask", f"{self.name} inpaints with a {latent_channels}-channel transformer, not a dedicated one"
            )
        # StableDiffusion3InpaintPipeline.prepare_latents: the image's latents (shifted, scaled), then the noise.
        inputs = self.encode_img2img(runner, request, images[0], size)
        condition = runner.mask_processor.preprocess(mask, **size)  # (1, 1, H, W), 0 or 1
        inputs.tensors["mask_image"] = (condition > 0.5).expand(request.num_images, -1, -1, -1).contiguous()
        return inputs

    def image_kwargs(self, runner: Any, images: list[ImageInputs], params: ResolvedParams) -> dict[str, Any]:
        kwargs = super().image_kwargs(runner, images, params)
        if "mask_image" in kwargs:
            # Unread by the 16-channel transformer; without them the pipeline would mask the latents
            # it took as the image with the full-size mask.
            kwargs["masked_image_latents"] = torch.zeros_like(kwargs["image"])
        return kwargs

    def prepare_encoder(self, pipe: Any, model: str) -> None:
        if pipe.text_encoder_3 is not None:
            return
        # Without T5 the pipeline fills T5's tokens with zeros as wide as the transformer's joint
        # attention, which it reads from the transformer: the encoder has only its config.
        import diffusers

        config = diffusers.SD3Transformer2DModel.load_config(model, subfolder="transformer")
        pipe.transformer = SimpleNamespace(config=SimpleNamespace(joint_attention_dim=config["joint_attention_dim"]))

    def size_multiple(self, pipe: Any) -> int:
        # The MMDiT patchifies the latents (2x2), so sides must be whole patches.
        return pipe.vae_scale_factor * pipe.patch_size

    def encode_text(self, pipe: Any, text: str) -> Tensors:
        # (1, 77 + 256, 4096) and a pooled (1, 2048) for SD3 medium. A negative prompt is encoded
        # exactly like a positive one.
        embeds, _, pooled, _ = pipe.encode_prompt(
            text,
            None,
            None,
            device=pipe.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.call_default(pipe, "max_sequence_length"),
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def decode_latents(self, pipe: Any, latents: torch.Tensor, params: ResolvedParams) -> torch.Tensor:
        vae = pipe.vae
        latents = latents.to(vae.device, vae.dtype)
        # A tiny preview VAE (AutoencoderTiny) may have no shift. StableDiffusion3InpaintPipeline
        # decodes without it, though it encodes with it (diffusers issue #13611); so do we, to match.
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        if params.mask_sha256 is not None:
            shift = 0.0
        return vae.decode(latents / vae.config.scaling_factor + shift, return_dict=False)[0]


def _sd3_sample(runner: Any, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """StableDiffusion3Img2ImgPipeline.prepare_latents' encode: a latent sample, shifted and scaled."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import retrieve_latents

    config = runner.vae.config
    return (
        retrieve_latents(runner.vae.encode(pixels), generator=generator) - config.shift_factor
    ) * config.scaling_factor
