"""Starting an encoder node: its flags and what it loads."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from protocol.stages import ENCODER
from triptych.families.lora import TEXT_ENCODERS, adapters_from_args, add_lora_arguments
from triptych.node_runner import NodeContext, NodeService, NodeStartError, run_node

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-mb", type=int, default=1024, help="memory for cached prompt embeddings (default 1024 MB)"
    )
    parser.add_argument(
        "--no-t5", action="store_true", help="SD3 only: leave T5 out, its tokens become zeros (saves ~9.5 GB)"
    )
    add_lora_arguments(parser)  # the text-encoder parts of adapters


def build(node: NodeContext) -> NodeService:
    from encoder_node.handler import EncoderHandler

    no_t5 = node.args.no_t5
    if no_t5 and not node.family.optional_t5:
        raise NodeStartError(f"--no-t5: {node.family.name} cannot run without its T5 encoder")
    if node.args.cache_mb < 0:
        raise NodeStartError(f"--cache-mb must be 0 or more (got {node.args.cache_mb})")
    stage = node.load(no_t5=no_t5)
    adapters = adapters_from_args(node.args, stage.pipe, TEXT_ENCODERS)
    if adapters is not None and not adapters.parts:
        logger.info("%s takes no text-encoder LoRA layers: --lora-dir has nothing to do here", node.family.name)
        adapters = None
    handler = EncoderHandler(stage, cache_bytes=node.args.cache_mb << 20, adapters=adapters)
    info = node.info() | ({"t5": "left out"} if no_t5 else {})
    if adapters is not None:
        info["loras"] = adapters.folder.names()
    return NodeService(handler=handler, info=info, stats=handler.stats)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_node(ENCODER, add_arguments, build, argv, prog)
