"""Tiny random-weight diffusers checkpoints, built entirely offline.

Each builder assembles a real diffusers pipeline of one model family with miniature
configs shaped like the released model's (same component classes, schedulers, scaling
factors, a VAE with four blocks so ``vae_scale_factor`` is 8), then ``save_pretrained``
writes it as a normal checkpoint folder (``model_index.json`` + one subfolder per
component) that ``DiffusionPipeline.from_pretrained(folder)`` loads back.

Tokenizers are built from small in-memory vocabularies, so nothing is ever downloaded.
Weights are random but deterministic given ``seed``; everything stays fp32.

These checkpoints serve the parity tests against diffusers and the offline demo model
of ``triptych run``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from itertools import pairwise
from pathlib import Path

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    TokenizersBackend,
)

logger = logging.getLogger(__name__)

# Words that get whole-word tokens, so common prompts tokenize into a handful of ids
# rather than one id per character (any other text still tokenizes, just longer).
_WORDS = tuple(
    word
    for line in (
        "a an the of in on at with and or to by for from is are",
        "photo picture painting drawing portrait landscape render image art style",
        "cat dog bird horse fish tree flower forest mountain river lake sea sky sun moon",
        "city street house car boat man woman child astronaut robot",
        "red green blue yellow black white dark light bright",
        "big small old new beautiful detailed high quality low blurry ugly",
    )
    for word in line.split()
)

# text_encoder_scale=N aims at about N * 100 MB of fp32 text-encoder weights.
_SCALE_BYTES = 100 * 10**6
# Each wide FFN matrix holds 2**21 weights (8 MB fp32) whatever the hidden size, so the
# encoder grows while its output width (what the denoiser consumes) does not change.
_WIDE_FFN_WEIGHTS = 2**21


# --------------------------------------------------------------------------- helpers


@contextmanager
def _seeded(seed: int, component: int) -> Iterator[None]:
    """Seed torch for one component's init without disturbing the caller's RNG state.

    Each component gets its own stream (seed, component) so two same-shaped encoders
    of one checkpoint do not end up with identical weights.
    """
    # Weights are created on the CPU: fork and seed only the CPU generator, so a caller's
    # CUDA RNG state is left alone too (torch.manual_seed would reseed every device).
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed * 1009 + component)
        yield


def _scaled_ffn(hidden: int, scale: int, matrices: int, min_layers: int = 1) -> tuple[int, int]:
    """(layers, ffn width) giving about ``scale`` * 100 MB of FFN weights at width ``hidden``.

    ``matrices`` is the count of hidden x ffn matrices per layer (2 plain, 3 gated).
    Extra depth comes first; ``min_layers`` keeps encoders whose pipelines read deep
    hidden states deep enough, the FFN then widening to make up the size.
    """
    target = scale * _SCALE_BYTES
    layers = max(min_layers, round(target / (matrices * _WIDE_FFN_WEIGHTS * 4)))
    return layers, round(target / (layers * matrices * hidden * 4))


@cache
def _byte_chars() -> tuple[str, ...]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2 / CLIP table)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    shifted = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(shifted)
            shifted += 1
    return tuple(table[b] for b in range(256))


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encode ``pieces``: repeatedly join the adjacent pair of lowest rank."""
    while len(pieces) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(pairwise(pieces)))
        if rank == len(ranks):
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]
    return pieces


def _add_word_merges(pieces: list[str], vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> None:
    """Add the merges (and merged tokens) that turn ``pieces`` into one token.

    The word is first split as the merges so far would split it, then what is left is
    joined left to right with new, lowest-priority merges; so each word ends as a single
    token even when shorter words ("to", "at") hide inside it.
    """
    pieces = _apply_merges(pieces, ranks)
    while len(pieces) > 1:
        pair = (pieces[0], pieces[1])
        ranks.setdefault(pair, len(ranks))
        vocab.setdefault(pair[0] + pair[1], len(vocab))
        pieces = [pair[0] + pair[1], *pieces[2:]]


def _clip_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Byte-level BPE CLIP tokenizer: every byte (alone and word-final), plus whole words.

    Laid out like OpenAI's vocab: byte tokens, then merges, then the two specials last.
    """
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for char in _byte_chars():
            vocab[char + suffix] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    for word in _WORDS:
        _add_word_merges([*word[:-1], word[-1] + "</w>"], vocab, ranks)
    for special in ("<|startoftext|>", "<|endoftext|>", pad_token):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), pad_token=pad_token, model_max_length=max_length)


def _t5_tokenizer() -> T5Tokenizer:
    """Unigram T5 tokenizer: specials first as in T5, then characters, then whole words.

    Scores are log-probabilities; whole words score higher than their spelled-out
    characters so the Viterbi split prefers them.
    """
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()&/"
    pieces += [(char, -8.0) for char in chars]
    pieces += [("▁" + char, -7.0) for char in chars]
    pieces += [("▁" + word, -3.0) for word in _WORDS]
    # extra_ids=0: the sentinel tokens are only for T5's span-corruption pretraining.
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _gemma_tokenizer() -> GemmaTokenizer:
    """SentencePiece-style BPE Gemma tokenizer with byte fallback, so any text encodes.

    Gemma marks spaces with "▁" (no dummy prefix) and prepends <bos>; ids follow Gemma's
    layout (pad, eos, bos, unk, mask, then the 256 byte tokens).
    """
    vocab = {token: i for i, token in enumerate(("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"))}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()&/\n":
        vocab.setdefault(char, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in _WORDS:
        _add_word_merges(["▁", *word], vocab, ranks)
    return GemmaTokenizer(vocab=vocab, merges=list(ranks), add_bos_token=True, model_max_length=8192)


# Words of QwenImagePipeline's fixed system prompt. The pipeline drops the first 34 token
# positions as "the template", counted for Qwen's real tokenizer; giving each word its own
# token here keeps that count right, so the prompt's own tokens are what remains.
_QWEN_TEMPLATE_WORDS = (
    *("system", "user", "assistant", "Describe", "the", "image", "by", "detailing", "color", "shape"),
    *("size", "texture", "quantity", "text", "spatial", "relationships", "of", "objects", "and", "background"),
)
_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen3's chat format, reduced to what text-to-image pipelines render: a user turn, then
# the assistant header (with an empty think block when thinking is switched off).
_QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def _qwen_tokenizer(chat_template: str | None = None) -> Qwen2Tokenizer:
    """Byte-level BPE Qwen2 tokenizer (no end-of-word marks; "Ġ" stands for a space)."""
    vocab = {char: i for i, char in enumerate(_byte_chars())}
    space = _byte_chars()[ord(" ")]
    ranks: dict[tuple[str, str], int] = {}
    for word in (*_QWEN_TEMPLATE_WORDS, *_WORDS):
        _add_word_merges([space, *word], vocab, ranks)
        _add_word_merges(list(word), vocab, ranks)  # at the start of a line
    specials = [*_QWEN_SPECIALS, "<think>", "</think>"]
    for token in specials:
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(ranks),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        chat_template=chat_template,
    )
    # Special tokens must not be split by the byte-level pre-tokenizer.
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


# Mistral's control tokens, in Tekken's id order (a prefix of its 1000 reserved ids).
_MISTRAL_SPECIALS = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)
# Mistral Small 3.1's chat format for text turns (content may be a string or a list of
# {"type": "text"} parts, as Flux2Pipeline sends).
_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' -%}{{ '[INST]' + text + '[/INST]' }}"
    "{%- else -%}{{ text + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)


def _mistral_tokenizer() -> TokenizersBackend:
    """Byte-level BPE tokenizer laid out like Mistral's Tekken (controls, bytes, merges).

    A plain tokenizer with a chat template: the released FLUX.2 checkpoint ships a
    PixtralProcessor here, which needs torchvision; for text prompts the processor only
    forwards to its tokenizer, so the pipeline behaves the same.
    """
    vocab = {token: i for i, token in enumerate(_MISTRAL_SPECIALS)}
    for char in _byte_chars():
        vocab[char] = len(vocab)
    space = _byte_chars()[ord(" ")]
    ranks: dict[tuple[str, str], int] = {}
    for word in _WORDS:
        _add_word_merges([space, *word], vocab, ranks)
        _add_word_merges(list(word), vocab, ranks)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(ranks), unk_token="<unk>", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return TokenizersBackend(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=[t for t in _MISTRAL_SPECIALS if t.startswith("[")],
        chat_template=_MISTRAL_CHAT_TEMPLATE,
        model_max_length=131072,
    )


def _clip_text_config(tokenizer: CLIPTokenizer, hidden: int, scale: int, **overrides: object) -> CLIPTextConfig:
    """CLIP text tower config of width ``hidden`` matching ``tokenizer``'s ids (77 positions)."""
    layers, ffn = (2, hidden * 2) if scale == 1 else _scaled_ffn(hidden, scale, matrices=2)
    kwargs: dict[str, object] = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": hidden,
        # CLIPTextModel pools at the first eos_token_id, so the ids must be the tokenizer's.
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    kwargs.update(overrides)
    return CLIPTextConfig(**kwargs)


def _t5_encoder(tokenizer: T5Tokenizer, d_model: int, scale: int) -> T5EncoderModel:
    """T5 v1.1 style encoder (gated GELU, untied head) of width ``d_model``."""
    layers, d_ff = (2, d_model * 2) if scale == 1 else _scaled_ffn(d_model, scale, matrices=3)
    config = T5Config(
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
    return T5EncoderModel(config)


def _sd_vae(**overrides: object) -> AutoencoderKL:
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
    kwargs.update(overrides)
    return AutoencoderKL(**kwargs)


# -------------------------------------------------------------------------- families


def _build_sd(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """Stable Diffusion 1.5 layout: CLIP-L text encoder, UNet, KL VAE, PNDM."""
    tokenizer = _clip_tokenizer()
    hidden = 32
    with _seeded(seed, 0):
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden, text_encoder_scale))
    with _seeded(seed, 1):
        unet = UNet2DConditionModel(
            sample_size=8,  # latent 8x8 -> 64x64 px by default
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            norm_num_groups=32,
            cross_attention_dim=hidden,  # consumes the encoder's last hidden state
            # SD1.5 quirk kept: attention_head_dim really means the number of heads.
            attention_head_dim=4,
        )
    with _seeded(seed, 2):
        vae = _sd_vae(sample_size=64)
    # SD1.5's scheduler config: PLMS without the Runge-Kutta warm-up steps.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _pixart_scheduler() -> DPMSolverMultistepScheduler:
    """PixArt's released scheduler config: DPM-Solver++ (2M) over a linear beta schedule."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="epsilon",
        lower_order_final=True,
    )


def _pixart_transformer(caption_channels: int, **overrides: object) -> PixArtTransformer2DModel:
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
    kwargs.update(overrides)
    return PixArtTransformer2DModel(**kwargs)


def _build_pixart_alpha(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """PixArt-alpha layout: T5 encoder, PixArt DiT, SD KL VAE, DPM-Solver++."""
    tokenizer = _t5_tokenizer()
    d_model = 32
    with _seeded(seed, 0):
        text_encoder = _t5_encoder(tokenizer, d_model, text_encoder_scale)
    with _seeded(seed, 1):
        transformer = _pixart_transformer(caption_channels=d_model)
    with _seeded(seed, 2):
        vae = _sd_vae(sample_size=256)
    return PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=_pixart_scheduler(),
    )


def _build_pixart_sigma(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """PixArt-Sigma layout: as alpha, but the SDXL VAE and no size micro-conditions."""
    tokenizer = _t5_tokenizer()
    d_model = 32
    with _seeded(seed, 0):
        text_encoder = _t5_encoder(tokenizer, d_model, text_encoder_scale)
    with _seeded(seed, 1):
        # Sigma checkpoints set this explicitly; alpha derives it from sample_size.
        transformer = _pixart_transformer(caption_channels=d_model, use_additional_conditions=False)
    with _seeded(seed, 2):
        vae = _sd_vae(sample_size=256, scaling_factor=0.13025)
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=_pixart_scheduler(),
    )


def _build_sdxl(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """SDXL base layout: CLIP-L + CLIP-G (with projection), text-time UNet, Euler."""
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer(pad_token="!")  # the OpenCLIP bigG tokenizer pads with "!"
    hidden, hidden_2 = 32, 32
    time_embed_dim = 8
    with _seeded(seed, 0):
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden, 1))
    with _seeded(seed, 1):
        # CLIP-G is SDXL's big encoder, so it is the one text_encoder_scale grows.
        config_2 = _clip_text_config(tokenizer_2, hidden_2, text_encoder_scale, hidden_act="gelu")
        text_encoder_2 = CLIPTextModelWithProjection(config_2)
    with _seeded(seed, 2):
        unet = UNet2DConditionModel(
            sample_size=8,  # latent 8x8 -> 64x64 px by default
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            norm_num_groups=32,
            # Both encoders' penultimate hidden states, concatenated on the feature axis.
            cross_attention_dim=hidden + hidden_2,
            # Micro-conditions: 6 size/crop numbers, each embedded to time_embed_dim,
            # plus CLIP-G's pooled projection.
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + config_2.projection_dim,
        )
    with _seeded(seed, 3):
        vae = _sd_vae(sample_size=64, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _flow_vae(scaling_factor: float, shift_factor: float, sample_size: int) -> AutoencoderKL:
    """SD3 / Flux VAE: 16 latent channels, shifted and scaled, no quant convs."""
    return _sd_vae(
        latent_channels=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=sample_size,
    )


def _build_sd3(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """SD3 medium layout: CLIP-L + CLIP-G + T5, MMDiT, 16-channel VAE, flow matching."""
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer(pad_token="!")
    tokenizer_3 = _t5_tokenizer()
    hidden, hidden_2 = 32, 32
    # The pipeline zero-pads the concatenated CLIP states up to the T5 width, so T5
    # must be at least as wide as both CLIPs together (4096 >= 768 + 1280 in SD3).
    d_model = 64
    with _seeded(seed, 0):
        text_encoder = CLIPTextModelWithProjection(_clip_text_config(tokenizer, hidden, 1))
    with _seeded(seed, 1):
        config_2 = _clip_text_config(tokenizer_2, hidden_2, 1, hidden_act="gelu")
        text_encoder_2 = CLIPTextModelWithProjection(config_2)
    with _seeded(seed, 2):
        text_encoder_3 = _t5_encoder(tokenizer_3, d_model, text_encoder_scale)
    with _seeded(seed, 3):
        transformer = SD3Transformer2DModel(
            sample_size=8,  # latent 8x8 -> 64x64 px by default
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=16,
            caption_projection_dim=32,  # heads * head_dim, as in the real model
            joint_attention_dim=d_model,
            pooled_projection_dim=hidden + hidden_2,  # both CLIPs' pooled projections
            pos_embed_max_size=32,  # positional table covers latents up to 64x64
        )
    with _seeded(seed, 4):
        vae = _flow_vae(scaling_factor=1.5305, shift_factor=0.0609, sample_size=64)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _build_flux(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """FLUX.1-dev layout: CLIP-L (pooled) + T5, guidance-distilled MMDiT, flow matching.

    FluxPipeline's default size is fixed at 1024x1024 whatever the checkpoint says.
    """
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    hidden, d_model = 32, 32
    with _seeded(seed, 0):
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden, 1))
    with _seeded(seed, 1):
        text_encoder_2 = _t5_encoder(tokenizer_2, d_model, text_encoder_scale)
    with _seeded(seed, 2):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed as 2x2 patches
            num_layers=1,
            num_single_layers=2,
            num_attention_heads=2,
            attention_head_dim=16,
            joint_attention_dim=d_model,
            pooled_projection_dim=hidden,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),  # RoPE splits the head dim over (text id, y, x)
        )
    with _seeded(seed, 3):
        vae = _flow_vae(scaling_factor=0.3611, shift_factor=0.1159, sample_size=1024)
    # FLUX.1-dev's scheduler: the shift grows with image token count.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _build_sana(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """Sana layout: Gemma-2 decoder as text encoder, linear-attention DiT, DC-AE (f32c32).

    The DC-AE compresses 32x, so vae_scale_factor is 32 here, not 8.
    """
    tokenizer = _gemma_tokenizer()
    hidden = 32
    with _seeded(seed, 0):
        layers, ffn = (2, hidden * 2) if text_encoder_scale == 1 else _scaled_ffn(hidden, text_encoder_scale, 3)
        text_encoder = Gemma2Model(
            Gemma2Config(
                vocab_size=len(tokenizer),
                hidden_size=hidden,
                intermediate_size=ffn,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                query_pre_attn_scalar=8,  # = head_dim, as in gemma-2-2b
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
    with _seeded(seed, 1):
        transformer = SanaTransformer2DModel(
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
            caption_channels=hidden,  # Gemma hidden size, projected to the inner width
            mlp_ratio=2.5,
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        )
    with _seeded(seed, 2):
        # DC-AE f32c32 shape: six stages (five 2x steps), convolutional ResBlocks high up,
        # EfficientViT (linear attention) blocks in the three deepest stages; the first
        # stage has no layers, so the stem itself downsamples.
        vae = AutoencoderDC(
            in_channels=3,
            latent_channels=32,
            attention_head_dim=8,
            encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
            decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
            encoder_block_out_channels=(8, 8, 16, 16, 32, 32),
            decoder_block_out_channels=(8, 8, 16, 16, 32, 32),
            encoder_layers_per_block=(0, 1, 1, 1, 1, 1),
            decoder_layers_per_block=(0, 1, 1, 1, 1, 1),
            encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
            decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
            downsample_block_type="Conv",
            upsample_block_type="interpolate",
            decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
            decoder_act_fns=("relu",) * 3 + ("silu",) * 3,
            scaling_factor=0.41407,
        )
    # Sana's released scheduler: DPM-Solver++ run on flow-matching sigmas.
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        lower_order_final=True,
    )
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


def _build_qwenimage(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """Qwen-Image layout: Qwen2.5-VL as text encoder, MMDiT, Wan-style causal 3D VAE.

    QwenImagePipeline's default size is fixed at 1024x1024 whatever the checkpoint says.
    """
    tokenizer = _qwen_tokenizer()
    hidden = 32
    with _seeded(seed, 0):
        layers, ffn = (2, hidden * 2) if text_encoder_scale == 1 else _scaled_ffn(hidden, text_encoder_scale, 3)
        ids = tokenizer.convert_tokens_to_ids
        config = Qwen2_5_VLConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": hidden,
                "intermediate_size": ffn,
                "num_hidden_layers": layers,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                # Multimodal RoPE splits the rotary half of each 8-wide head over
                # (time, height, width), as [16, 24, 24] splits 64 in the real model.
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
                "bos_token_id": ids("<|endoftext|>"),
                "eos_token_id": ids("<|im_end|>"),
                "pad_token_id": ids("<|endoftext|>"),
            },
            # The vision tower is never run for text-to-image, but the class needs one.
            vision_config={
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_heads": 2,
                "out_hidden_size": hidden,
                "fullatt_block_indexes": [0],
            },
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    with _seeded(seed, 1):
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,  # 16 latent channels packed as 2x2 patches
            out_channels=16,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=16,
            joint_attention_dim=hidden,  # the text encoder's last hidden state
            guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),  # RoPE splits the head dim over (frame, y, x)
        )
    with _seeded(seed, 2):
        # Three 2x spatial stages -> vae_scale_factor 8; keeps the real per-channel
        # latents_mean / latents_std defaults, which the pipeline un-normalizes with.
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True],
        )
    # Qwen-Image's scheduler: resolution-dependent exponential shift, ending at 0.02.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    pipeline = QwenImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    # The pipeline cuts a fixed number of template tokens off the front of every prompt;
    # fail loudly if this tokenizer would cut a different amount.
    prefix = pipeline.prompt_template_encode.split("{}")[0]
    if len(tokenizer(prefix).input_ids) != pipeline.prompt_template_encode_start_idx:
        raise RuntimeError("tiny Qwen tokenizer no longer matches QwenImagePipeline's prompt template")
    return pipeline


def _build_zimage(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """Z-Image layout: Qwen3 as text encoder (chat-formatted prompt), single-stream DiT, Flux VAE.

    ZImagePipeline's default size is fixed at 1024x1024 whatever the checkpoint says.
    """
    tokenizer = _qwen_tokenizer(chat_template=_QWEN3_CHAT_TEMPLATE)
    hidden = 32
    with _seeded(seed, 0):
        # The pipeline reads hidden_states[-2], so at least two layers are needed.
        layers, ffn = (2, hidden * 2) if text_encoder_scale == 1 else _scaled_ffn(hidden, text_encoder_scale, 3)
        text_encoder = Qwen3Model(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=hidden,
                intermediate_size=ffn,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                max_position_embeddings=40960,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                bos_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    with _seeded(seed, 1):
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
            cap_feat_dim=hidden,  # the text encoder's penultimate hidden state
            rope_theta=256.0,
            t_scale=1000.0,
            axes_dims=[8, 4, 4],  # RoPE splits the 16-wide head over (caption/frame, y, x)
            axes_lens=[1024, 512, 512],
        )
        # Learned in the real model but zero-initialised; random values keep a mistake in
        # handling the padded positions from going unnoticed.
        with torch.no_grad():
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()
    with _seeded(seed, 2):
        vae = _flow_vae(scaling_factor=0.3611, shift_factor=0.1159, sample_size=1024)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _flux2_vae_and_scheduler(seed: int) -> tuple[AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler]:
    with _seeded(seed, 2):
        vae = AutoencoderKLFlux2(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=32,
            sample_size=1024,
        )
        # Real batch-norm statistics are far from (0, 1); random ones make a decoder that skips
        # or repeats the un-normalization fail the parity tests.
        with torch.no_grad():
            vae.bn.running_mean.normal_()
            vae.bn.running_var.uniform_(0.5, 2.0)
    # FLUX.2's scheduler: the pipeline passes an empirical mu for the time shift.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )
    return vae, scheduler


def _build_flux2(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """FLUX.2-dev layout: Mistral Small 3.1 as text encoder, Flux2 MMDiT, 32-channel VAE.

    The pipeline stacks the text encoder's hidden states 10, 20 and 30 on the feature
    axis, so the encoder keeps the real depth (40 layers, each tiny) and the denoiser's
    text width is 3 x hidden. Its default size is fixed at 1024x1024.
    """
    tokenizer = _mistral_tokenizer()
    hidden, depth = 32, 40
    with _seeded(seed, 0):
        layers, ffn = (depth, hidden * 2)
        if text_encoder_scale > 1:
            layers, ffn = _scaled_ffn(hidden, text_encoder_scale, 3, min_layers=depth)
        ids = tokenizer.convert_tokens_to_ids
        config = Mistral3Config(
            text_config={
                "model_type": "mistral",
                "vocab_size": len(tokenizer),
                "hidden_size": hidden,
                "intermediate_size": ffn,
                "num_hidden_layers": layers,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 8,
                "max_position_embeddings": 131072,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000000.0},
                "sliding_window": None,
                "bos_token_id": ids("<s>"),
                "eos_token_id": ids("</s>"),
                "pad_token_id": ids("<pad>"),
            },
            # The Pixtral vision tower is never run for text-to-image, but the class needs one.
            vision_config={
                "model_type": "pixtral",
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 64,
                "patch_size": 16,
            },
            image_token_index=ids("[IMG]"),
            tie_word_embeddings=False,
        )
        text_encoder = Mistral3ForConditionalGeneration(config)
    with _seeded(seed, 1):
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=128,  # 32 latent channels packed as 2x2 patches
            num_layers=1,
            num_single_layers=2,
            num_attention_heads=2,
            attention_head_dim=16,
            joint_attention_dim=3 * hidden,
            timestep_guidance_channels=256,
            mlp_ratio=3.0,
            axes_dims_rope=(4, 4, 4, 4),  # RoPE splits the head dim over (t, y, x, text id)
            rope_theta=2000,
            guidance_embeds=True,
        )
    vae, scheduler = _flux2_vae_and_scheduler(seed)
    return Flux2Pipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _build_flux2_klein(seed: int, text_encoder_scale: int) -> DiffusionPipeline:
    """FLUX.2-klein layout: Qwen3 as text encoder, Flux2 MMDiT without guidance input, 32-channel VAE.

    The pipeline stacks Qwen3's hidden states 9, 18 and 27, so the encoder has 28 (tiny) layers
    and the denoiser's text width is 3 x hidden. Not step-distilled, so classifier-free guidance
    runs. Its default size is fixed at 1024x1024.
    """
    tokenizer = _qwen_tokenizer(chat_template=_QWEN3_CHAT_TEMPLATE)
    hidden, depth = 32, 28
    with _seeded(seed, 0):
        layers, ffn = (depth, hidden * 2)
        if text_encoder_scale > 1:
            layers, ffn = _scaled_ffn(hidden, text_encoder_scale, 3, min_layers=depth)
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=hidden,
                intermediate_size=ffn,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                max_position_embeddings=40960,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                tie_word_embeddings=True,
                bos_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    with _seeded(seed, 1):
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=128,  # 32 latent channels packed as 2x2 patches
            num_layers=1,
            num_single_layers=2,
            num_attention_heads=2,
            attention_head_dim=16,
            joint_attention_dim=3 * hidden,
            timestep_guidance_channels=256,
            mlp_ratio=3.0,
            axes_dims_rope=(4, 4, 4, 4),  # RoPE splits the head dim over (t, y, x, text id)
            rope_theta=2000,
            guidance_embeds=False,  # klein takes no distilled guidance; it runs real CFG
        )
    vae, scheduler = _flux2_vae_and_scheduler(seed)
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )


_BUILDERS: dict[str, Callable[[int, int], DiffusionPipeline]] = {
    "sd": _build_sd,
    "pixart-alpha": _build_pixart_alpha,
    "pixart-sigma": _build_pixart_sigma,
    "sdxl": _build_sdxl,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "sana": _build_sana,
    "qwenimage": _build_qwenimage,
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
