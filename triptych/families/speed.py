"""Speed and memory options from diffusers' own optimization guides, applied after loading.

None is on by default except TF32 matmuls on CUDA (a free speed-up for float32 work that
diffusers' guides recommend); each is a node flag so it can be measured before it is trusted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedOptions:
    compile: str | None = None  # torch.compile mode for the denoiser ("default", "max-autotune"...)
    channels_last: bool = False  # UNet convolutions in NHWC
    fuse_qkv: bool = False  # one matmul for the attention projections
    attention_backend: str | None = None  # diffusers attention dispatcher backend ("native", "flash"...)
    tf32: bool = True  # TF32 matmuls on CUDA
    vae_tiling: bool = False  # decode big images tile by tile
    vae_slicing: bool = False  # decode a batch one image at a time
    tiny_vae: str | None = None  # an AutoencoderTiny (TAESD) folder or hub id, for fast previews


def apply_to_denoiser(denoiser: torch.nn.Module, device: str, options: SpeedOptions) -> torch.nn.Module:
    if device.startswith("cuda") and options.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if options.fuse_qkv:
        denoiser.fuse_qkv_projections()
    if options.attention_backend:
        denoiser.set_attention_backend(options.attention_backend)
    if options.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if options.compile:
        logger.info("compiling the denoiser (mode %s); the first requests are slow", options.compile)
        denoiser = torch.compile(denoiser, mode=None if options.compile == "default" else options.compile)
    return denoiser


def apply_to_decoder(pipe: Any, options: SpeedOptions) -> None:
    if options.tiny_vae:
        from diffusers import AutoencoderTiny

        pipe.vae = AutoencoderTiny.from_pretrained(options.tiny_vae).to(pipe.vae.device, pipe.vae.dtype)
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.vae_slicing:
        pipe.vae.enable_slicing()
