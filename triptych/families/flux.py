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
    pipelines = ("FluxPipeline",)
    img2img_pipeline = "FluxImg2ImgPipeline"
    components = {
        **TransformerFamily.components,
        ENCODER: ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"),
    }

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
        if len(images) != 1 or mask is not None:
            raise RequestError("image", f"{self.name} takes one init image, and no mask")
        runner = self.pipeline_for(pipe, request.workflow)
        # FluxImg2ImgPipeline makes the request's size (default 1024 px), not the image's.
        height, width = self.default_size(pipe)
        size = {"height": request.height or height, "width": request.width or width}
        return self.encode_img2img(runner, request, images[0], size)

    def decode_latents(self, pipe: Any, latents: torch.Tensor, params: ResolvedParams) -> torch.Tensor:
        vae = pipe.vae
        # (1, h/2 * w/2, 4C) packed -> (1, C, h, w)
        latents = pipe._unpack_latents(latents, params.height, params.width, pipe.vae_scale_factor)
        latents = latents.to(vae.device, vae.dtype)
        # A tiny preview VAE (AutoencoderTiny) may have no shift.
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode(latents / vae.config.scaling_factor + shift, return_dict=False)[0]
