"""The ``triptych`` command.

stdout carries only what scripts read (the paths of written PNGs); logs, progress and errors go
to stderr. Exit status 0 means every image asked for was written.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import secrets
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.messages import ProgressEvent
from protocol.stages import DECODER, DENOISER, ENCODER
from triptych.client import Client, GeneratedImage, GenerationError
from triptych.flags import (
    DEFAULT_BROKER,
    add_broker_argument,
    add_curve_client_arguments,
    add_curve_server_arguments,
    add_log_level,
    configure_logging,
    curve_from_args,
    curve_server_from_args,
)
from triptych.nodes import ENTRY_POINTS, node_main

if TYPE_CHECKING:
    from triptych.launcher import ClusterCurve

logger = logging.getLogger("triptych")


def _add_generate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("--negative-prompt", help="what not to draw")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's pipeline default)")
    parser.add_argument(
        "--guidance", type=float, help="the pipeline's guidance_scale (default: the model's pipeline default)"
    )
    parser.add_argument(
        "--true-cfg",
        type=float,
        help="the pipeline's true_cfg_scale, for pipelines that have one (FLUX.1, Qwen-Image); default: theirs",
    )
    parser.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    parser.add_argument("--seed", type=int, help="seed of the first image; image i uses seed+i (default: random)")
    parser.add_argument("--num-images", type=_positive(int), default=1, help="images to make (default 1)")
    parser.add_argument(
        "--image",
        action="append",
        metavar="PATH",
        help="an init image (PNG, JPEG, WebP): img2img, or inpainting with --mask; repeat for models that take several",
    )
    parser.add_argument("--mask", metavar="PATH", help="inpainting mask: white repaints, black keeps (any size)")
    parser.add_argument(
        "--strength", type=float, help="how far from the init image, in (0, 1] (default: the pipeline's)"
    )
    parser.add_argument(
        "--scheduler",
        metavar="NAME",
        help="sampler: ddim, pndm, euler, euler_a, heun, lms, dpmpp_2m, dpmpp_2m_karras, dpmpp_2m_sde_karras, "
        "unipc; flow DiTs: flow_euler, flow_euler_karras, flow_euler_exponential (default: the checkpoint's)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        type=_lora_option,
        metavar="NAME[:WEIGHT]",
        help="a LoRA adapter of the nodes' --lora-dir, with its weight (default 1); repeat to combine several",
    )
    parser.add_argument(
        "--step-cache",
        metavar="KIND[:VALUE]",
        help="the denoiser's step cache: off, first_block[:THRESHOLD], taylorseer[:INTERVAL], mag[:THRESHOLD] "
        "(default: the denoiser's --step-cache)",
    )
    parser.add_argument("--out", default=".", help="folder for the PNGs (default: current folder)")
    parser.add_argument(
        "--previews", metavar="DIR", help="write the denoiser's live previews to DIR as preview-SEED-stepNNN.png"
    )
    parser.add_argument(
        "--preview-every",
        type=int,
        metavar="N",
        help="a preview every N denoising steps (default: each quarter of them with --previews, else none)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before giving up (default 300)")
    add_log_level(parser, "WARNING")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triptych", description="Text-to-image diffusion, split across processes.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker = commands.add_parser("broker", help="route work between clients and nodes")
    broker.add_argument("--bind", default=DEFAULT_BROKER, help=f"address to listen on (default {DEFAULT_BROKER})")
    broker.add_argument(
        "--max-requests", type=int, default=1000, help="requests in flight before new ones get 'busy' (default 1000)"
    )
    _add_broker_limits(broker)
    add_curve_server_arguments(broker)
    broker.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default: off)")
    broker.add_argument(
        "--metrics-host", default="127.0.0.1", help="address for the metrics (default 127.0.0.1: this machine only)"
    )
    add_log_level(broker)

    keygen = commands.add_parser("keygen", help="write a CURVE key pair (zmq.auth format)")
    keygen.add_argument("--dir", required=True, type=Path, help="folder for the key files")
    keygen.add_argument("--name", required=True, help="writes NAME.key (public) and NAME.key_secret")
    add_log_level(keygen)

    for service, text in (
        (ENCODER, "serve a model's text encoders (CPU)"),
        (DENOISER, "serve a model's UNet/transformer (the GPU node)"),
        (DECODER, "serve a model's VAE decoder (CPU)"),
    ):
        # Parsed by the node's own entry point (see main); listed here for `triptych --help`.
        node = commands.add_parser(service, help=text, add_help=False)
        node.add_argument("node_args", nargs=argparse.REMAINDER)

    up = commands.add_parser("up", help="a broker and one node of each kind on this machine")
    up.add_argument("--model", required=True, help="hub id or local folder of a diffusers pipeline")
    up.add_argument("--name", help="name the model is served under")
    up.add_argument("--bind", default=DEFAULT_BROKER, help=f"broker address (default {DEFAULT_BROKER})")
    add_curve_server_arguments(up, " of outside machines")
    _add_device_options(up)
    _add_lora_dir(up)
    add_log_level(up)

    generate = commands.add_parser("generate", help="make images through a running broker")
    _add_generate_options(generate)
    add_broker_argument(generate)
    generate.add_argument("--model", default="", help="model name (default: the broker's only model)")
    add_curve_client_arguments(generate)

    status = commands.add_parser("status", help="nodes, queues and requests in flight at a broker")
    add_broker_argument(status)
    status.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker (default 5)")
    add_curve_client_arguments(status)
    add_log_level(status, "WARNING")

    http = commands.add_parser("http", help="an OpenAI-compatible images API in front of a broker")
    add_broker_argument(http)
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    http.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    http.add_argument("--timeout", type=float, default=300.0, help="seconds a request may wait and run (default 300)")
    http.add_argument(
        "--api-keys", metavar="FILE", help="require one of the keys in FILE (one per line) as a Bearer token"
    )
    add_curve_client_arguments(http)
    add_log_level(http)

    run = commands.add_parser("run", help="up + generate + shut down, in one command")
    _add_generate_options(run)
    run.add_argument("--model", help="hub id or local folder (default: the small packaged demo model)")
    _add_device_options(run)
    _add_lora_dir(run)
    add_curve_client_arguments(run)
    return parser


def _lora_option(text: str) -> tuple[str, float]:
    """``--lora NAME[:WEIGHT]``: an adapter name (no ':' in it) and a finite weight, 1 by default."""
    name, colon, weight = text.rpartition(":")
    if not colon:
        return text, 1.0
    try:
        value = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the weight of {name!r} must be a number (got {weight!r})") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"the weight of {name!r} must be a finite number (got {weight!r})")
    return name, value


def _positive(kind: type) -> Any:
    """An argparse type: a number of ``kind`` above 0."""

    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0 (got {text})")
        return value

    return parse


def _add_broker_limits(parser: argparse.ArgumentParser) -> None:
    """The broker's limits on requests, one user's share and stalled nodes (see protocol.limits, protocol.watchdog)."""
    from protocol.limits import MAX_IMAGES, MAX_PIXELS, MAX_STEPS, MAX_TIMEOUT, MAX_USER_REQUESTS
    from protocol.watchdog import STALL_TIMEOUT

    limits = [
        ("--max-user-requests", int, MAX_USER_REQUESTS, "requests in flight for one user before more get 'busy'"),
        ("--max-timeout", float, MAX_TIMEOUT, "seconds a request may take at most, whatever it asks for"),
        ("--max-pixels", int, MAX_PIXELS, "height x width a request may ask for"),
        ("--max-images", int, MAX_IMAGES, "images one request may ask for"),
        ("--max-steps", int, MAX_STEPS, "denoising steps one request may ask for"),
        ("--stall-timeout", float, STALL_TIMEOUT, "seconds a busy node may go without progress before its jobs move"),
    ]
    for flag, kind, default, text in limits:
        parser.add_argument(flag, type=_positive(kind), default=default, help=f"{text} (default {default})")


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="the denoiser's device (default: cuda if available)")
    parser.add_argument(
        "--dtype", default="auto", help="the denoiser's dtype (default: float32 on CPU, the family's own on CUDA)"
    )


def _add_lora_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lora-dir",
        metavar="DIR",
        help="serve the LoRA adapters DIR/NAME.safetensors (the encoder and denoiser nodes)",
    )


def _lora_dir_problem(args: argparse.Namespace) -> str | None:
    """Checked before any process starts: a node given a missing folder would exit at once."""
    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():
        return f"--lora-dir: {args.lora_dir} is not a folder"
    return None


# --- commands -----------------------------------------------------------------------------


def cmd_broker(args: argparse.Namespace) -> int:
    from protocol.allocator import keep_freed_buffers
    from protocol.broker import Broker
    from protocol.broker_core import BrokerCore
    from protocol.limits import RequestLimits
    from protocol.security import KeyFileError, is_loopback
    from protocol.watchdog import StallPolicy
    from triptych.node_runner import exit_with_parent

    keep_freed_buffers()
    stop = threading.Event()
    _on_signals(stop)
    exit_with_parent(stop)
    try:
        curve = curve_server_from_args(args)
    except ValueError as exc:
        print(f"triptych broker: {exc}", file=sys.stderr)
        return 2
    metrics = None
    if args.metrics_port is not None:
        from protocol.metrics import PrometheusMetrics

        metrics = PrometheusMetrics()
    limits = RequestLimits(
        max_pixels=args.max_pixels,
        max_images=args.max_images,
        max_steps=args.max_steps,
        max_timeout=args.max_timeout,
        max_user_requests=args.max_user_requests,
    )
    core = BrokerCore(
        max_requests=args.max_requests, metrics=metrics, limits=limits, stall=StallPolicy(timeout=args.stall_timeout)
    )
    try:
        broker = Broker(args.bind, core=core, curve=curve)
    except KeyFileError as exc:
        print(f"triptych broker: {exc}", file=sys.stderr)
        return 2
    print(f"broker listening on {broker.address}", file=sys.stderr, flush=True)
    if curve is None and not is_loopback(broker.address):
        print(
            f"triptych broker: warning: {broker.address} is reachable from other machines and CURVE is off: "
            "anyone who reaches it can register nodes and send requests (see --curve-secret)",
            file=sys.stderr,
            flush=True,
        )
    if metrics is not None:
        host = args.metrics_host
        try:
            metrics.serve(host, args.metrics_port)
        except OSError as exc:
            print(f"triptych broker: cannot serve metrics on {host}:{args.metrics_port}: {exc}", file=sys.stderr)
            return 2
        print(f"metrics on http://{host}:{args.metrics_port}/metrics", file=sys.stderr, flush=True)
    broker.serve(stop)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from protocol.security import KeyFileError, generate_keys

    try:
        public, secret = generate_keys(args.dir, args.name)
    except (KeyFileError, OSError) as exc:
        print(f"triptych keygen: {exc}", file=sys.stderr)
        return 2
    print(public)
    print(secret)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from triptych.launcher import ClusterCurve, LaunchError

    stop = threading.Event()
    _on_signals(stop)
    try:
        wanted = curve_server_from_args(args)
    except ValueError as exc:
        print(f"triptych up: {exc}", file=sys.stderr)
        return 2
    if (problem := _lora_dir_problem(args)) is not None:
        print(f"triptych up: {problem}", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="triptych-up-") as folder:
            curve = None
            if wanted is not None:
                curve = ClusterCurve.with_broker_keys(
                    Path(folder), wanted.secret_file, wanted.authorized_dir, wanted.nodes_dir, wanted.clients_dir
                )
            return _serve_cluster(args, curve, stop)
    except LaunchError as exc:
        print(f"triptych up: {exc}", file=sys.stderr)
        return 1


def _serve_cluster(args: argparse.Namespace, curve: ClusterCurve | None, stop: threading.Event) -> int:
    from triptych.launcher import Cluster

    cluster = Cluster(
        args.model,
        bind=args.bind,
        name=args.name,
        device=args.device,
        dtype=args.dtype,
        log_level=args.log_level,
        curve=curve,
        lora_dir=args.lora_dir,
    )
    with cluster:
        print(f"triptych ready: broker {args.bind}, model {args.name or args.model}", flush=True)
        while not stop.wait(0.5):
            for key, process in cluster.processes.items():
                if process.poll() is not None:
                    print(f"triptych up: the {key} process exited ({process.returncode})", file=sys.stderr)
                    return 1
    return 0


def cmd_generate(args: argparse.Namespace, broker: str | None = None) -> int:
    seed = secrets.randbelow(2**32) if args.seed is None else args.seed
    if args.seed is None:
        print(f"seed: {seed}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = _ProgressBar()
    on_progress: Callable[[ProgressEvent], None] = progress
    if args.previews is not None:
        from triptych.preview_files import PreviewWriter

        on_progress = PreviewWriter(Path(args.previews), seed, then=progress)
    # Previews are made only for someone to look at them.
    preview_every = args.preview_every if args.preview_every is not None else (None if args.previews else 0)
    loras = dict(args.lora or [])
    if len(loras) != len(args.lora or []):
        twice = sorted({name for name, _ in args.lora if [n for n, _ in args.lora].count(name) > 1})
        print(f"triptych: error: --lora: {', '.join(twice)} given more than once", file=sys.stderr)
        return 2
    try:
        with Client(broker or args.broker, timeout=args.timeout, curve=curve_from_args(args)) as client:
            images = client.generate(
                args.prompt,
                model=args.model or "",
                negative_prompt=args.negative_prompt,
                steps=args.steps,
                guidance=args.guidance,
                true_cfg=args.true_cfg,
                height=args.height,
                width=args.width,
                seed=seed,
                num_images=args.num_images,
                scheduler=args.scheduler,
                loras=loras,
                step_cache=args.step_cache,
                image=args.image,
                mask=args.mask,
                strength=args.strength,
                preview_every=preview_every,
                on_progress=on_progress,
            )
    except GenerationError as exc:
        progress.close()
        option = f"{_flag(exc.field)}: " if exc.field and exc.field not in ("prompt", "request_id") else ""
        print(f"triptych: error: {option}{exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.close()
        print("triptych: cancelled", file=sys.stderr)
        return 130
    progress.close()
    for warning in dict.fromkeys(w for image in images for w in image.warnings):
        print(f"triptych: warning: {warning}", file=sys.stderr)
    for image in images:
        print(_write(image, out, args.prompt), flush=True)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from triptych.launcher import Cluster, ClusterCurve, LaunchError

    if (problem := _lora_dir_problem(args)) is not None:
        print(f"triptych: error: {problem}", file=sys.stderr)
        return 2
    model = args.model
    if model is None:
        from triptych.demo import demo_model, describe_demo_model

        print(describe_demo_model(), file=sys.stderr)
        model = str(demo_model())
    with tempfile.TemporaryDirectory(prefix="triptych-") as folder:
        bind = f"ipc://{folder}/broker.sock"
        try:
            curve = None
            if args.curve_secret is not None:
                curve = ClusterCurve.create(Path(folder), args.curve_secret, args.curve_broker)
                args.curve_broker = curve.broker_public
            elif args.curve_broker is not None:
                raise LaunchError("--curve-broker needs --curve-secret")
            # One request: its stages never overlap, so each node keeps a thread per core.
            cluster = Cluster(
                model,
                bind=bind,
                device=args.device,
                dtype=args.dtype,
                log_level="WARNING",
                curve=curve,
                share_cores=False,
                lora_dir=args.lora_dir,
            )
            with cluster:
                args.model = ""
                return cmd_generate(args, broker=bind)
        except LaunchError as exc:
            print(f"triptych: error: {exc}", file=sys.stderr)
            return 1


# --- helpers ------------------------------------------------------------------------------


class _ProgressBar:
    """A tqdm bar on stderr, fed by the denoiser's per-step events."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, event: ProgressEvent) -> None:
        if event.total <= 0:
            logger.debug("%s started on %s", event.stage, event.node)
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=event.total, desc="denoising", unit="step", file=sys.stderr, leave=False)
        self.bar.update(max(event.step - self.bar.n, 0))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _flag(field: str) -> str:
    """The option a request field comes from: true_cfg -> --true-cfg, loras -> --lora."""
    return "--lora" if field == "loras" else "--" + field.replace("_", "-")


def _write(image: GeneratedImage, out: Path, prompt: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "image"
    path = out / f"{slug}-{image.seed}.png"
    counter = 1
    while path.exists():
        path = out / f"{slug}-{image.seed}-{counter}.png"
        counter += 1
    return image.save(path).resolve()


def _on_signals(stop: threading.Event) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ENTRY_POINTS:  # a node parses its own flags
        return node_main(argv[0])(argv[1:], f"triptych {argv[0]}")
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    if args.command == "broker":
        return cmd_broker(args)
    if args.command == "keygen":
        return cmd_keygen(args)
    if args.command == "up":
        return cmd_up(args)
    if args.command == "generate":
        return cmd_generate(args)
    if args.command == "status":
        from triptych.status import cmd_status

        return cmd_status(args)
    if args.command == "http":
        from triptych.http import serve as serve_http

        return serve_http(args)
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
