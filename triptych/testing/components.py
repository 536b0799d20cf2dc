"""Tiny components shaped like the released models': text encoder configs, VAEs, schedulers, denoisers.

Widths are miniature (text encoders 32 wide, VAEs with four blocks so ``vae_scale_factor``
is 8); the component classes, scheduler configs, scaling factors and the wiring between
widths are the published checkpoints'. Builders of modules draw their random weights from
torch's RNG as it stands.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    PNDMScheduler,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    ZImageTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    Gemma2Config,
    Mistral3Config,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen3Config,
    T5Config,
)

# The width of every text encoder's hidden states (SD3's T5 aside), and so of what the denoiser consumes.
TEXT_WIDTH = 32

# text_encoder_scale=N aims at about N * 100 MB of fp32 text-encoder weights.
_SCALE_BYTES = 100 * 10**6
# Each wide FFN matrix holds 2**21 weights (8 MB fp32) whatever the hidden size, so the
# encoder grows while its output width (what the denoiser consumes) does not change.
_WIDE_FFN_WEIGHTS = 2**21


# ------------------------------------------------------------------- text encoders


def encoder_size(hidden: int, scale: int, matrices: int, min_layers: int = 2) -> tuple[int, int]:
    """(layers, FFN width) of a text encoder of width ``hidden`` at ``text_encoder_scale`` ``scale``.

    Scale 1 is ``min_layers`` layers with a 2 x hidden FFN. Above it the FFNs hold about
    ``scale`` * 100 MB of weights, ``matrices`` hidden x ffn matrices per layer (2 plain,
    3 gated): extra depth comes first, ``min_layers`` at least (pipelines that read deep
    hidden states need them), the FFN then widening to make up the size.
    """
    if scale == 1:
        return min_layers, hidden * 2
    target = scale * _SCALE_BYTES
    layers = max(min_layers, round(target / (matrices * _WIDE_FFN_WEIGHTS * 4)))
    return layers, round(target / (layers * matrices * hidden * 4))


def special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The bos, eos and pad ids a text encoder's config must share with its tokenizer.

    CLIPTextModel pools at the first eos, so they must be the tokenizer's. Qwen's tokenizer
    has no <bos>; its pad token stands in, as in Qwen's released configs.
    """
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    return {"bos_token_id": pad if bos is None else bos, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}


def clip_text_config(
    tokenizer: PreTrainedTokenizerBase, hidden: int, scale: int, **overrides: object
) -> CLIPTextConfig:
    """CLIP text tower config of width ``hidden`` matching ``tokenizer``'s ids (77 positions)."""
    layers, ffn = encoder_size(hidden, scale, matrices=2)
    kwargs: dict[str, object] = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": hidden,
        **special_ids(tokenizer),
    }
    return CLIPTextConfig(**{**kwargs, **overrides})


def t5_config(tokenizer: PreTrainedTokenizerBase, d_model: int, scale: int) -> T5Config:
    """T5 v1.1 style encoder config (gated GELU, untied head) of width ``d_model``."""
    layers, d_ff = encoder_size(d_model, scale, matrices=3)
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _decoder_settings(
    tokenizer: PreTrainedTokenizerBase, scale: int, min_layers: int = 2, **settings: object
) -> dict[str, object]:
    """A decoder-only text model TEXT_WIDTH wide: 4 query heads over 2 key/value heads, gated FFNs."""
    layers, ffn = encoder_size(TEXT_WIDTH, scale, matrices=3, min_layers=min_layers)
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        **special_ids(tokenizer),
        **settings,
    }


def gemma2_config(tokenizer: PreTrainedTokenizerBase, scale: int) -> Gemma2Config:
    """Sana's Gemma-2 decoder."""
    return Gemma2Config(**_decoder_settings(tokenizer, scale, head_dim=8, query_pre_attn_scalar=8))  # as gemma-2-2b


def qwen2_5_vl_config(tokenizer: PreTrainedTokenizerBase, scale: int) -> Qwen2_5_VLConfig:
    """Qwen-Image's Qwen2.5-VL, with a one-block vision tower: never run for text-to-image, but the class needs one."""
    ids = tokenizer.convert_tokens_to_ids
    # Multimodal RoPE splits the rotary half of each 8-wide head over (time, height, width),
    # as [16, 24, 24] splits 64 in the real model.
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]}
    return Qwen2_5_VLConfig(
        text_config=_decoder_settings(tokenizer, scale, rope_parameters=rope),
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": TEXT_WIDTH,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def qwen3_config(
    tokenizer: PreTrainedTokenizerBase, scale: int, min_layers: int = 2, **settings: object
) -> Qwen3Config:
    """The Qwen3 of Z-Image and FLUX.2-klein."""
    rope = {"rope_type": "default", "rope_theta": 1000000.0}
    return Qwen3Config(
        **_decoder_settings(
            tokenizer, scale, min_layers, head_dim=8, max_position_embeddings=40960, rope_parameters=rope, **settings
        )
    )


def mistral3_config(tokenizer: PreTrainedTokenizerBase, scale: int, min_layers: int) -> Mistral3Config:
    """FLUX.2-dev's Mistral Small 3.1, with a one-layer Pixtral vision tower: never run for
    text-to-image, but the class needs one."""
    rope = {"rope_type": "default", "rope_theta": 1000000000.0}
    text = {"model_type": "mistral", "head_dim": 8, "max_position_embeddings": 131072, "rope_parameters": rope}
    return Mistral3Config(
        text_config=_decoder_settings(tokenizer, scale, min_layers, **text, sliding_window=None),
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 16,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        tie_word_embeddings=False,
    )


# -------------------------------------------------------------------------- VAEs


def sd_vae(**overrides: object) -> AutoencoderKL:
    """SD-style KL VAE with four blocks (so vae_scale_factor is 8) and tiny channels."""
    kwargs: dict[str, object] = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 16, 16, 16),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "latent_channels": 4,
        "scaling_factor": 0.18215,
    }
    return AutoencoderKL(**{**kwargs, **overrides})


def flow_vae(scaling_factor: float, shift_factor: float, sample_size: int) -> AutoencoderKL:
    """SD3 / Flux VAE: 16 latent channels, shifted and scaled, no quant convs."""
    return sd_vae(
        latent_channels=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=sample_size,
    )


def dc_ae() -> AutoencoderDC:
    """Sana's DC-AE f32c32 shape: six stages (five 2x steps, so vae_scale_factor is 32).

    Convolutional ResBlocks high up, EfficientViT (linear attention) blocks in the three
    deepest stages; the first stage has no layers, so the stem itself downsamples.
    """
    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    channels, layers, multiscales = (8, 8, 16, 16, 32, 32), (0, 1, 1, 1, 1, 1), ((), (), (), (5,), (5,), (5,))
    return AutoencoderDC(
        in_channels=3,
        latent_channels=32,
        attention_head_dim=8,
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_block_out_channels=channels,
        decoder_block_out_channels=channels,
        encoder_layers_per_block=layers,
        decoder_layers_per_block=layers,
        encoder_qkv_multiscales=multiscales,
        decoder_qkv_multiscales=multiscales,
        downsample_block_type="Conv",
        upsample_block_type="interpolate",
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
        decoder_act_fns=("relu",) * 3 + ("silu",) * 3,
        scaling_factor=0.41407,
    )


def qwenimage_vae() -> AutoencoderKLQwenImage:
    """Wan-style causal 3D VAE: three 2x spatial stages, so vae_scale_factor is 8.

    Keeps the real per-channel latents_mean / latents_std defaults, which the pipeline
    un-normalizes with.
    """
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    )


def flux2_vae() -> AutoencoderKLFlux2:
    """FLUX.2's 32-channel VAE, with random batch-norm statistics.

    Real ones are far from (0, 1); random ones make a decoder that skips or repeats the
    un-normalization fail the parity tests.
    """
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=32,
        sample_size=1024,
    )
    with torch.no_grad():
        vae.bn.running_mean.normal_()
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


# -------------------------------------------------------------------- schedulers


def sd_scheduler() -> PNDMScheduler:
    """SD1.5's scheduler config: PLMS without the Runge-Kutta warm-up steps."""
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base's scheduler config: Euler over SD's scaled-linear betas, leading timesteps."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def pixart_scheduler(**overrides: object) -> DPMSolverMultistepScheduler:
    """PixArt's released scheduler config: DPM-Solver++ (2M) over a linear beta schedule."""
    kwargs: dict[str, object] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "prediction_type": "epsilon",
        "lower_order_final": True,
    }
    return DPMSolverMultistepScheduler(**{**kwargs, **overrides})


def sana_scheduler() -> DPMSolverMultistepScheduler:
    """Sana's released scheduler: PixArt's DPM-Solver++ run on flow-matching sigmas."""
    return pixart_scheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def flow_scheduler(**overrides: object) -> FlowMatchEulerDiscreteScheduler:
    """Flow-matching Euler with SD3's (and Z-Image's) fixed shift of 3."""
    return FlowMatchEulerDiscreteScheduler(**{"num_train_timesteps": 1000, "shift": 3.0, **overrides})


def flux_scheduler(**overrides: object) -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler: the shift grows with the image's token count."""
    dynamic: dict[str, object] = {
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    }
    return flow_scheduler(**{**dynamic, **overrides})


# -------------------------------------------------------------------- denoisers


def sd_unet(cross_attention_dim: int, **overrides: object) -> UNet2DConditionModel:
    """SD1.5-style UNet over 4 latent channels: two levels, 8x8 latents (64 px) by default."""
    kwargs: dict[str, object] = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "cross_attention_dim": cross_attention_dim,
        # SD1.5 quirk kept: attention_head_dim really means the number of heads.
        "attention_head_dim": 4,
    }
    return UNet2DConditionModel(**{**kwargs, **overrides})


def sdxl_unet(cross_attention_dim: int, pooled_dim: int) -> UNet2DConditionModel:
    """SDXL's text-time UNet: cross-attention deeper down, linear projections, micro-conditions.

    The micro-conditions are 6 size/crop numbers, each embedded to 8 wide, plus the pooled
    projection of the second encoder (``pooled_dim`` wide).
    """
    time_embed_dim = 8
    return sd_unet(
        cross_attention_dim,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
    )


def pixart_transformer(caption_channels: int, **overrides: object) -> PixArtTransformer2DModel:
    """PixArt DiT (adaLN-single, cross-attention to T5) with a 256 px default."""
    kwargs: dict[str, object] = {
        # The pipeline only knows aspect-ratio bins for 32/64/128; 32 -> 256 px default.
        "sample_size": 32,
        "patch_size": 2,
        "in_channels": 4,
        "out_channels": 8,  # learned sigma: the pipeline keeps the first 4 channels
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "cross_attention_dim": 32,  # equals heads * head_dim, as in the real model
        "caption_channels": caption_channels,  # T5 d_model, projected to the inner width
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "num_embeds_ada_norm": 1000,
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
    }
    return PixArtTransformer2DModel(**{**kwargs, **overrides})


def sd3_transformer(joint_attention_dim: int, pooled_projection_dim: int) -> SD3Transformer2DModel:
    """SD3's MMDiT over 16 latent channels, 8x8 latents (64 px) by default."""
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        caption_projection_dim=32,  # heads * head_dim, as in the real model
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim,
        pos_embed_max_size=32,  # positional table covers latents up to 64x64
    )


def flux_transformer(joint_attention_dim: int, pooled_projection_dim: int) -> FluxTransformer2DModel:
    """FLUX.1's guidance-distilled MMDiT: one double-stream and two single-stream blocks."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed as 2x2 patches
        num_layers=1,
        num_single_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # RoPE splits the head dim over (text id, y, x)
    )


def sana_transformer(caption_channels: int) -> SanaTransformer2DModel:
    """Sana's linear-attention DiT over the DC-AE's 32 latent channels."""
    return SanaTransformer2DModel(
        # SanaPipeline defaults to 1024x1024 whatever the checkpoint, and bins sizes
        # by sample_size; 32 (x32 DC-AE) is the 1024 px model, so no rescaling.
        sample_size=32,
        patch_size=1,
        in_channels=32,
        out_channels=32,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=caption_channels,  # Gemma hidden size, projected to the inner width
        mlp_ratio=2.5,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def qwenimage_transformer(joint_attention_dim: int) -> QwenImageTransformer2DModel:
    """Qwen-Image's MMDiT, attending to the text encoder's last hidden state."""
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels packed as 2x2 patches
        out_channels=16,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        joint_attention_dim=joint_attention_dim,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),  # RoPE splits the head dim over (frame, y, x)
    )


def zimage_transformer(cap_feat_dim: int) -> ZImageTransformer2DModel:
    """Z-Image's single-stream DiT, with random pad tokens.

    They are learned in the real model but zero-initialised; random values keep a mistake in
    handling the padded positions from going unnoticed.
    """
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=cap_feat_dim,  # the text encoder's penultimate hidden state
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],  # RoPE splits the 16-wide head over (caption/frame, y, x)
        axes_lens=[1024, 512, 512],
    )
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    return transformer


def flux2_transformer(joint_attention_dim: int, guidance_embeds: bool) -> Flux2Transformer2DModel:
    """FLUX.2's MMDiT over 32 latent channels; klein's takes no distilled guidance input."""
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,  # 32 latent channels packed as 2x2 patches
        num_layers=1,
        num_single_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),  # RoPE splits the head dim over (t, y, x, text id)
        rope_theta=2000,
        guidance_embeds=guidance_embeds,
    )
