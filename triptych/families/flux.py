"""FLUX.1 dev / schnell: CLIP-L (pooled only) + T5 text encoders, an MMDiT, packed latents.

The encoder sends T5's hidden states and CLIP's pooled output. ``text_ids`` (zeros, one row per
text token, no batch dimension) are not sent: the denoiser's pipeline builds them from the
sequence length, as it does when run whole.

Guidance. FLUX.1-dev is guidance-distilled: its ``guidance_scale`` is an input of the model, not
classifier-free guidance, and no negative prompt is used by default. triptych maps ``--guidance``
like this:

- no negative prompt: ``--guidance`` is ``guidance_scale``, the distilled guidance (default 3.5;
  FLUX.1-schnell ignores it);
- a negative prompt: real classifier-free guidance runs, and ``--guidance`` is its scale,
  ``true_cfg_scale`` (default 3.5 here too); the distilled ``guidance_scale`` stays at the
  pipeline's default. A ``--guidance`` of 1 or less turns real guidance off again, so the
  negative prompt is then not encoded.

The denoiser returns latents packed as 2x2 patches, (B, h/2 * w/2, 4C); the decoder unpacks
them for the image size, then un-scales and un-shifts them for the VAE.
"""

from __future__ import annotations

from typing import Any

import torch

from triptych.families.base import ENCODE, Tensors, TransformerFamily


class Flux(TransformerFamily):
    name = "flux"
    pipelines = ("FluxPipeline",)
    components = {
        **TransformerFamily.components,
        ENCODE: ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"),
    }

    def default_size(self, pipe: Any) -> tuple[int, int]:
        # FluxPipeline fixes its default (1024 px) whatever the transformer config says.
        side = pipe.default_sample_size * pipe.vae_scale_factor
        return side, side

    def size_multiple(self, pipe: Any) -> int:
        # Latents are packed as 2x2 patches, so each latent side must be even.
        return pipe.vae_scale_factor * 2

    @staticmethod
    def _true_cfg(request: dict) -> bool:
        return request.get("negative_prompt") is not None

    def uses_negative(self, pipe: Any, request: dict) -> bool:
        return self._true_cfg(request) and self.guidance(pipe, request) > 1.0

    def guidance_kwargs(self, pipe: Any, request: dict, guidance: float) -> dict[str, Any]:
        if self._true_cfg(request):
            return {"true_cfg_scale": guidance, "guidance_scale": self.call_default(pipe, "guidance_scale")}
        return {"guidance_scale": guidance}

    def batch_key(self, pipe: Any, embeds: Tensors, request: dict) -> tuple:
        # The same --guidance means a different argument with a negative prompt than without.
        return (*super().batch_key(pipe, embeds, request), self._true_cfg(request))

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

    def decode_latents(self, pipe: Any, latents: torch.Tensor, params: dict) -> torch.Tensor:
        vae = pipe.vae
        # (1, h/2 * w/2, 4C) packed -> (1, C, h, w)
        latents = pipe._unpack_latents(latents, params["height"], params["width"], pipe.vae_scale_factor)
        latents = latents.to(vae.device, vae.dtype)
        # A tiny preview VAE (AutoencoderTiny) may have no shift.
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode(latents / vae.config.scaling_factor + shift, return_dict=False)[0]
