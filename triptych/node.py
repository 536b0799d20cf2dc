"""Starting a node: load its stage of the model, then serve jobs from the broker until stopped."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.allocator import keep_freed_buffers
from protocol.messages import DECODER, DENOISER, ENCODER
from protocol.security import Curve
from protocol.worker import Handler, Worker
from triptych.families.speed import SpeedOptions

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_BROKER = "tcp://127.0.0.1:5555"
DTYPES = ("auto", "float32", "float16", "bfloat16")


def add_node_arguments(parser: argparse.ArgumentParser, service: str) -> None:
    default_device = "auto" if service == DENOISER else "cpu"
    parser.add_argument("--model", required=True, help="hub id or local folder of a diffusers pipeline")
    parser.add_argument("--name", help="name the model is served under (default: folder name or hub id)")
    parser.add_argument("--broker", default=DEFAULT_BROKER, help=f"broker address (default {DEFAULT_BROKER})")
    parser.add_argument(
        "--device", default=default_device, help=f"torch device (default {default_device}; auto = cuda if available)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="weights dtype (default auto: float32 on CPU, the family's own on CUDA)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    if service == ENCODER:
        parser.add_argument(
            "--cache-mb", type=int, default=1024, help="memory for cached prompt embeddings (default 1024 MB)"
        )
        parser.add_argument(
            "--no-t5", action="store_true", help="SD3 only: leave T5 out, its tokens become zeros (saves ~9.5 GB)"
        )
    if service == DENOISER:
        parser.add_argument(
            "--max-batch", type=int, default=4, help="compatible requests denoised together, at most (default 4)"
        )
        parser.add_argument(
            "--batch-window-ms",
            type=float,
            default=20.0,
            help="how long a batch waits for compatible requests to join it (default 20 ms)",
        )
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
    if service == DECODER:
        parser.add_argument("--vae-tiling", action="store_true", help="decode large images tile by tile")
        parser.add_argument("--vae-slicing", action="store_true", help="decode batches one image at a time")
        parser.add_argument("--tiny-vae", metavar="PATH", help="AutoencoderTiny (TAESD) folder/hub id for previews")
    add_curve_client_arguments(parser)


def add_curve_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--curve-secret", type=Path, help="this side's CURVE secret key file (NAME.key_secret)")
    parser.add_argument("--curve-broker", type=Path, help="the broker's CURVE public key file (NAME.key)")


def curve_from_args(args: argparse.Namespace) -> Curve | None:
    """CURVE settings of a client or node; both flags or neither."""
    secret, broker = getattr(args, "curve_secret", None), getattr(args, "curve_broker", None)
    if secret is None and broker is None:
        return None
    if secret is None or broker is None:
        raise SystemExit("CURVE needs both --curve-secret and --curve-broker")
    return Curve(secret_file=secret, broker_public_file=broker)


def _resolve(service: str, device: str, dtype: str, family_dtype: torch.dtype) -> tuple[str, torch.dtype]:
    """The device and weights dtype a node runs with, from its flags and its family's default."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        torch_dtype = family_dtype if (service == DENOISER and device.startswith("cuda")) else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    if device == "cpu" and torch_dtype == torch.float16:
        raise SystemExit("float16 is not supported on the CPU (layer norms reject it): use float32 or bfloat16")
    return device, torch_dtype


def serve(service: str, args: argparse.Namespace) -> int:
    """Load the stage and serve until SIGTERM/SIGINT; the job in hand is finished first."""
    keep_freed_buffers()
    from triptych.families import UnsupportedModel, family_for_pipeline
    from triptych.families.loading import load_stage, model_name, read_model_index

    try:
        family = family_for_pipeline(read_model_index(args.model)["_class_name"])
    except (UnsupportedModel, OSError, ValueError) as exc:
        print(f"triptych {service}: {exc}", file=sys.stderr)
        return 2
    no_t5 = getattr(args, "no_t5", False)
    if no_t5 and not family.optional_t5:
        print(f"triptych {service}: --no-t5: {family.name} cannot run without its T5 encoder", file=sys.stderr)
        return 2
    device, dtype = _resolve(service, args.device, args.dtype, family.cuda_dtype)
    speed = SpeedOptions(
        compile=getattr(args, "compile", None),
        channels_last=getattr(args, "channels_last", False),
        fuse_qkv=getattr(args, "fuse_qkv", False),
        attention_backend=getattr(args, "attention_backend", None),
        tf32=not getattr(args, "no_tf32", False),
        vae_tiling=getattr(args, "vae_tiling", False),
        vae_slicing=getattr(args, "vae_slicing", False),
        tiny_vae=getattr(args, "tiny_vae", None),
    )
    stage = load_stage(args.model, service, device=device, dtype=dtype, speed=speed, no_t5=no_t5)
    name = args.name or model_name(args.model)
    info = {"family": family.name, "device": device, "dtype": str(dtype).removeprefix("torch.")}
    if no_t5:
        info["t5"] = "left out"
    batching: dict = {}
    if service == ENCODER:
        from encoder_node.handler import EncoderHandler

        handler: Handler = EncoderHandler(stage, cache_bytes=args.cache_mb << 20)
    elif service == DENOISER:
        from denoiser_node.handler import DenoiserHandler

        handler = denoiser = DenoiserHandler(stage)
        max_batch = max(args.max_batch, 1)
        batching = {
            "max_batch": max_batch,
            "batch_window": args.batch_window_ms / 1000,
            "batch_key": denoiser.batch_key,
            "capacity": 2 * max_batch,  # the next batch waits here while this one runs
        }
        info["max_batch"] = max_batch
    else:
        from decoder_node.handler import DecoderHandler

        handler = DecoderHandler(stage)
    stats = getattr(handler, "stats", None)  # a handler may count things (cache hits...) for the broker's metrics
    worker = Worker(
        args.broker, service, name, handler, info=info, stats=stats, curve=curve_from_args(args), **batching
    )

    def stop(signum: int, frame: object) -> None:
        logger.info("signal %d: finishing the current job, then stopping", signum)
        worker.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    exit_with_parent(worker.stop)
    logger.info(
        "%s serving model %s (%s) on %s %s via %s", service, name, family.name, device, info["dtype"], args.broker
    )
    worker.run()
    return 0


def exit_with_parent(stop: threading.Event) -> None:
    """A process started by `triptych up`/`run` stops when its launcher dies: no orphan holds a GPU."""
    parent = os.environ.get("TRIPTYCH_PARENT_PID")
    if not parent:
        return

    def watch() -> None:
        while not stop.wait(1.0):
            if os.getppid() != int(parent):
                logger.warning("launcher %s is gone: stopping", parent)
                stop.set()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def configure_logging(level: str) -> None:
    quiet = getattr(logging, level.upper(), logging.INFO) >= logging.WARNING
    # Hub libraries print import-time notices and progress bars; a quiet node shows only problems.
    # (transformers' import-time notices about optional packages are noise for a node at any level.)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error" if quiet else "warning")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(service: str, argv: Sequence[str] | None = None) -> None:
    assert service in (ENCODER, DENOISER, DECODER)
    parser = argparse.ArgumentParser(prog=f"python -m {service}_node", description=f"triptych {service} node")
    add_node_arguments(parser, service)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    sys.exit(serve(service, args))
