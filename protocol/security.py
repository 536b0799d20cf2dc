"""CURVE authentication and encryption (ZeroMQ's CurveZMQ), with keys in zmq.auth's file format.

The broker holds a secret key and a folder of authorized public keys; every client and node
holds its own secret key and the broker's public key. A peer whose key is not authorized, or
that speaks without CURVE, completes no handshake and so gets nothing processed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
import zmq.auth

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger(__name__)


class KeyFileError(ValueError):
    """A key file or folder is missing or unreadable."""


@dataclass(frozen=True)
class Curve:
    secret_file: Path  # this side's NAME.key_secret (holds the public key too)
    broker_public_file: Path | None = None  # clients and nodes: the broker's NAME.key
    authorized_dir: Path | None = None  # the broker: folder of allowed public keys (*.key)


def generate_keys(folder: str | Path, name: str) -> tuple[Path, Path]:
    """Write folder/name.key (public) and folder/name.key_secret; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(folder, name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def load_key(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) from a key file; KeyFileError when unreadable, or without a needed secret."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from exc
    if need_secret and not secret:
        raise KeyFileError(f"{path} holds no secret key (pass the .key_secret file)")
    return public, secret


def secure_client(sock: zmq.Socket, curve: Curve | None) -> None:
    """Make a connecting socket (client or node) speak CURVE to the broker."""
    if curve is None:
        return
    if curve.broker_public_file is None:
        raise KeyFileError("CURVE needs the broker's public key (--curve-broker)")
    public, secret = load_key(curve.secret_file, need_secret=True)
    server_public, _ = load_key(curve.broker_public_file, need_secret=False)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = server_public


def secure_server(ctx: zmq.Context, sock: zmq.Socket, curve: Curve | None) -> ThreadAuthenticator | None:
    """Make the broker's socket a CURVE server that admits only authorized public keys."""
    if curve is None:
        return None
    if curve.authorized_dir is None or not curve.authorized_dir.is_dir():
        raise KeyFileError(f"--curve-authorized must be a folder of public keys (got {curve.authorized_dir})")
    public, secret = load_key(curve.secret_file, need_secret=True)
    from zmq.auth.thread import ThreadAuthenticator  # asyncio comes with it: only the broker pays for it

    authenticator = ThreadAuthenticator(ctx)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(curve.authorized_dir))
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True
    logger.info(
        "CURVE on: %d authorized key(s) in %s", len(list(curve.authorized_dir.glob("*.key"))), curve.authorized_dir
    )
    return authenticator
