"""Starting a decoder node: its flags and its VAE options."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from protocol.stages import DECODER
from triptych.node_runner import NodeContext, NodeService, run_node


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
