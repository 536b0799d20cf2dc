"""Published architectures' configs, built with random weights for memory/speed measurements.

Each spec's build creates its pipeline directly on a device, in a dtype, from the configs
written below (nothing is downloaded), or, tiny, from miniature configs of the same shape.
The tokenizers are triptych's offline test tokenizers: the models keep the real vocabulary
sizes, and prompts use the first few hundred ids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

PROMPT = "a photo of a red fox in the snow, highly detailed"

# --- published configs (full) and miniature ones (tiny) ------------------------------------

# T5 v1.1 XXL encoder (PixArt-alpha's and Flux's text encoder): 4.7B parameters.
T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
}
T5_TINY = {**T5_XXL, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}

# CLIP ViT-L/14 text tower (SD, SDXL's first encoder, Flux's pooled encoder).
CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
CLIP_L_TINY = {**CLIP_L, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
# OpenCLIP ViT-bigG/14 text tower with projection (SDXL's second encoder).
CLIP_BIGG = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
CLIP_BIGG_TINY = {**CLIP_BIGG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
CLIP_BIGG_TINY.update(num_attention_heads=4, projection_dim=32)

# The SD KL VAE (PixArt-alpha, SDXL with its own scaling factor); Flux's has 16 latent channels.
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "latent_channels": 4,
    "scaling_factor": 0.18215,
}
VAE_TINY = {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8}
FLUX_VAE = {
    **SD_VAE,
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# PixArt-alpha XL-2-1024: 28 DiT blocks of width 1152 (0.6B parameters), 1024 px.
PIXART_XL_2_1024 = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "num_embeds_ada_norm": 1000,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
}
PIXART_TINY = {**PIXART_XL_2_1024, "sample_size": 32, "num_layers": 2, "num_attention_heads": 2}
PIXART_TINY.update(attention_head_dim=16, cross_attention_dim=32, caption_channels=32)

# SDXL base 1.0 UNet: 2.6B parameters, 1024 px.
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,  # CLIP-L (768) + bigG (1280) penultimate states
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 x 256 micro-conditions + bigG's 1280
    "norm_num_groups": 32,
}
SDXL_UNET_TINY = {**SDXL_UNET, "sample_size": 8, "block_out_channels": [32, 64], "transformer_layers_per_block": [1, 2]}
SDXL_UNET_TINY.update(
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[2, 4],
    cross_attention_dim=64,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
)

# FLUX.1-dev transformer: 19 double-stream and 38 single-stream blocks of width 3072 (11.9B).
FLUX_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
FLUX_TINY = {**FLUX_DEV, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2}
FLUX_TINY.update(joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])


# --- building pipelines ---------------------------------------------------------------------


@contextlib.contextmanager
def built_on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Create modules directly on ``device`` in ``dtype``: random init on a GPU takes seconds."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _clip_config(tokenizer: Any, config: dict) -> Any:
    from transformers import CLIPTextConfig

    # The model's vocabulary is the real one; the offline tokenizer uses the first few hundred ids.
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    return CLIPTextConfig(**config, **ids, pad_token_id=tokenizer.pad_token_id)


def _t5(config: dict) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**config, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def build_pixart(tiny: bool, device: str, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL, PixArtAlphaPipeline, PixArtTransformer2DModel

    from triptych.testing.components import pixart_scheduler
    from triptych.testing.tokenizers import t5_tokenizer

    with built_on(device, dtype):
        text_encoder = _t5(T5_TINY if tiny else T5_XXL)
        vae = AutoencoderKL(**{**SD_VAE, "sample_size": 512, **(VAE_TINY if tiny else {})})
        transformer = PixArtTransformer2DModel(**(PIXART_TINY if tiny else PIXART_XL_2_1024))
    return PixArtAlphaPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=pixart_scheduler(),
    )


def build_sdxl(tiny: bool, device: str, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from triptych.testing.components import sdxl_scheduler
    from triptych.testing.tokenizers import clip_tokenizer

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")  # bigG's tokenizer pads with "!"
    vae = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
    with built_on(device, dtype):
        text_encoder = CLIPTextModel(_clip_config(tokenizer, CLIP_L_TINY if tiny else CLIP_L))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, CLIP_BIGG_TINY if tiny else CLIP_BIGG))
        unet = UNet2DConditionModel(**(SDXL_UNET_TINY if tiny else SDXL_UNET))
        vae = AutoencoderKL(**{**vae, **(VAE_TINY if tiny else {})})
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_flux(tiny: bool, device: str, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from triptych.testing.components import flux_scheduler
    from triptych.testing.tokenizers import clip_tokenizer, t5_tokenizer

    tokenizer = clip_tokenizer()
    with built_on(device, dtype):
        text_encoder = CLIPTextModel(_clip_config(tokenizer, CLIP_L_TINY if tiny else CLIP_L))
        text_encoder_2 = _t5(T5_TINY if tiny else T5_XXL)
        transformer = FluxTransformer2DModel(**(FLUX_TINY if tiny else FLUX_DEV))
        vae = AutoencoderKL(**{**FLUX_VAE, "sample_size": 1024, **(VAE_TINY if tiny else {})})
    return FluxPipeline(
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )


# --- the models measured ----------------------------------------------------------------


def family_of(pipe: Any) -> Any | None:
    """triptych's family for the pipeline's class, or None when triptych has none."""
    from triptych.families import UnsupportedModel, family_for_pipeline

    try:
        return family_for_pipeline(type(pipe).__name__)
    except UnsupportedModel:
        return None


@dataclass
class Spec:
    name: str
    build: Callable[[bool, str, torch.dtype], Any]  # (tiny, device, dtype) -> pipeline
    dtype: torch.dtype
    steps: int  # default denoising steps here (fewer than some pipelines' defaults, to fit the time)
    size: int  # image side in pixels
    tiny_size: int  # image side with --tiny


SPECS = {
    "pixart": Spec("PixArt-alpha XL-2-1024", build_pixart, torch.float16, 20, 1024, 256),
    "sdxl": Spec("SDXL base 1.0", build_sdxl, torch.float16, 20, 1024, 64),
    "flux": Spec("FLUX.1-dev", build_flux, torch.bfloat16, 20, 1024, 64),
}
