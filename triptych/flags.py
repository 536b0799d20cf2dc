"""Flags every command shares: the broker address, CURVE keys, logging. One definition each."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from protocol.security import Curve

DEFAULT_BROKER = "tcp://127.0.0.1:5555"


def add_broker_argument(parser: argparse.ArgumentParser) -> None:
    """``--broker``: where a client or node connects."""
    parser.add_argument("--broker", default=DEFAULT_BROKER, help=f"broker address (default {DEFAULT_BROKER})")


def add_curve_client_arguments(parser: argparse.ArgumentParser) -> None:
    """CURVE for a side that connects (client, node, gateway): its own secret and the broker's public key."""
    parser.add_argument("--curve-secret", type=Path, help="this side's CURVE secret key file (NAME.key_secret)")
    parser.add_argument("--curve-broker", type=Path, help="the broker's CURVE public key file (NAME.key)")


def add_curve_server_arguments(parser: argparse.ArgumentParser, whose: str = "") -> None:
    """CURVE for the side that binds (broker, ``up``): its secret and the folders of keys let in, by role."""
    parser.add_argument("--curve-secret", type=Path, help="the broker's CURVE secret key file: turns CURVE on")
    parser.add_argument(
        "--curve-authorized", type=Path, help=f"folder of public keys (*.key){whose} that may be nodes and clients"
    )
    parser.add_argument(
        "--curve-nodes", type=Path, metavar="DIR", help=f"folder of public keys{whose} that may register as nodes"
    )
    parser.add_argument(
        "--curve-clients", type=Path, metavar="DIR", help=f"folder of public keys{whose} that may send requests"
    )


def curve_server_from_args(args: argparse.Namespace) -> Curve | None:
    """CURVE settings of a broker: none of its flags, or the secret and at least one key folder.

    Raises ValueError naming the flags when only some are given.
    """
    folders = (args.curve_authorized, args.curve_nodes, args.curve_clients)
    if args.curve_secret is None and all(folder is None for folder in folders):
        return None
    if args.curve_secret is None or all(folder is None for folder in folders):
        raise ValueError("CURVE needs both --curve-secret and --curve-authorized (or --curve-nodes / --curve-clients)")
    return Curve(
        secret_file=args.curve_secret,
        authorized_dir=args.curve_authorized,
        nodes_dir=args.curve_nodes,
        clients_dir=args.curve_clients,
    )


def curve_from_args(args: argparse.Namespace) -> Curve | None:
    """CURVE settings of a client or node; both flags or neither."""
    secret, broker = getattr(args, "curve_secret", None), getattr(args, "curve_broker", None)
    if secret is None and broker is None:
        return None
    if secret is None or broker is None:
        raise SystemExit("CURVE needs both --curve-secret and --curve-broker")
    return Curve(secret_file=secret, broker_public_file=broker)


def add_log_level(parser: argparse.ArgumentParser, default: str = "INFO") -> None:
    parser.add_argument("--log-level", default=default, help=f"logging level (default {default})")


def configure_logging(level: str) -> None:
    """Entry points only: logs to stderr; hub libraries' notices and progress bars quietened."""
    quiet = getattr(logging, level.upper(), logging.INFO) >= logging.WARNING
    # transformers' import-time notices about optional packages are noise for a node at any level.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error" if quiet else "warning")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
