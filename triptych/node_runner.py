"""What every node does the same way: common flags, loading its stage, serving until stopped.

A node package gives :func:`run_node` its own flags and a ``build`` function that loads the
stage and returns a :class:`NodeService` (its handler and worker options); this module does the
rest -- parse, log, resolve the device and dtype, register with the broker, stop on a signal or
when the launcher that started it dies.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protocol.allocator import keep_freed_buffers
from protocol.stages import DENOISER
from protocol.worker import BatchKey, Handler, Worker
from triptych.flags import add_broker_argument, add_curve_client_arguments, configure_logging, curve_from_args

if TYPE_CHECKING:
    import torch

    from triptych.families import Family
    from triptych.families.loading import LoadedStage

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class NodeService:
    """A loaded node: its job handler and how the worker should feed it."""

    handler: Handler
    info: dict[str, Any] = field(default_factory=dict)  # shown by `triptych status`
    capacity: int = 2  # jobs the broker may hand it at once
    max_batch: int = 1  # jobs run together in one handler call
    batch_window: float = 0.0  # seconds a batch waits for compatible jobs
    batch_key: BatchKey | None = None
    stats: Callable[[], dict[str, Hashable]] | None = None  # the node's counters, for status and metrics


@dataclass(frozen=True)
class NodeContext:
    """What the common flags resolved to, for a node's ``build``."""

    args: argparse.Namespace
    service: str
    family: Family
    device: str
    dtype: torch.dtype
    name: str  # the model name the node registers under

    def load(self, **options: Any) -> LoadedStage:
        """This node's components of the model, through the one loading path (``dtype`` may be
        overridden, e.g. per component as ``{"text_encoder_2": torch.bfloat16, "default": torch.float32}``)."""
        from triptych.families.loading import load_stage

        return load_stage(self.args.model, self.service, **{"device": self.device, "dtype": self.dtype, **options})

    def info(self) -> dict[str, Any]:
        return {"family": self.family.name, "device": self.device, "dtype": str(self.dtype).removeprefix("torch.")}


class NodeStartError(Exception):
    """The node cannot start as asked; the message says which flag to change."""


def add_common_arguments(parser: argparse.ArgumentParser, service: str) -> None:
    default_device = "auto" if service == DENOISER else "cpu"
    parser.add_argument("--model", required=True, help="hub id or local folder of a diffusers pipeline")
    parser.add_argument("--name", help="name the model is served under (default: folder name or hub id)")
    add_broker_argument(parser)
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
    add_curve_client_arguments(parser)


def resolve_device(service: str, device: str, dtype: str, family_dtype: torch.dtype) -> tuple[str, torch.dtype]:
    """The device and weights dtype a node runs with, from its flags and its family's default."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        torch_dtype = family_dtype if (service == DENOISER and device.startswith("cuda")) else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    if device == "cpu" and torch_dtype == torch.float16:
        raise NodeStartError("float16 is not supported on the CPU (layer norms reject it): use float32 or bfloat16")
    return device, torch_dtype


Build = Callable[[NodeContext], NodeService]


class BusyTime:
    """The node's handler, timed: its stats gain ``busy_seconds``, the seconds spent in handler calls.

    With the ``images`` every node counts, ``busy_seconds / images`` is the node's seconds per image,
    which `triptych status` and the metrics show per stage.
    """

    def __init__(self, handler: Handler, stats: Callable[[], dict[str, Hashable]] | None = None) -> None:
        self.handler = handler
        self.node_stats = stats
        self.seconds = 0.0

    def __call__(self, jobs: list, progress: Any) -> list:
        start = time.perf_counter()
        try:
            return self.handler(jobs, progress)
        finally:
            self.seconds += time.perf_counter() - start

    def stats(self) -> dict[str, Hashable]:
        stats = dict(self.node_stats()) if self.node_stats is not None else {}
        return stats | {"busy_seconds": round(self.seconds, 3)}


def serve(service: str, args: argparse.Namespace, build: Build) -> int:
    """Load the stage and serve until SIGTERM/SIGINT; the job in hand is finished first.

    The node registers as loading before it reads its weights, so requests for its model wait for
    it at the broker meanwhile (instead of failing as a model nobody serves).
    """
    keep_freed_buffers()
    from triptych.families import UnsupportedModel, family_for_pipeline
    from triptych.families.loading import model_name, read_model_index

    worker: Worker | None = None
    try:
        family = family_for_pipeline(read_model_index(args.model)["_class_name"])
        device, dtype = resolve_device(service, args.device, args.dtype, family.cuda_dtype)
        context = NodeContext(args, service, family, device, dtype, args.name or model_name(args.model))
        worker = Worker(args.broker, service, context.name, curve=curve_from_args(args))
        worker.announce()
        node = build(context)
    except (UnsupportedModel, OSError, ValueError, NodeStartError) as exc:
        print(f"triptych {service}: {exc}", file=sys.stderr)
        if worker is not None:
            worker.close()
        return 2
    busy = BusyTime(node.handler, node.stats)
    worker.configure(
        busy,
        capacity=node.capacity,
        max_batch=node.max_batch,
        batch_window=node.batch_window,
        batch_key=node.batch_key,
        info=node.info,
        stats=busy.stats,
    )

    def stop(signum: int, frame: object) -> None:
        logger.info("signal %d: finishing the current job, then stopping", signum)
        worker.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    exit_with_parent(worker.stop)
    logger.info(
        "%s serving model %s (%s) on %s %s via %s",
        service,
        context.name,
        family.name,
        device,
        node.info.get("dtype"),
        args.broker,
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


def run_node(
    service: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    build: Build,
    argv: Sequence[str] | None = None,
    prog: str | None = None,
) -> int:
    """A node's ``main``: its flags after the common ones, then :func:`serve`."""
    parser = argparse.ArgumentParser(prog=prog or f"python -m {service}_node", description=f"triptych {service} node")
    add_common_arguments(parser, service)
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    return serve(service, args, build)


__all__ = ["NodeContext", "NodeService", "NodeStartError", "run_node", "serve"]
