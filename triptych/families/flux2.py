"""FLUX.2 dev and klein: an LLM text encoder read at several layers, an MMDiT, packed latents.

The encoder runs the LLM (Mistral Small 3.1 for dev, Qwen3 for klein) over the chat-formatted
prompt and stacks three of its hidden layers on the feature axis: (1, 512, 3 x hidden). The
``text_ids`` (one (t, h, w, l) position per token) are not sent: the denoiser's pipeline builds
them from the embeddings' shape, as it does when run whole.

Guidance:

- dev is guidance-distilled: ``--guidance`` is ``guidance_scale``, an input of the model
  (default 4.0); there is no classifier-free guidance, so a negative prompt is not used.
- klein runs classifier-free guidance: ``--guidance`` is ``guidance_scale`` (default 4.0), and
  above 1 a negative prompt is encoded and sent as ``negative_prompt_embeds``. The pipeline
  itself always uses "" there; triptych uses the request's negative prompt, "" when unset, so
  without one the result is diffusers'. Step-distilled klein checkpoints (``is_distilled``)
  ignore guidance, and no negative prompt is encoded for them.

Latents. The 32-channel VAE works on 2x2 patches (128 channels) normalized by its batch-norm
statistics. The decoder undoes that: un-pack (dev) or re-patch (klein) to (1, 128, h/2, w/2),
scale by the running std and add the running mean, un-patch to (1, 32, h, w), decode.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from protocol.messages import RequestSpec, ResolvedParams
from triptych.families.base import Tensors, TransformerFamily


class Flux2(TransformerFamily):
    name = "flux2"
    pipelines = ("Flux2Pipeline",)

    def default_size(self, pipe: Any) -> tuple[int, int]:
        # The pipelines fix their default (1024 px) whatever the transformer config says.
        side = pipe.default_sample_size * pipe.vae_scale_factor
        return side, side

    def size_multiple(self, pipe: Any) -> int:
        # Latents are packed as 2x2 patches (the pipeline would silently round the size down).
        return pipe.vae_scale_factor * 2

    def uses_negative(self, pipe: Any, request: RequestSpec) -> bool:
        return False  # guidance-distilled: the guidance scale is a model input, not a second pass

    def ignored_negative(self, pipe: Any, request: RequestSpec) -> str:
        return f"{type(pipe).__name__} is guidance-distilled and runs no classifier-free guidance"

    def encode_text(self, pipe: Any, text: str) -> Tensors:
        # (1, 512, 15360) for dev: Mistral's hidden states 10, 20 and 30 side by side; (1, 512, 7680)
        # for klein 4B: Qwen3's 9, 18 and 27. A negative prompt is encoded exactly like a prompt.
        embeds, _text_ids = pipe.encode_prompt(
            text,
            device=pipe.device,
            num_images_per_prompt=1,
            max_sequence_length=self.call_default(pipe, "max_sequence_length"),
            text_encoder_out_layers=self.call_default(pipe, "text_encoder_out_layers"),
        )
        return {"prompt_embeds": embeds}

    def _patches(self, pipe: Any, latents: torch.Tensor, params: ResolvedParams) -> torch.Tensor:
        """The denoiser's output for one image -> normalized 2x2 patches (1, 128, h/2, w/2)."""
        # Packed (1, h/2 * w/2, 128) in row-major patch order; the pipeline scatters by position ids.
        side = pipe.vae_scale_factor * 2
        shape = (latents.shape[0], latents.shape[-1], params.height // side, params.width // side)
        ids = pipe._prepare_latent_ids(torch.empty(shape, device="meta"))
        return pipe._unpack_latents_with_ids(latents, ids.to(latents.device))

    def decode_latents(self, pipe: Any, latents: torch.Tensor, params: ResolvedParams) -> torch.Tensor:
        vae = pipe.vae
        patches = self._patches(pipe, latents, params)
        # The pipeline's decode path: batch-norm statistics of the patched latents, then un-patch.
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patches.device, patches.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
            patches.device, patches.dtype
        )
        latents = pipe._unpatchify_latents(patches * std + mean)  # (1, 32, h, w)
        return vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]


class Flux2Klein(Flux2):
    name = "flux2-klein"
    pipelines = ("Flux2KleinPipeline",)

    def uses_negative(self, pipe: Any, request: RequestSpec) -> bool:
        return self.guidance(pipe, request) > 1.0 and not pipe.config.is_distilled

    def ignored_negative(self, pipe: Any, request: RequestSpec) -> str:
        if pipe.config.is_distilled:
            return "this checkpoint is step-distilled (is_distilled) and ignores guidance"
        return super().ignored_negative(pipe, request)

    def apply_vae_config(self, pipe: Any, vae_config: dict) -> None:
        super().apply_vae_config(pipe, vae_config)
        # Flux2KleinPipeline applies the VAE's batch-norm statistics and un-patches even for
        # output_type="latent". With no VAE here, an identity stand-in (mean 0, variance 1, eps 0:
        # exact) leaves the latents normalized; the decoder applies the real statistics.
        pipe.vae = SimpleNamespace(
            bn=SimpleNamespace(running_mean=torch.zeros(1), running_var=torch.ones(1)),
            config=SimpleNamespace(batch_norm_eps=0.0),
        )

    def _patches(self, pipe: Any, latents: torch.Tensor, params: ResolvedParams) -> torch.Tensor:
        # (1, 32, h, w) normalized and un-patched by the denoiser -> (1, 128, h/2, w/2).
        return pipe._patchify_latents(latents)
