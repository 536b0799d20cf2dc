"""``triptych http``: the gateway app on uvicorn, with the command's flags and the gateway's deadlines applied."""

from __future__ import annotations

import argparse
import logging
import sys

from protocol.allocator import keep_freed_buffers
from triptych.client import Client
from triptych.flags import curve_from_args
from triptych.http.app import create_app
from triptych.http.auth import read_api_keys
from triptych.http.connections import server_config

logger = logging.getLogger(__name__)


def serve(args: argparse.Namespace) -> int:
    """Serve the gateway until SIGINT/SIGTERM; 2 when ``--api-keys`` names no usable file."""
    import uvicorn  # only the command needs the server; the app alone runs under any ASGI server

    keep_freed_buffers()  # a long-lived receiver of PNGs, like the broker
    curve = curve_from_args(args)
    keys = None
    if args.api_keys is not None:
        try:
            keys = read_api_keys(args.api_keys)
        except (OSError, ValueError) as exc:
            print(f"triptych http: --api-keys: {exc}", file=sys.stderr)
            return 2
    app = create_app(
        args.broker, client_factory=lambda: Client(args.broker, timeout=args.timeout, curve=curve), api_keys=keys
    )
    guarded = f", {len(keys)} API key(s)" if keys else ", no API key needed"
    print(
        f"triptych http: http://{args.host}:{args.port}/v1 -> broker {args.broker}{guarded}",
        file=sys.stderr,
        flush=True,
    )
    config = server_config(
        app,
        args.host,
        args.port,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=5,  # then running calls are cancelled, and the broker told
    )
    uvicorn.Server(config).run()
    return 0
