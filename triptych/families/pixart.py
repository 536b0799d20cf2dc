"""PixArt-alpha: a T5 text encoder with attention masks, a DiT, resolution binning."""

from __future__ import annotations

from typing import Any

import torch

from triptych.families.base import DECODE, DENOISE, ENCODE, Family, Tensors


class PixArtAlpha(Family):
    name = "pixart-alpha"
    pipelines = ("PixArtAlphaPipeline",)
    components = {
        ENCODE: ("tokenizer", "text_encoder"),
        DENOISE: ("transformer", "scheduler"),
        DECODE: ("vae",),
    }
    denoiser_attr = "transformer"

    def encode(self, pipe: Any, request: dict) -> Tensors:
        negative_prompt = request.get("negative_prompt")
        if negative_prompt is None:
            negative_prompt = self.call_default(pipe, "negative_prompt")
        # (1, 120, 4096) embeddings with (1, 120) masks at PixArt-alpha's full size.
        embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
            request["prompt"],
            do_classifier_free_guidance=self.uses_negative(pipe, request),
            negative_prompt=negative_prompt,
            num_images_per_prompt=1,
            device=pipe.device,
            clean_caption=self.call_default(pipe, "clean_caption"),
            max_sequence_length=self.call_default(pipe, "max_sequence_length"),
        )
        out = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
        if negative_embeds is not None:
            out |= {"negative_prompt_embeds": negative_embeds, "negative_prompt_attention_mask": negative_mask}
        return out

    def extra_kwargs(self, pipe: Any, request: dict) -> dict[str, Any]:
        # The pipeline's default negative prompt ("") must not clash with negative_prompt_embeds.
        return {"negative_prompt": None}

    def decode_latents(self, pipe: Any, latents: torch.Tensor, params: dict) -> torch.Tensor:
        image = super().decode_latents(pipe, latents, params)
        # The denoiser ran at the closest binned resolution; back to the size asked for.
        return pipe.image_processor.resize_and_crop_tensor(image, params["width"], params["height"])
