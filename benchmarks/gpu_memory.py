"""GPU memory and speed: triptych's denoiser node against diffusers on one GPU.

For each model, a pipeline of the published architecture is built with random weights (the
configs are written below; nothing is downloaded) directly on the GPU in its usual dtype, then
measured three ways in one run:

  (a) triptych's denoiser node: the pipeline written to a checkpoint folder holding only what
      a denoiser node reads (model_index.json, the family's denoiser components, the VAE's
      config), loaded by the node's own loader (``load_stage``: the UNet/transformer and the
      scheduler on the GPU, nothing else) and run through the family's ``denoise`` on
      precomputed embeddings, as the node runs it. Peak ``torch.cuda.max_memory_allocated``
      and seconds per image: the GPU's time per image, since the encoder and decoder nodes
      run elsewhere, on other requests meanwhile. The floor it is held to: the denoiser's
      weight bytes plus the activations of one forward pass of the denoiser, replayed alone
      on the inputs of the pipeline's first step.
  (b) diffusers with every component on the GPU: peak memory and seconds per image
      (text encoding, denoising and VAE decoding of one image).
  (c) diffusers with ``enable_model_cpu_offload()``: seconds per image.

Ratios printed, with their targets: (a) peak / (weights + one step's activations) <= 1.15;
(a) s/image / (b) s/image <= 1.03; (c) s/image / (a) s/image >= 3. (a) needs a triptych
family for the pipeline; without one, the output says so and only (b) and (c) are measured.

At full size the GPU must hold all of FLUX.1-dev (a 34 GiB peak in (b)); the run takes about
36 GB of RAM, 24 GB of disk for FLUX's denoiser checkpoint (``--workdir`` puts it elsewhere than
the temp folder) and about 4 minutes on an H100.

    python benchmarks/gpu_memory.py --json meter.json                  # all models, CUDA
    python benchmarks/gpu_memory.py --models pixart,sdxl --steps 20
    python benchmarks/gpu_memory.py --tiny                           # tiny configs; CPU works
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from benchlib import describe, machine, table, verdict, write_json

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # notices about optional packages
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # e.g. clean_caption needing Beautiful Soup
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # saving and loading checkpoints

PROMPT = "a photo of a red fox in the snow, highly detailed"
GiB = 2**30
TARGET_MEMORY = 1.15  # (a) peak <= this x (weights + one step's activations)
TARGET_SPEED = 1.03  # (a) s/image <= this x (b) s/image
TARGET_OFFLOAD = 3.0  # (c) s/image >= this x (a) s/image


# --- published configs (full) and miniature ones (--tiny) -----------------------------------

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

    from triptych.tiny import _pixart_scheduler, _t5_tokenizer

    with built_on(device, dtype):
        text_encoder = _t5(T5_TINY if tiny else T5_XXL)
        vae = AutoencoderKL(**{**SD_VAE, "sample_size": 512, **(VAE_TINY if tiny else {})})
        transformer = PixArtTransformer2DModel(**(PIXART_TINY if tiny else PIXART_XL_2_1024))
    return PixArtAlphaPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=_pixart_scheduler(),
    )


def build_sdxl(tiny: bool, device: str, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from triptych.tiny import _clip_tokenizer

    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer(pad_token="!")  # bigG's tokenizer pads with "!"
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
        scheduler=EulerDiscreteScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_flux(tiny: bool, device: str, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from triptych.tiny import _clip_tokenizer, _t5_tokenizer

    tokenizer = _clip_tokenizer()
    with built_on(device, dtype):
        text_encoder = CLIPTextModel(_clip_config(tokenizer, CLIP_L_TINY if tiny else CLIP_L))
        text_encoder_2 = _t5(T5_TINY if tiny else T5_XXL)
        transformer = FluxTransformer2DModel(**(FLUX_TINY if tiny else FLUX_DEV))
        vae = AutoencoderKL(**{**FLUX_VAE, "sample_size": 1024, **(VAE_TINY if tiny else {})})
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=_t5_tokenizer(),
        transformer=transformer,
    )


# --- triptych's denoiser stage -------------------------------------------------------------


def family_of(pipe: Any) -> Any | None:
    """triptych's family for the pipeline's class, or None when triptych has none."""
    from triptych.families import UnsupportedModel, family_for_pipeline

    try:
        return family_for_pipeline(type(pipe).__name__)
    except UnsupportedModel:
        return None


def save_denoiser_checkpoint(pipe: Any, family: Any, folder: Path) -> Path:
    """A checkpoint folder holding what a denoiser node reads: model_index.json, the family's
    denoiser components and the VAE's config.json (for the latent scale), nothing else."""
    from triptych.families import DENOISE

    pipe.save_config(folder)
    for name in family.components[DENOISE]:
        getattr(pipe, name).save_pretrained(folder / name)
    pipe.vae.save_config(folder / "vae")
    return folder


# --- measuring ------------------------------------------------------------------------------


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class Meter:
    """Synchronised timing and peak-memory readings; on a CPU, timings only."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated() if self.cuda else None

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.cuda else None

    def per_image(self, run: Callable[[int], Any], images: int, warmup: int) -> tuple[float, int | None]:
        """(seconds per image, peak bytes) over ``images`` calls after ``warmup`` untimed ones."""
        for i in range(warmup):
            run(1000 + i)
        self.reset()
        start = time.perf_counter()
        for i in range(images):
            run(i)
        self.sync()
        return (time.perf_counter() - start) / images, self.peak()


class FirstCall:
    """Keeps a copy of the inputs of a module's first forward call, then unhooks itself."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.captured = False
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # Kept on the CPU, so the copy takes no GPU memory while the timed runs measure their peak.
        self.args, self.kwargs = _moved(args, "cpu"), _moved(kwargs, "cpu")
        self.captured = True
        self._handle.remove()

    def inputs(self, device: str) -> tuple[tuple, dict]:
        if not self.captured:
            raise RuntimeError("the denoiser was never called")
        return _moved(self.args, device), _moved(self.kwargs, device)


def _moved(value: Any, device: str) -> Any:
    """A copy of tensors (also inside dicts, lists and tuples) on ``device``; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_moved(v, device) for v in value)
    return value


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


def measure(key: str, args: argparse.Namespace, device: str) -> dict:
    spec = SPECS[key]
    meter = Meter(device)
    dtype = spec.dtype if meter.cuda else torch.float32  # half precision on a CPU is slow and partial
    steps = args.steps or (2 if args.tiny else spec.steps)
    size = spec.tiny_size if args.tiny else spec.size
    images, warmup = args.images, args.warmup
    result: dict[str, Any] = {"model": spec.name, "dtype": str(dtype).removeprefix("torch."), "steps": steps}
    result["size"] = f"{size}x{size}"

    meter.reset()
    start = time.perf_counter()
    pipe = spec.build(args.tiny, device, dtype)
    pipe.to(device, dtype)  # buffers some modules create in float32
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # built modules start in training mode (dropout); loaded ones do not
    pipe.set_progress_bar_config(disable=True)
    meter.sync()
    result["build_s"] = time.perf_counter() - start
    result["pipeline"] = type(pipe).__name__
    family = family_of(pipe)
    result["family"] = family.name if family is not None else None
    result["weights_gib"] = {
        name: weight_bytes(module) / GiB
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }
    # Unset options take the pipeline's defaults, on both sides (guidance, sequence length...).
    request = {"model": key, "prompt": PROMPT, "negative_prompt": None, "steps": steps, "guidance": None}
    request |= {"height": size, "width": size, "seed": 0, "num_images": 1}
    call = {"num_inference_steps": steps, "height": size, "width": size}

    with torch.inference_mode(), tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        embeds = None
        if family is not None:
            # What the encoder node sends: computed here on the GPU, moved to the CPU like the wire.
            embeds = {name: t.cpu() for name, t in family.encode(pipe, request).items()}
            result["embeddings"] = {name: list(t.shape) for name, t in embeds.items()}

        # (b) diffusers, every component on the GPU
        def whole(seed: int) -> Any:
            return pipe(PROMPT, **call, generator=torch.Generator("cpu").manual_seed(seed)).images

        result["all_on_gpu_s"], peak = meter.per_image(whole, images, warmup)
        result["all_on_gpu_peak_gib"] = None if peak is None else peak / GiB

        # (c) diffusers with model CPU offload (accelerate moves each model to the GPU when it runs)
        result["offload_s"] = result["offload_peak_gib"] = None
        if meter.cuda and not args.skip_offload:
            pipe.enable_model_cpu_offload()
            result["offload_s"], peak = meter.per_image(whole, args.offload_images, warmup)
            result["offload_peak_gib"] = peak / GiB
            pipe.remove_all_hooks()
        pipe.to("cpu")

        if family is not None:
            folder = save_denoiser_checkpoint(pipe, family, Path(workdir) / key)
            pipe = None
            result.update(measure_denoiser(meter, folder, device, dtype, embeds, request, images, warmup))
    pipe = embeds = None
    meter.reset()
    result.update(ratios(result))
    return result


def measure_denoiser(
    meter: Meter, folder: Path, device: str, dtype: torch.dtype, embeds: dict, request: dict, images: int, warmup: int
) -> dict[str, Any]:
    """(a): the stage loaded by the denoiser node's own loader, denoising through its family."""
    from triptych.families import DENOISE
    from triptych.families.loading import load_stage

    result: dict[str, Any] = {}
    meter.reset()
    result["resident_before_gib"] = meter.allocated() / GiB if meter.cuda else None
    stage = load_stage(str(folder), DENOISE, device=device, dtype=dtype)
    family, pipe = stage.family, stage.pipe
    denoiser = getattr(pipe, family.denoiser_attr)
    result["denoiser_weights_gib"] = weight_bytes(denoiser) / GiB
    first = FirstCall(denoiser)

    def denoise(seed: int) -> Any:
        return family.denoise(pipe, [(embeds, {**request, "seed": seed})], lambda step, total: None)

    result["triptych_s"], peak = meter.per_image(denoise, images, max(warmup, 1))
    result["triptych_peak_gib"] = None if peak is None else peak / GiB

    # One step: the denoiser's forward pass alone, on the inputs of the pipeline's first step.
    inputs, kwargs = first.inputs(device)
    meter.reset()
    before = meter.allocated()
    denoiser(*inputs, **kwargs)
    meter.sync()
    if meter.cuda:
        result["one_step_activations_gib"] = (meter.peak() - before) / GiB
        result["floor_gib"] = result["denoiser_weights_gib"] + result["one_step_activations_gib"]
    return result


def ratios(r: dict) -> dict[str, Any]:
    values = {"peak_over_floor": None, "triptych_over_all_on_gpu_s": None, "offload_over_triptych_s": None}
    if r.get("triptych_s") is not None:
        values["triptych_over_all_on_gpu_s"] = r["triptych_s"] / r["all_on_gpu_s"]
        if r.get("floor_gib"):
            values["peak_over_floor"] = r["triptych_peak_gib"] / r["floor_gib"]
        if r.get("offload_s") is not None:
            values["offload_over_triptych_s"] = r["offload_s"] / r["triptych_s"]
    met = {
        "peak_over_floor": lambda v: v <= TARGET_MEMORY,
        "triptych_over_all_on_gpu_s": lambda v: v <= TARGET_SPEED,
        "offload_over_triptych_s": lambda v: v >= TARGET_OFFLOAD,
    }
    return {
        "ratios": values,
        "targets_met": {name: None if v is None else met[name](v) for name, v in values.items()},
    }


def report(key: str, r: dict) -> None:
    def gib(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    family = r["family"] or f"none: triptych has no family for {r['pipeline']}, so (a) is not measured"
    print(f"\n== {r['model']} ({key}): {r['size']}, {r['steps']} steps, {r['dtype']}; triptych family: {family}")
    weights = ", ".join(f"{name} {size:.2f}" for name, size in r["weights_gib"].items())
    print(f"weights GiB: {weights}; built in {r['build_s']:.1f}s")
    print(
        table(
            ["setup", "peak GiB", "s/image"],
            [
                ["(a) triptych denoiser node (denoise only)", gib(r.get("triptych_peak_gib")), r.get("triptych_s")],
                ["    floor: denoiser weights + one step's activations", gib(r.get("floor_gib")), None],
                ["(b) diffusers, all on GPU (encode+denoise+decode)", gib(r["all_on_gpu_peak_gib"]), r["all_on_gpu_s"]],
                ["(c) diffusers, enable_model_cpu_offload", gib(r["offload_peak_gib"]), r["offload_s"]],
            ],
        )
    )
    if r.get("triptych_s") is not None:
        print(
            f"GPU memory in use before the denoiser stage loaded {gib(r['resident_before_gib'])} GiB; "
            f"denoiser weights {gib(r['denoiser_weights_gib'])} GiB; "
            f"one step's activations {gib(r.get('one_step_activations_gib'))} GiB"
        )
    ratios, met = r["ratios"], r["targets_met"]
    lines = [
        ("peak_over_floor", "(a) peak / (weights + one step)", f"<= {TARGET_MEMORY}"),
        ("triptych_over_all_on_gpu_s", "(a) s/image / (b) s/image", f"<= {TARGET_SPEED}"),
        ("offload_over_triptych_s", "(c) s/image / (a) s/image", f">= {TARGET_OFFLOAD:g}"),
    ]
    for name, label, target in lines:
        value = "n/a" if ratios[name] is None else f"{ratios[name]:.3f}"
        print(f"result: {key} {label} = {value} (target {target}: {verdict(met[name])})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", default="pixart,sdxl,flux", help="comma-separated: pixart, sdxl, flux (default all)"
    )
    parser.add_argument("--steps", type=int, help="denoising steps (default 20; 2 with --tiny)")
    parser.add_argument("--images", type=int, default=2, help="timed images per setup (default 2)")
    parser.add_argument("--offload-images", type=int, default=1, help="timed images with CPU offload (default 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed images first, per setup (default 1)")
    parser.add_argument("--skip-offload", action="store_true", help="leave out (c)")
    parser.add_argument("--device", help="default cuda when available, else cpu")
    parser.add_argument(
        "--workdir", help="where the denoiser's checkpoint is written for its loader (default: the temp folder)"
    )
    parser.add_argument("--tiny", "--smoke", action="store_true", help="miniature configs: a check that it runs")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    keys = [key.strip() for key in args.models.split(",") if key.strip()]
    unknown = [key for key in keys if key not in SPECS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(SPECS)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        # As the denoiser node does on CUDA by default; set for every setup alike.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        print("no CUDA: timings only, no memory figures and no CPU offload (the figures that matter need a GPU)")
        if args.tiny:
            torch.set_num_threads(1)  # miniature models are per-op overhead; a second thread only waits
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # random weights give NaN pixels in fp16
    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' deprecation notices
    info = machine()
    print(f"gpu_memory benchmark | {describe(info)} | device {device}")
    results = {}
    for key in keys:
        results[key] = measure(key, args, device)
        report(key, results[key])
    write_json(
        args.json,
        {"benchmark": "gpu_memory", "mode": "tiny" if args.tiny else "full", "machine": info, "models": results},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
