"""PixArt-alpha and -Sigma: a T5 text encoder with attention masks, a DiT, resolution binning."""

from __future__ import annotations

from typing import Any

import torch

from protocol.messages import RequestSpec, ResolvedParams
from triptych.families.base import Tensors, TransformerFamily
from triptych.families.samplers import NOISE_SAMPLERS


class PixArtAlpha(TransformerFamily):
    name = "pixart-alpha"
    pipelines = ("PixArtAlphaPipeline",)
    cuda_dtype = torch.float16
    samplers = NOISE_SAMPLERS  # a DDPM-style DiT: the noise-prediction samplers

    def encode_text(self, pipe: Any, text: str) -> Tensors:
        # (1, 120, 4096) embeddings with a (1, 120) mask at PixArt-alpha's full size; the pipeline
        # tokenizes a negative prompt exactly like a positive one.
        embeds, mask, _, _ = pipe.encode_prompt(
            text,
            do_classifier_free_guidance=False,
            num_images_per_prompt=1,
            device=pipe.device,
            clean_caption=self.call_default(pipe, "clean_caption"),
            max_sequence_length=self.call_default(pipe, "max_sequence_length"),
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def extra_kwargs(self, pipe: Any, request: RequestSpec) -> dict[str, Any]:
        # The pipeline's default negative prompt ("") must not clash with negative_prompt_embeds.
        return {"negative_prompt": None}

    def decode_latents(self, pipe: Any, latents: torch.Tensor, params: ResolvedParams) -> torch.Tensor:
        image = super().decode_latents(pipe, latents, params)
        # The denoiser ran at the closest binned resolution; back to the size asked for.
        return pipe.image_processor.resize_and_crop_tensor(image, params.width, params.height)


class PixArtSigma(PixArtAlpha):
    """As alpha; the pipeline's own defaults give the differences: 300-token prompts and masks,
    and aspect-ratio bins up to 2048 px (chosen by the transformer's sample size)."""

    name = "pixart-sigma"
    pipelines = ("PixArtSigmaPipeline",)
