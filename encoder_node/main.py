"""Starting an encoder node: its flags and what it loads."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from protocol.stages import ENCODER
from triptych.families.lora import TEXT_ENCODERS, adapters_from_args, add_lora_arguments
from triptych.node_runner import NodeContext, NodeService, NodeStartError, run_node

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

QUANTIZE = ("none", "int8")  # --quantize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-mb", type=int, default=1024, help="memory for cached prompt embeddings (default 1024 MB)"
    )
    parser.add_argument(
        "--no-t5", action="store_true", help="SD3 only: leave T5 out, its tokens become zeros (saves ~9.5 GB)"
    )
    parser.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE,
        help="int8: the T5 / LLM text encoders' linear layers in dynamic int8 (CPU; the CLIPs are left as they are)",
    )
    add_lora_arguments(parser)  # the text-encoder parts of adapters


def _precision(node: NodeContext) -> tuple[dict[str, torch.dtype] | None, list[str]]:
    """The per-encoder load dtypes (None: the node's one dtype) and the encoders to quantize."""
    import torch

    from encoder_node.precision import (
        choose_dtypes,
        cpu_flags,
        describe_choice,
        is_quantizable,
        native_bfloat16,
        parameter_count,
        text_encoders,
    )
    from triptych.families.loading import read_model_index

    args = node.args
    encoders = text_encoders(read_model_index(args.model), node.family.components[ENCODER])
    if args.no_t5:
        encoders = {name: cls for name, cls in encoders.items() if name not in node.family.optional_t5}
    quantized = [name for name, cls in encoders.items() if is_quantizable(cls)] if args.quantize == "int8" else []
    if args.quantize == "int8":
        if node.device != "cpu":
            raise NodeStartError(f"--quantize int8 runs on the CPU only (got --device {node.device})")
        if args.dtype not in ("auto", "float32"):
            raise NodeStartError(
                f"--quantize int8 computes in float32 around its int8 layers: use --dtype auto or float32 "
                f"(got --dtype {args.dtype})"
            )
        if args.lora_dir:
            raise NodeStartError("--quantize int8 and --lora-dir: text-encoder LoRA layers cannot wrap int8 layers")
        if not quantized:
            raise NodeStartError(f"--quantize int8: {node.family.name} has no T5 or LLM text encoder to quantize")
    if args.dtype != "auto" or node.device != "cpu":
        return None, quantized
    flags = cpu_flags()
    sizes = {name: parameter_count(args.model, name, cls) for name, cls in encoders.items()}
    chosen = choose_dtypes(sizes, node.device, flags)
    for name in quantized:
        # int8 layers are made from the loaded weights: reading them in bfloat16 halves the peak.
        chosen[name] = torch.bfloat16 if native_bfloat16(flags) else torch.float32
    logger.info(describe_choice(sizes, chosen, flags))
    return chosen, quantized


def build(node: NodeContext) -> NodeService:
    from encoder_node.handler import EncoderHandler
    from encoder_node.precision import quantize_int8

    no_t5 = node.args.no_t5
    if no_t5 and not node.family.optional_t5:
        raise NodeStartError(f"--no-t5: {node.family.name} cannot run without its T5 encoder")
    if node.args.cache_mb < 0:
        raise NodeStartError(f"--cache-mb must be 0 or more (got {node.args.cache_mb})")
    dtypes, quantized = _precision(node)
    stage = node.load(no_t5=no_t5, **({"dtype": dtypes} if dtypes is not None else {}))
    for name in quantized:
        module = getattr(stage.pipe, name, None)
        if module is not None:  # None: left out by --no-t5
            layers = quantize_int8(module)
            logger.info("--quantize int8: %s (%s), %d linear layers in int8", name, type(module).__name__, layers)
    adapters = adapters_from_args(node.args, stage.pipe, TEXT_ENCODERS)
    if adapters is not None and not adapters.parts:
        logger.info("%s takes no text-encoder LoRA layers: --lora-dir has nothing to do here", node.family.name)
        adapters = None
    handler = EncoderHandler(stage, cache_bytes=node.args.cache_mb << 20, adapters=adapters)
    info = node.info() | ({"t5": "left out"} if no_t5 else {}) | _dtype_info(stage.pipe, quantized)
    if adapters is not None:
        info["loras"] = adapters.folder.names()
    return NodeService(handler=handler, info=info, stats=handler.stats)


def _dtype_info(pipe: Any, quantized: list[str]) -> dict[str, str]:
    """What each text encoder computes in, for `triptych status`: e.g. "text_encoder=float32 text_encoder_2=int8"."""
    import torch

    parts = []
    for name, module in sorted(pipe.components.items()):
        if name.startswith("text_encoder") and isinstance(module, torch.nn.Module):
            parts.append(f"{name}={'int8' if name in quantized else str(module.dtype).removeprefix('torch.')}")
    return {"text_encoders": " ".join(parts)} if parts else {}


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_node(ENCODER, add_arguments, build, argv, prog)
