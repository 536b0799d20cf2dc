"""Z-Image: a Qwen3 text encoder, a single-stream DiT taking ragged text, a 16-channel VAE.

The pipeline takes its embeddings as a list with one (L_i, 2560) tensor per image, each as long
as its prompt's tokens (chat-formatted, at most ``max_sequence_length``, 512). The encoder sends
one such tensor per prompt, shape (L, D) with no batch dimension; the denoiser hands the
pipeline a list of them, one per image, so prompts of any length share a batch: the transformer
pads and masks them itself.

Guidance. ``--guidance`` is ``guidance_scale`` (default 5.0). Z-Image runs classifier-free
guidance whenever it is above 0 (not 1), so then the negative prompt (default "") is encoded.
Z-Image-Turbo is meant to run with ``--guidance 0``.

Latents come back unpacked, (B, 16, h, w); the decoder un-scales and un-shifts them.
"""

from __future__ import annotations

from typing import Any

import torch

from protocol.messages import RequestSpec, ResolvedParams
from triptych.families.base import Tensors, TransformerFamily


class ZImage(TransformerFamily):
    name = "zimage"
    pipelines = ("ZImagePipeline",)

    def default_size(self, pipe: Any) -> tuple[int, int]:
        return 1024, 1024  # ZImagePipeline's `height or 1024`, whatever the checkpoint says

    def size_multiple(self, pipe: Any) -> int:
        # The transformer patchifies latents 2x2; the pipeline refuses other sizes.
        return pipe.vae_scale_factor * 2

    def uses_negative(self, pipe: Any, request: RequestSpec) -> bool:
        return self.guidance(pipe, request) > 0.0

    def ignored_negative(self, pipe: Any, request: RequestSpec) -> str:
        return "guidance_scale 0 turns classifier-free guidance off"

    def encode_text(self, pipe: Any, text: str) -> Tensors:
        # The penultimate Qwen3 layer at the prompt's real tokens: (L, 2560) for Z-Image, no batch
        # dimension. A negative prompt is encoded exactly like a prompt.
        [embeds], _ = pipe.encode_prompt(
            text,
            device=pipe.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.call_default(pipe, "max_sequence_length"),
        )
        return {"prompt_embeds": embeds}

    def batch_embeds(self, items: list[tuple[Tensors, int]]) -> dict[str, list[torch.Tensor]]:
        # One (L_i, D) tensor per image, as the pipeline takes them; lengths may differ.
        names = items[0][0].keys()
        return {name: [embeds[name] for embeds, count in items for _ in range(count)] for name in names}

    def embed_kwargs(self, pipe: Any, embeds: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
        denoiser = getattr(pipe, self.denoiser_attr)
        return {name: [t.to(denoiser.device, denoiser.dtype) for t in tensors] for name, tensors in embeds.items()}

    def decode_latents(self, pipe: Any, latents: torch.Tensor, params: ResolvedParams) -> torch.Tensor:
        vae = pipe.vae
        latents = latents.to(vae.device, vae.dtype)
        return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
