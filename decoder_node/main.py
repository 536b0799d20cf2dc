"""Starting a decoder node: its flags and its VAE options."""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Sequence
from typing import Any

from protocol.stages import DECODER
from triptych.node_runner import NodeContext, NodeService, NodeStartError, run_node

logger = logging.getLogger(__name__)

# An image larger than this is decoded tile by tile even without --vae-tiling: a whole decode's
# activations grow with the image (gigabytes at 2048 x 2048) and can take the node down.
AUTO_TILING_PIXELS = 2048 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae-tiling", action="store_true", help="decode large images tile by tile")
    parser.add_argument("--vae-slicing", action="store_true", help="decode batches one image at a time")
    parser.add_argument("--tiny-vae", metavar="PATH", help="AutoencoderTiny (TAESD) folder/hub id for previews")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        metavar="MODE",
        help="torch.compile the VAE decoder (inductor; on a CPU it needs a C++ compiler); MODE as torch.compile's",
    )
    parser.add_argument("--channels-last", action="store_true", help="the VAE's convolutions in channels-last layout")


def check_vae_options(args: argparse.Namespace, device: str) -> None:
    """Refuse what cannot work before any weights are read."""
    if args.compile is not None and device == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise NodeStartError(
            "--compile on the CPU needs a C++ compiler (g++ or clang++) on PATH: install one or leave it out"
        )


def speed_up_vae(vae: Any, compile_mode: str | None = None, channels_last: bool = False) -> None:
    """The decoder's speed options on ``vae``: channels-last weights, a compiled decoder network.

    Only the decoding half is compiled (``vae.decoder``): encoding images in stays eager.
    """
    import torch

    if channels_last:
        if any(isinstance(m, torch.nn.Conv3d) for m in vae.modules()):
            raise NodeStartError(
                f"--channels-last: {type(vae).__name__} has 3-D convolutions (a video-shaped VAE); leave it out"
            )
        vae.to(memory_format=torch.channels_last)
    if compile_mode is not None:
        options = {} if compile_mode == "default" else {"mode": compile_mode}
        vae.decoder = torch.compile(vae.decoder, **options)
        logger.info("--compile: the VAE decoder compiles on its first image of each size")


def apply_vae_options(pipe: Any, args: argparse.Namespace) -> None:
    if args.tiny_vae:
        from diffusers import AutoencoderTiny

        pipe.vae = AutoencoderTiny.from_pretrained(args.tiny_vae).to(pipe.vae.device, pipe.vae.dtype)
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    if args.vae_slicing:
        pipe.vae.enable_slicing()
    speed_up_vae(pipe.vae, getattr(args, "compile", None), getattr(args, "channels_last", False))
    tile_large_images(pipe.vae)


def tile_large_images(vae: Any, pixels: int = AUTO_TILING_PIXELS) -> None:
    """Make ``vae.decode`` decode in tiles an image above ``pixels`` pixels; smaller ones as before
    (whole, as diffusers' pipeline does, unless tiling was asked for)."""
    if not hasattr(vae, "use_tiling"):
        return
    decode, asked = vae.decode, vae.use_tiling
    blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
    scale = getattr(vae, "spatial_compression_ratio", None) or (2 ** (len(blocks) - 1) if blocks else 8)

    def decode_tiled_when_large(latents: Any, *args: Any, **kwargs: Any) -> Any:
        vae.use_tiling = asked or latents.shape[-2] * latents.shape[-1] * scale * scale > pixels
        try:
            return decode(latents, *args, **kwargs)
        finally:
            vae.use_tiling = asked

    vae.decode = decode_tiled_when_large


def _denoiser_config(node: NodeContext) -> dict | None:
    """What encoding images in needs to know of the denoiser (its sample size, its input channels)."""
    from triptych.families.loading import denoiser_config

    try:
        return denoiser_config(node.args.model, node.family)
    except (OSError, ValueError):
        return None


def build(node: NodeContext) -> NodeService:
    from decoder_node.handler import DecoderHandler

    check_vae_options(node.args, node.device)
    stage = node.load()
    apply_vae_options(stage.pipe, node.args)
    handler = DecoderHandler(stage, _denoiser_config(node))
    info = node.info()
    if node.args.compile is not None:
        info["compile"] = node.args.compile
    if node.args.channels_last:
        info["channels_last"] = "on"
    return NodeService(handler=handler, info=info, stats=handler.stats)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_node(DECODER, add_arguments, build, argv, prog)
