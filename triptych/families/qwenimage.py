"""Qwen-Image: a Qwen2.5-VL text encoder, an MMDiT, packed latents, a causal 3D VAE.

The encoder formats the prompt with the pipeline's fixed system prompt, runs Qwen2.5-VL, drops
the template's tokens and keeps the prompt's own: (1, L, 3584) embeddings of the prompt's token
count L (at most ``max_sequence_length``, 512) with a (1, L) ``prompt_embeds_mask``. Prompts of
different lengths share a denoising batch: each is zero-padded to the longest, masked out.

Guidance. Qwen-Image runs true classifier-free guidance with a separate negative pass, and only
when a negative prompt is given, as in diffusers: ``--true-cfg`` is ``true_cfg_scale`` (default
4.0), and with ``--negative-prompt`` (even " ") and a scale above 1 the negative prompt is encoded
and used. Without a negative prompt no guidance runs. ``--guidance`` is ``guidance_scale``, which
only a guidance-distilled transformer (``guidance_embeds``) reads (default None).

Latents. The denoiser returns them packed as 2x2 patches, (B, h/2 * w/2, 64). The decoder
unpacks them to the VAE's 5-D (1, 16, 1, h, w) (one frame), un-normalizes them with the VAE's
per-channel ``latents_mean`` / ``latents_std`` and keeps the decoded frame.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from protocol.messages import RequestSpec, ResolvedParams
from triptych.families.base import Tensors, TransformerFamily

# Each embedding that may be padded in a batch, and the mask that says which positions are real.
_MASKS = {"prompt_embeds": "prompt_embeds_mask", "negative_prompt_embeds": "negative_prompt_embeds_mask"}


class QwenImage(TransformerFamily):
    name = "qwenimage"
    pipelines = ("QwenImagePipeline",)

    def default_size(self, pipe: Any) -> tuple[int, int]:
        # QwenImagePipeline fixes its default (1024 px) whatever the transformer config says.
        side = pipe.default_sample_size * pipe.vae_scale_factor
        return side, side

    def size_multiple(self, pipe: Any) -> int:
        # Latents are packed as 2x2 patches (the pipeline would silently round the size down).
        return pipe.vae_scale_factor * 2

    def apply_vae_config(self, pipe: Any, vae_config: dict) -> None:
        # QwenImagePipeline.__init__: one 2x spatial step per entry of temperal_downsample.
        self.set_vae_scale_factor(pipe, 2 ** len(vae_config["temperal_downsample"]))

    # --- guidance ---------------------------------------------------------------------------

    def warnings(self, pipe: Any, request: RequestSpec) -> list[str]:
        notes = super().warnings(pipe, request)
        if request.guidance is not None and not getattr(pipe, self.denoiser_attr).config.guidance_embeds:
            notes.append("--guidance is ignored: this transformer is not guidance-distilled (use --true-cfg)")
        return notes

    # --- encode -----------------------------------------------------------------------------

    def encode_text(self, pipe: Any, text: str) -> Tensors:
        # (1, L, 3584) for Qwen-Image; the pipeline encodes a negative prompt the same way.
        embeds, mask = pipe.encode_prompt(
            text,
            device=pipe.device,
            num_images_per_prompt=1,
            max_sequence_length=self.call_default(pipe, "max_sequence_length"),
        )
        if mask is None:  # encode_prompt drops a mask with no padding, as one prompt's always is
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}  # (1, L, D), (1, L)

    # --- denoise ----------------------------------------------------------------------------

    def embeds_key(self, embeds: Tensors) -> tuple:
        # Without the sequence length: batch_embeds pads prompts to one length.
        return tuple(sorted((name, tuple(t.shape[2:]), str(t.dtype)) for name, t in embeds.items()))

    def batch_embeds(self, items: list[tuple[Tensors, int]]) -> Tensors:
        padded: Tensors = {}
        for name, mask_name in _MASKS.items():
            if name not in items[0][0]:
                continue
            length = max(embeds[name].shape[1] for embeds, _ in items)
            rows, masks = [], []
            for embeds, count in items:
                pad = length - embeds[name].shape[1]
                # (1, L, D) -> (count, length, D) and (1, L) -> (count, length), zeros after L.
                rows.append(F.pad(embeds[name], (0, 0, 0, pad)).expand(count, -1, -1))
                masks.append(F.pad(embeds[mask_name], (0, pad)).expand(count, -1))
            padded[name], padded[mask_name] = torch.cat(rows), torch.cat(masks)
        return padded

    # --- decode -----------------------------------------------------------------------------

    def decode_latents(self, pipe: Any, latents: torch.Tensor, params: ResolvedParams) -> torch.Tensor:
        vae = pipe.vae
        # (1, h/2 * w/2, 64) packed -> (1, 16, 1, h, w): one frame for the video-shaped VAE.
        latents = pipe._unpack_latents(latents, params.height, params.width, pipe.vae_scale_factor)
        latents = latents.to(vae.device, vae.dtype)
        channels = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(channels).to(latents.device, latents.dtype)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(channels).to(latents.device, latents.dtype)
        return vae.decode(latents / std + mean, return_dict=False)[0][:, :, 0]
