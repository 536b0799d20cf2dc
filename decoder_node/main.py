"""Starting a decoder node: its flags and its VAE options."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from protocol.stages import DECODER
from triptych.node_runner import NodeContext, NodeService, run_node

# An image larger than this is decoded tile by tile even without --vae-tiling: a whole decode's
# activations grow with the image (gigabytes at 2048 x 2048) and can take the node down.
AUTO_TILING_PIXELS = 2048 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae-tiling", action="store_true", help="decode large images tile by tile")
    parser.add_argument("--vae-slicing", action="store_true", help="decode batches one image at a time")
    parser.add_argument("--tiny-vae", metavar="PATH", help="AutoencoderTiny (TAESD) folder/hub id for previews")


def apply_vae_options(pipe: Any, args: argparse.Namespace) -> None:
    if args.tiny_vae:
        from diffusers import AutoencoderTiny

        pipe.vae = AutoencoderTiny.from_pretrained(args.tiny_vae).to(pipe.vae.device, pipe.vae.dtype)
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    if args.vae_slicing:
        pipe.vae.enable_slicing()
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

    stage = node.load()
    apply_vae_options(stage.pipe, node.args)
    handler = DecoderHandler(stage, _denoiser_config(node))
    return NodeService(handler=handler, info=node.info(), stats=handler.stats)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_node(DECODER, add_arguments, build, argv, prog)
