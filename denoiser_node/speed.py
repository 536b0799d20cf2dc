"""Speed options from diffusers' own optimization guides, applied to the denoiser after loading.

None is on by default except TF32 matmuls on CUDA (a free speed-up for float32 work that
diffusers' guides recommend); each is a node flag so it can be measured before it is trusted.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedOptions:
    compile: str | None = None  # torch.compile mode for the denoiser ("default", "max-autotune"...)
    channels_last: bool = False  # UNet convolutions in NHWC
    fuse_qkv: bool = False  # one matmul for the attention projections
    attention_backend: str | None = None  # diffusers attention dispatcher backend ("native", "flash"...)
    tf32: bool = True  # TF32 matmuls on CUDA

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SpeedOptions:
        return cls(
            compile=args.compile,
            channels_last=args.channels_last,
            fuse_qkv=args.fuse_qkv,
            attention_backend=args.attention_backend,
            tf32=not args.no_tf32,
        )


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        metavar="MODE",
        help="torch.compile the denoiser (optional mode: max-autotune, reduce-overhead...)",
    )
    parser.add_argument("--channels-last", action="store_true", help="UNet convolutions in channels-last layout")
    parser.add_argument("--fuse-qkv", action="store_true", help="fuse attention QKV projections")
    parser.add_argument("--attention-backend", help="diffusers attention backend (native, flash, sage...)")
    parser.add_argument("--no-tf32", action="store_true", help="keep float32 matmuls exact on CUDA")


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
