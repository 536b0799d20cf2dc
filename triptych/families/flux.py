"""FLUX.1 dev / schnell: CLIP-L (pooled only) + T5 text encoders, an MMDiT, packed latents.

The encoder sends T5's hidden states and CLIP's pooled output. ``text_ids`` (zeros, one row per
text token, no batch dimension) are not sent: the denoiser's pipeline builds them from the
sequence length, as it does when run whole.

Guidance. FLUX.1-dev is guidance-distilled: its ``guidance_scale`` (``--guidance``, default 3.5;
FLUX.1-schnell ignores it) is an input of the model, not classifier-free guidance. Real
classifier-free guidance is ``true_cfg_scale`` (``--true-cfg``, default 1: off); as in diffusers it
runs only with a negative prompt and ``--true-cfg`` above 1, and only then is the negative prompt
encoded. A negative prompt without it is ignored by the pipeline, and the client is told so.

The denoiser returns latents packed as 2x2 patches, (B, h/2 * w/2, 4C); the decoder unpacks
them for the image size, then un-scales and un-shifts them for the VAE.

Inpainting. With a text-to-image checkpoint, ``FluxInpaintPipeline`` (its components): the
decoder node preprocesses the image and mask to the requested size (default 1024 px) and samples
the image's latents with each image's generator; the denoiser's pipeline takes them in place of
pixels, draws the noise and blends the image back outside the mask at every step. Its transformer
never reads the masked image's latents, which diffusers encodes and drops: they are not encoded,
and the denoiser hands the pipeline zeros of their shape. FLUX.1 Fill (``FluxFillPipeline``, a
dedicated inpainting checkpoint) reads them: the decoder node samples the image's latents, skips
the pipeline's noise draw on each generator, and makes the transformer's conditioning with the
pipeline's own ``prepare_mask_latents`` -- the masked image's packed latents and the packed mask,
(N, h/2 * w/2, 4C + 4 * 64) -- which the denoiser's pipeline takes as ``masked_image_latents``.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from protocol.errors import RequestError
from protocol.messages import ImageInputs, RequestSpec, ResolvedParams
from protocol.stages import ENCODER
from triptych.families.base import Tensors, TransformerFamily


class Flux(TransformerFamily):
    name = "flux"
    pipelines = ("FluxPipeline", "FluxFillPipeline")
    img2img_pipeline = "FluxImg2ImgPipeline"
    inpaint_pipeline = "FluxInpaintPipeline"
    inpaint_checkpoints = ("FluxFillPipeline",)
    components = {
        **TransformerFamily.components,
        ENCODER: ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"),
    }

    def uses_negative(self, pipe: Any, request: RequestSpec) -> bool:
        # FluxFillPipeline has only the distilled guidance: no negative prompt, no true_cfg_scale.
        return self.takes(pipe, "negative_prompt") and super().uses_negative(pipe, request)

    def ignored_negative(self, pipe: Any, request: RequestSpec) -> str:
        if not self.takes(pipe, "negative_prompt"):
            return f"{type(pipe).__name__} takes no negative prompt"
        return super().ignored_negative(pipe, request)

    def default_size(self, pipe: Any) -> tuple[int, int]:
        # FluxPipeline fixes its default (1024 px) whatever the transformer config says.
        side = pipe.default_sample_size * pipe.vae_scale_factor
        return side, side

    def size_multiple(self, pipe: Any) -> int:
        # Latents are packed as 2x2 patches, so each latent side must be even.
        return pipe.vae_scale_factor * 2

    def encode_text(self, pipe: Any, text: str) -> Tensors:
        # (1, 512, 4096) T5 states and a pooled (1, 768) from CLIP-L for FLUX.1. A negative prompt
        # is encoded exactly like a positive one.
        embeds, pooled, _ = pipe.encode_prompt(
            text,
            None,
            device=pipe.device,
            num_images_per_prompt=1,
            max_sequence_length=self.call_default(pipe, "max_sequence_length"),
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def encode_images(
        self, pipe: Any, request: RequestSpec, images: list[Image.Image], mask: Image.Image | None, denoiser: dict
    ) -> ImageInputs:
        if len(images) != 1:
            raise RequestError("image", f"{self.name} takes one init image (got {len(images)})")
        runner = self.pipeline_for(pipe, request.workflow)
        # Each pipeline makes the request's size (default 1024 px), not the image's.
        height, width = self.default_size(pipe)
        size = {"height": request.height or height, "width": request.width or width}
        if mask is None:
            return self.encode_img2img(runner, request, images[0], size)
        if type(runner).__name__ in self.inpaint_checkpoints:
            return self._encode_fill(runner, request, images[0], mask, size)
        # FluxInpaintPipeline.prepare_latents: the image's latents (shifted, scaled), then the noise.
        inputs = self.encode_img2img(runner, request, images[0], size)
        condition = runner.mask_processor.preprocess(mask, **size)  # (1, 1, H, W), 0 or 1
        inputs.tensors["mask_image"] = (condition > 0.5).expand(request.num_images, -1, -1, -1).contiguous()
        return inputs

    @staticmethod
    def _encode_fill(
        runner: Any, request: RequestSpec, image: Image.Image, mask: Image.Image, size: dict
    ) -> ImageInputs:
        """FluxFillPipeline.__call__ up to its denoising loop, but the noise: the image's latents
        sampled first, then (after the noise draw) the masked image's, packed with the mask."""
        pixels = runner.image_processor.preprocess(image, **size).float()  # (1, 3, H, W) in [-1, 1]
        condition = runner.mask_processor.preprocess(mask, **size)  # (1, 1, H, W), 0 or 1
        vae, scale = runner.vae, runner.vae_scale_factor
        channels = vae.config.latent_channels
        height, width = pixels.shape[-2:]
        noise_shape = (1, channels, 2 * (int(height) // (scale * 2)), 2 * (int(width) // (scale * 2)))
        masked = (pixels * (1 - condition)).to(vae.device, vae.dtype)
        image_latents, conditioning, states = [], [], []
        for i in range(request.num_images):
            generator = torch.Generator("cpu").manual_seed(request.seed + i)
            image_latents.append(runner._encode_vae_image(pixels.to(vae.device, vae.dtype), generator).float().cpu())
            states.append(generator.get_state())
            torch.randn(noise_shape, generator=generator, dtype=torch.float32)  # the pipeline's noise draw
            packed_mask, packed_masked = runner.prepare_mask_latents(
                condition, masked, 1, channels, 1, height, width, vae.dtype, vae.device, generator
            )
            conditioning.append(torch.cat((packed_masked, packed_mask), dim=-1).float().cpu())
        return ImageInputs(
            tensors={
                "image": torch.cat(image_latents),  # (N, 16, h, w)
                "masked_image_latents": torch.cat(conditioning),  # (N, h/2 * w/2, 64 + 256) for FLUX.1 Fill
            },
            generator_state=torch.stack(states),
            height=int(height),
            width=int(width),
        )

    def pipeline_for(self, pipe: Any, workflow: str) -> Any:
        runner = super().pipeline_for(pipe, workflow)
        if type(runner).__name__ in self.inpaint_checkpoints and runner.transformer is not None:
            _take_latents_with_conditioning(runner)
        return runner

    def image_kwargs(self, runner: Any, images: list[ImageInputs], params: ResolvedParams) -> dict[str, Any]:
        kwargs = super().image_kwargs(runner, images, params)
        if "mask_image" in kwargs:
            # Unread by FluxInpaintPipeline's transformer; without them the pipeline would mask the
            # latents it took as the image with the full-size mask.
            kwargs["masked_image_latents"] = torch.zeros_like(kwargs["image"])
        return kwargs

    def decode_latents(self, pipe: Any, latents: torch.Tensor, params: ResolvedParams) -> torch.Tensor:
        vae = pipe.vae
        # (1, h/2 * w/2, 4C) packed -> (1, C, h, w)
        latents = pipe._unpack_latents(latents, params.height, params.width, pipe.vae_scale_factor)
        latents = latents.to(vae.device, vae.dtype)
        # A tiny preview VAE (AutoencoderTiny) may have no shift.
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode(latents / vae.config.scaling_factor + shift, return_dict=False)[0]


def _take_latents_with_conditioning(runner: Any) -> None:
    """Let a denoiser's FluxFillPipeline take the image's latents beside ``masked_image_latents``.

    Its ``check_inputs`` refuses the two together, though ``__call__`` still preprocesses ``image``
    (latents pass through) and samples its noise from it; given ``masked_image_latents`` it uses them
    as they are. The check runs as if no image were given; every other check is the pipeline's.
    """
    if getattr(runner, "_takes_latents_with_conditioning", False):
        return
    check_inputs = runner.check_inputs

    def check(*args: Any, **kwargs: Any) -> None:
        check_inputs(*args, **{**kwargs, "image": None})

    runner.check_inputs = check
    runner._takes_latents_with_conditioning = True
