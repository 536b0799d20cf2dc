"""Starting a denoiser node: its flags, its batching, its speed options."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from protocol.stages import DENOISER
from triptych.families.lora import adapters_from_args, add_lora_arguments
from triptych.node_runner import NodeContext, NodeService, NodeStartError, run_node

if TYPE_CHECKING:
    from denoiser_node.step_cache import StepCaches
    from triptych.families.loading import LoadedStage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from denoiser_node.fit import add_fit_arguments
    from denoiser_node.speed import add_speed_arguments
    from denoiser_node.step_cache import add_step_cache_argument

    parser.add_argument(
        "--max-batch", type=int, default=4, help="compatible requests denoised together, at most (default 4)"
    )
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=20.0,
        help="how long a batch waits for compatible requests to join it (default 20 ms)",
    )
    add_speed_arguments(parser)
    add_fit_arguments(parser)
    add_lora_arguments(parser, hotswap=True)
    add_step_cache_argument(parser)


def build(node: NodeContext) -> NodeService:
    from denoiser_node.fit import denoiser_loader, fit_from_args
    from denoiser_node.handler import DenoiserHandler
    from denoiser_node.speed import SpeedOptions, apply_to_denoiser

    args = node.args
    if args.max_batch < 1:
        raise NodeStartError(f"--max-batch must be at least 1 (got {args.max_batch})")
    if args.batch_window_ms < 0:
        raise NodeStartError(f"--batch-window-ms must be 0 or more (got {args.batch_window_ms:g})")
    fit = fit_from_args(args, args.model, node.family, node.device, node.dtype)  # quantized, GGUF, offloaded
    stage = node.load(denoiser=denoiser_loader(fit))
    name = stage.family.denoiser_attr
    adapters = adapters_from_args(args, stage.pipe, (name,))
    if adapters is not None and args.compile:
        adapters.enable_hotswap(args.lora_max_rank)  # before compiling: swapping adapters then keeps the graph
    setattr(stage.pipe, name, apply_to_denoiser(getattr(stage.pipe, name), node.device, SpeedOptions.from_args(args)))
    step_caches = _step_caches(stage, args)
    handler = DenoiserHandler(stage, adapters, step_caches)
    info = node.info() | fit.info(node.dtype) | {"max_batch": args.max_batch, "samplers": list(stage.family.samplers)}
    info |= {"step_caches": step_caches.kinds(), "step_cache": str(step_caches.default or "off")}
    if adapters is not None:
        info["loras"] = adapters.folder.names()  # as at start; requests may name files added since
    return NodeService(
        handler=handler,
        info=info,
        capacity=2 * args.max_batch,  # the next batch waits here while this one runs
        max_batch=args.max_batch,
        batch_window=args.batch_window_ms / 1000,
        batch_key=handler.batch_key,
        stats=handler.stats,
    )


def _step_caches(stage: LoadedStage, args: argparse.Namespace) -> StepCaches:
    """The step caches of --step-cache (the default of requests that name none); a bad one stops the node."""
    from denoiser_node.step_cache import StepCaches, parse_step_cache
    from protocol.errors import RequestError

    try:
        return StepCaches(stage, parse_step_cache(args.step_cache, field="--step-cache"), compiled=bool(args.compile))
    except RequestError as exc:
        raise NodeStartError(f"--step-cache: {exc}") from None


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_node(DENOISER, add_arguments, build, argv, prog)
