"""One tiny pipeline per model family, and ``build_tiny_checkpoint`` that writes one to a folder.

Each builder assembles a real diffusers pipeline of its family from the components in
``components`` and the tokenizers in ``tokenizers``; ``save_pretrained`` then writes it as a
normal checkpoint folder (``model_index.json`` + one subfolder per component) that
``DiffusionPipeline.from_pretrained(folder)`` loads back. Weights are random but
deterministic given ``seed``; everything stays fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch
from diffusers import (
    DiffusionPipeline,
    Flux2KleinPipeline,
    Flux2Pipeline,
    FluxFillPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    SanaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    ZImagePipeline,
)
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Model,
    Mistral3ForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3ForCausalLM,
    Qwen3Model,
    T5EncoderModel,
)

from triptych.testing.components import (
    TEXT_WIDTH,
    clip_text_config,
    dc_ae,
    flow_scheduler,
    flow_vae,
    flux2_transformer,
    flux2_vae,
    flux_scheduler,
    flux_transformer,
    gemma2_config,
    mistral3_config,
    pixart_scheduler,
    pixart_transformer,
    qwen2_5_vl_config,
    qwen3_config,
    qwenimage_transformer,
    qwenimage_vae,
    sana_scheduler,
    sana_transformer,
    sd3_transformer,
    sd_scheduler,
    sd_unet,
    sd_vae,
    sdxl_scheduler,
    sdxl_unet,
    t5_config,
    zimage_transformer,
)
from triptych.testing.processors import qwen2_vl_processor
from triptych.testing.tokenizers import (
    QWEN3_CHAT_TEMPLATE,
    clip_tokenizer,
    gemma_tokenizer,
    mistral_tokenizer,
    qwen_tokenizer,
    t5_tokenizer,
)

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class _Seeded:
    """Builds the components of one checkpoint, component ``index`` from its own RNG stream.

    Streams are (seed, index), so two same-shaped encoders of one checkpoint do not end up
    with identical weights. Weights are created on the CPU: only the CPU generator is forked
    and seeded, so the caller's RNG state, CUDA's included, is left alone (torch.manual_seed
    would reseed every device).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, index: int, build: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed * 1009 + index)
            return build(*args, **kwargs)


def _build_sd(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """Stable Diffusion 1.5 layout: CLIP-L text encoder, UNet, KL VAE, PNDM."""
    tokenizer, seeded = clip_tokenizer(), _Seeded(seed)
    return StableDiffusionPipeline(
        tokenizer=tokenizer,
        text_encoder=seeded(0, CLIPTextModel, clip_text_config(tokenizer, TEXT_WIDTH, text_encoder_scale)),
        unet=seeded(1, sd_unet, cross_attention_dim=TEXT_WIDTH),  # the encoder's last hidden state
        vae=seeded(2, sd_vae, sample_size=64),
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_pixart_alpha(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """PixArt-alpha layout: T5 encoder, PixArt DiT, SD KL VAE, DPM-Solver++."""
    tokenizer, seeded = t5_tokenizer(), _Seeded(seed)
    return PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=seeded(0, T5EncoderModel, t5_config(tokenizer, TEXT_WIDTH, text_encoder_scale)),
        transformer=seeded(1, pixart_transformer, caption_channels=TEXT_WIDTH),
        vae=seeded(2, sd_vae, sample_size=256),
        scheduler=pixart_scheduler(),
    )


def _build_pixart_sigma(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """PixArt-Sigma layout: as alpha, but the SDXL VAE and no size micro-conditions."""
    tokenizer, seeded = t5_tokenizer(), _Seeded(seed)
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=seeded(0, T5EncoderModel, t5_config(tokenizer, TEXT_WIDTH, text_encoder_scale)),
        # Sigma checkpoints set use_additional_conditions explicitly; alpha derives it from sample_size.
        transformer=seeded(1, pixart_transformer, caption_channels=TEXT_WIDTH, use_additional_conditions=False),
        vae=seeded(2, sd_vae, sample_size=256, scaling_factor=0.13025),
        scheduler=pixart_scheduler(),
    )


def _build_sdxl(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """SDXL base layout: CLIP-L + CLIP-G (with projection), text-time UNet, Euler."""
    tokenizer, seeded = clip_tokenizer(), _Seeded(seed)
    tokenizer_2 = clip_tokenizer(pad_token="!")  # the OpenCLIP bigG tokenizer pads with "!"
    # CLIP-G is SDXL's big encoder, so it is the one text_encoder_scale grows.
    config_2 = clip_text_config(tokenizer_2, TEXT_WIDTH, text_encoder_scale, hidden_act="gelu")
    return StableDiffusionXLPipeline(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        text_encoder=seeded(0, CLIPTextModel, clip_text_config(tokenizer, TEXT_WIDTH, 1)),
        text_encoder_2=seeded(1, CLIPTextModelWithProjection, config_2),
        # Both encoders' penultimate hidden states, concatenated on the feature axis.
        unet=seeded(2, sdxl_unet, cross_attention_dim=2 * TEXT_WIDTH, pooled_dim=config_2.projection_dim),
        vae=seeded(3, sd_vae, sample_size=64, scaling_factor=0.13025),
        scheduler=sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _build_sdxl_inpainting(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """SDXL inpainting layout (stable-diffusion-xl-1.0-inpainting-0.1): the SDXL base components
    with a 9-channel UNet (latents, mask, masked image latents)."""
    components = _build_sdxl(seed, text_encoder_scale).components
    config = {k: v for k, v in components["unet"].config.items() if not k.startswith("_")} | {"in_channels": 9}
    unet = _Seeded(seed)(4, UNet2DConditionModel.from_config, config)
    return StableDiffusionXLInpaintPipeline(**{**components, "unet": unet}, requires_aesthetics_score=False)


def _build_sd3(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """SD3 medium layout: CLIP-L + CLIP-G + T5, MMDiT, 16-channel VAE, flow matching."""
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer()
    seeded = _Seeded(seed)
    # The pipeline zero-pads the concatenated CLIP states up to the T5 width, so T5
    # must be at least as wide as both CLIPs together (4096 >= 768 + 1280 in SD3).
    d_model = 2 * TEXT_WIDTH
    config_2 = clip_text_config(tokenizer_2, TEXT_WIDTH, 1, hidden_act="gelu")
    return StableDiffusion3Pipeline(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        tokenizer_3=tokenizer_3,
        text_encoder=seeded(0, CLIPTextModelWithProjection, clip_text_config(tokenizer, TEXT_WIDTH, 1)),
        text_encoder_2=seeded(1, CLIPTextModelWithProjection, config_2),
        text_encoder_3=seeded(2, T5EncoderModel, t5_config(tokenizer_3, d_model, text_encoder_scale)),
        # Pooled: both CLIPs' pooled projections, concatenated.
        transformer=seeded(3, sd3_transformer, joint_attention_dim=d_model, pooled_projection_dim=2 * TEXT_WIDTH),
        vae=seeded(4, flow_vae, scaling_factor=1.5305, shift_factor=0.0609, sample_size=64),
        scheduler=flow_scheduler(),
    )


def _build_flux(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """FLUX.1-dev layout: CLIP-L (pooled) + T5, guidance-distilled MMDiT, flow matching.

    FluxPipeline's default size is fixed at 1024x1024 whatever the checkpoint says.
    """
    tokenizer, tokenizer_2, seeded = clip_tokenizer(), t5_tokenizer(), _Seeded(seed)
    return FluxPipeline(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        text_encoder=seeded(0, CLIPTextModel, clip_text_config(tokenizer, TEXT_WIDTH, 1)),
        text_encoder_2=seeded(1, T5EncoderModel, t5_config(tokenizer_2, TEXT_WIDTH, text_encoder_scale)),
        transformer=seeded(2, flux_transformer, joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=TEXT_WIDTH),
        vae=seeded(3, flow_vae, scaling_factor=0.3611, shift_factor=0.1159, sample_size=1024),
        scheduler=flux_scheduler(),
    )


def _build_flux_fill(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """FLUX.1-Fill-dev layout: FLUX.1's components with a transformer that also reads the masked
    image's packed latents (4 x 16) and the packed 8x8 mask (4 x 64) beside the noisy latents."""
    components = _build_flux(seed, text_encoder_scale).components
    del components["image_encoder"], components["feature_extractor"]  # FluxFillPipeline takes no IP-Adapter
    config = {k: v for k, v in components["transformer"].config.items() if not k.startswith("_")}
    config |= {"in_channels": 64 + 64 + 256, "out_channels": 64}  # it still predicts the 64 latent channels
    transformer = _Seeded(seed)(4, FluxTransformer2DModel.from_config, config)
    return FluxFillPipeline(**{**components, "transformer": transformer})


def _build_flux_kontext(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """FLUX.1 Kontext layout: FLUX.1-dev's components, the image to edit appended to the sequence.

    Its images are about 1024 x 1024 pixels whatever size is asked for (``max_area``).
    """
    return FluxKontextPipeline(**_build_flux(seed, text_encoder_scale).components)


def _build_sana(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """Sana layout: Gemma-2 decoder as text encoder, linear-attention DiT, DC-AE (f32c32).

    The DC-AE compresses 32x, so vae_scale_factor is 32 here, not 8.
    """
    tokenizer, seeded = gemma_tokenizer(), _Seeded(seed)
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=seeded(0, Gemma2Model, gemma2_config(tokenizer, text_encoder_scale)),
        transformer=seeded(1, sana_transformer, caption_channels=TEXT_WIDTH),
        vae=seeded(2, dc_ae),
        scheduler=sana_scheduler(),
    )


def _build_qwenimage(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """Qwen-Image layout: Qwen2.5-VL as text encoder, MMDiT, Wan-style causal 3D VAE.

    QwenImagePipeline's default size is fixed at 1024x1024 whatever the checkpoint says.
    """
    tokenizer, seeded = qwen_tokenizer(), _Seeded(seed)
    config = qwen2_5_vl_config(tokenizer, text_encoder_scale)
    pipeline = QwenImagePipeline(
        tokenizer=tokenizer,
        text_encoder=seeded(0, Qwen2_5_VLForConditionalGeneration, config),
        transformer=seeded(1, qwenimage_transformer, joint_attention_dim=TEXT_WIDTH),
        vae=seeded(2, qwenimage_vae),
        # Qwen-Image's scheduler: resolution-dependent exponential shift, ending at 0.02.
        scheduler=flux_scheduler(
            shift=1.0, max_shift=0.9, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential"
        ),
    )
    # The pipeline cuts a fixed number of template tokens off the front of every prompt;
    # fail loudly if this tokenizer would cut a different amount.
    prefix = pipeline.prompt_template_encode.split("{}")[0]
    if len(tokenizer(prefix).input_ids) != pipeline.prompt_template_encode_start_idx:
        raise RuntimeError("tiny Qwen tokenizer no longer matches QwenImagePipeline's prompt template")
    return pipeline


def _build_qwenimage_edit(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """Qwen-Image-Edit layout: Qwen-Image's components, with a Qwen2.5-VL processor that shows the encoder the image.

    The processor gives an image at most 16 tokens (the released one, about 1300 for a 1 MP image).
    Load the checkpoint with ``triptych.testing.processors`` imported: its processor class lives there.
    """
    components = _build_qwenimage(seed, text_encoder_scale).components
    return QwenImageEditPipeline(processor=qwen2_vl_processor(components["tokenizer"]), **components)


def _build_qwenimage_edit_plus(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """Qwen-Image-Edit Plus (2509) layout: as Qwen-Image-Edit, several images per prompt."""
    return QwenImageEditPlusPipeline(**_build_qwenimage_edit(seed, text_encoder_scale).components)


def _build_zimage(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """Z-Image layout: Qwen3 as text encoder (chat-formatted prompt), single-stream DiT, Flux VAE.

    The pipeline reads the encoder's hidden_states[-2], so it has at least two layers.
    ZImagePipeline's default size is fixed at 1024x1024 whatever the checkpoint says.
    """
    tokenizer, seeded = qwen_tokenizer(chat_template=QWEN3_CHAT_TEMPLATE), _Seeded(seed)
    return ZImagePipeline(
        tokenizer=tokenizer,
        text_encoder=seeded(0, Qwen3Model, qwen3_config(tokenizer, text_encoder_scale)),
        transformer=seeded(1, zimage_transformer, cap_feat_dim=TEXT_WIDTH),
        vae=seeded(2, flow_vae, scaling_factor=0.3611, shift_factor=0.1159, sample_size=1024),
        scheduler=flow_scheduler(),
    )


def _build_flux2(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """FLUX.2-dev layout: Mistral Small 3.1 as text encoder, Flux2 MMDiT, 32-channel VAE.

    The pipeline stacks the text encoder's hidden states 10, 20 and 30 on the feature
    axis, so the encoder keeps the real depth (40 layers, each tiny) and the denoiser's
    text width is 3 x hidden. Its default size is fixed at 1024x1024.
    """
    tokenizer, seeded = mistral_tokenizer(), _Seeded(seed)
    config = mistral3_config(tokenizer, text_encoder_scale, min_layers=40)
    return Flux2Pipeline(
        tokenizer=tokenizer,
        text_encoder=seeded(0, Mistral3ForConditionalGeneration, config),
        transformer=seeded(1, flux2_transformer, joint_attention_dim=3 * TEXT_WIDTH, guidance_embeds=True),
        vae=seeded(2, flux2_vae),
        # The pipeline passes an empirical mu for the time shift.
        scheduler=flux_scheduler(time_shift_type="exponential"),
    )


def _build_flux2_klein(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """FLUX.2-klein layout: Qwen3 as text encoder, Flux2 MMDiT without guidance input, 32-channel VAE.

    The pipeline stacks Qwen3's hidden states 9, 18 and 27, so the encoder has 28 (tiny) layers
    and the denoiser's text width is 3 x hidden. Not step-distilled, so classifier-free guidance
    runs. Its default size is fixed at 1024x1024.
    """
    tokenizer, seeded = qwen_tokenizer(chat_template=QWEN3_CHAT_TEMPLATE), _Seeded(seed)
    config = qwen3_config(tokenizer, text_encoder_scale, min_layers=28, tie_word_embeddings=True)
    return Flux2KleinPipeline(
        tokenizer=tokenizer,
        text_encoder=seeded(0, Qwen3ForCausalLM, config),
        # klein takes no distilled guidance; it runs real CFG.
        transformer=seeded(1, flux2_transformer, joint_attention_dim=3 * TEXT_WIDTH, guidance_embeds=False),
        vae=seeded(2, flux2_vae),
        scheduler=flux_scheduler(time_shift_type="exponential"),
        is_distilled=False,
    )


_BUILDERS: dict[str, Callable[[int, int], DiffusionPipeline]] = {
    "sd": _build_sd,
    "pixart-alpha": _build_pixart_alpha,
    "pixart-sigma": _build_pixart_sigma,
    "sdxl": _build_sdxl,
    "sdxl-inpainting": _build_sdxl_inpainting,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "flux-fill": _build_flux_fill,
    "flux-kontext": _build_flux_kontext,
    "sana": _build_sana,
    "qwenimage": _build_qwenimage,
    "qwenimage-edit": _build_qwenimage_edit,
    "qwenimage-edit-plus": _build_qwenimage_edit_plus,
    "zimage": _build_zimage,
    "flux2": _build_flux2,
    "flux2-klein": _build_flux2_klein,
}

FAMILIES: tuple[str, ...] = tuple(_BUILDERS)


def build_tiny_checkpoint(family: str, path: str | Path, *, seed: int = 0, text_encoder_scale: int = 1) -> Path:
    """Write a tiny random checkpoint of `family` into `path` (created), return path.

    The same `seed` always gives the same weights. `text_encoder_scale` = N > 1 grows the
    family's main text encoder to about N * 100 MB of fp32 weights (deeper, wider FFNs)
    while keeping the width of the embeddings it hands to the denoiser.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if text_encoder_scale < 1:
        raise ValueError(f"text_encoder_scale must be >= 1, got {text_encoder_scale}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipeline = _BUILDERS[family](seed, text_encoder_scale)
    pipeline.save_pretrained(path, safe_serialization=True)
    logger.info(
        "wrote tiny %s checkpoint (seed=%d, text_encoder_scale=%d) to %s", family, seed, text_encoder_scale, path
    )
    return path
