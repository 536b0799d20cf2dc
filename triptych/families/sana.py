"""Sana: a Gemma-2 text encoder with attention masks, a linear-attention DiT, a DC-AE, binning.

Guidance. ``--guidance`` is the pipeline's ``guidance_scale`` (classifier-free guidance, default
4.5); above 1 the negative prompt (default "") is encoded and used.

The positive and the negative prompt are encoded differently, as the pipeline does: the prompt
gets the "complex human instruction" (a fixed instruction text) in front of it, runs through Gemma
at that longer length, and only the first token and the last ``max_sequence_length - 1`` are
kept; the negative prompt goes in bare. Both come out ``max_sequence_length`` (300) tokens long.

The DC-AE compresses 32x (its scale factor comes from ``encoder_block_out_channels``) and is
scaled but not shifted. Like PixArt, the denoiser runs at the closest aspect-ratio bin and the
decoder resizes back to the size asked for.
"""

from __future__ import annotations

from typing import Any

import torch

from protocol.messages import RequestSpec, ResolvedParams
from triptych.families.base import Tensors, TransformerFamily


class Sana(TransformerFamily):
    name = "sana"
    pipelines = ("SanaPipeline",)
    # Its DPM-Solver runs on flow sigmas with a shift of its own that no other scheduler's config takes.
    samplers = ()

    def default_size(self, pipe: Any) -> tuple[int, int]:
        # SanaPipeline's defaults are fixed numbers (1024), binned like any other size.
        return self.call_default(pipe, "height"), self.call_default(pipe, "width")

    def size_multiple(self, pipe: Any) -> int:
        # Binning picks a size the model takes and the decoder resizes back, so any size works.
        return 1

    def apply_vae_config(self, pipe: Any, vae_config: dict) -> None:
        # SanaPipeline.__init__: 2 ** (len(encoder_block_out_channels) - 1), 32 for the f32 DC-AEs.
        self.set_vae_scale_factor(pipe, 2 ** (len(vae_config["encoder_block_out_channels"]) - 1))

    def _encode_options(self, pipe: Any) -> dict[str, Any]:
        return {
            "clean_caption": self.call_default(pipe, "clean_caption"),
            "max_sequence_length": self.call_default(pipe, "max_sequence_length"),
        }

    def encode_text(self, pipe: Any, text: str) -> Tensors:
        # (1, 300, 2304) Gemma-2-2B states and a (1, 300) mask, the instruction prefix cut off.
        embeds, mask, _, _ = pipe.encode_prompt(
            text,
            do_classifier_free_guidance=False,
            num_images_per_prompt=1,
            device=pipe.device,
            complex_human_instruction=self.call_default(pipe, "complex_human_instruction"),
            **self._encode_options(pipe),
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def encode_negative(self, pipe: Any, text: str) -> Tensors:
        # encode_prompt encodes the negative prompt with the prompt in one call, without the
        # instruction prefix; the method it calls for that does the negative alone.
        embeds, mask = pipe._get_gemma_prompt_embeds(
            prompt=text,
            device=pipe.device,
            dtype=pipe.text_encoder.dtype,
            complex_human_instruction=None,
            **self._encode_options(pipe),
        )
        return {"negative_prompt_embeds": embeds, "negative_prompt_attention_mask": mask}

    def extra_kwargs(self, pipe: Any, request: RequestSpec) -> dict[str, Any]:
        # The pipeline's default negative prompt ("") must not clash with negative_prompt_embeds.
        return {"negative_prompt": None}

    def decode_latents(self, pipe: Any, latents: torch.Tensor, params: ResolvedParams) -> torch.Tensor:
        vae = pipe.vae
        image = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        # The denoiser ran at the closest binned resolution; back to the size asked for.
        return pipe.image_processor.resize_and_crop_tensor(image, params.width, params.height)
