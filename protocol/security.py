"""CURVE authentication and encryption (ZeroMQ's CurveZMQ), with keys in zmq.auth's file format.

The broker holds a secret key and folders of public keys by role: keys that may register as nodes,
keys that may send requests, and keys that may do both; every client and node holds its own secret
key and the broker's public key. A peer whose key is in no folder, or that speaks without CURVE,
completes no handshake and so gets nothing processed. An admitted peer's connection carries its
roles and key as its ZAP User-Id (:mod:`protocol.peers`), so the broker refuses node messages from
a client key and requests from a node key.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
import zmq.auth
from zmq.utils import z85

from protocol.peers import CLIENT, NODE, user_id

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger(__name__)


class KeyFileError(ValueError):
    """A key file or folder is missing or unreadable."""


@dataclass(frozen=True)
class Curve:
    secret_file: Path  # this side's NAME.key_secret (holds the public key too)
    broker_public_file: Path | None = None  # clients and nodes: the broker's NAME.key
    authorized_dir: Path | None = None  # the broker: public keys (*.key) that may be nodes and clients
    nodes_dir: Path | None = None  # the broker: public keys that may register as nodes
    clients_dir: Path | None = None  # the broker: public keys that may send requests


def generate_keys(folder: str | Path, name: str) -> tuple[Path, Path]:
    """Write folder/name.key (public) and folder/name.key_secret; returns both paths.

    The secret file is created readable by its owner only (never widened later, so no other user
    can open it in between), and an existing key pair is never replaced.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public_file, secret_file):
        if path.exists():
            raise KeyFileError(f"{path} already exists: remove it first or pick another name")
    public, secret = zmq.curve_keypair()
    _write_key_file(secret_file, _certificate("Secret", public, secret), mode=0o600)
    _write_key_file(public_file, _certificate("Public", public), mode=0o644)
    return public_file, secret_file


def _certificate(kind: str, public: bytes, secret: bytes | None = None) -> str:
    """A key file in zmq.auth's format (what zmq.auth.load_certificate reads)."""
    lines = [
        f"#   ****  Generated on {datetime.datetime.now()} by triptych  ****",
        f"#   ZeroMQ CURVE **{kind}** Certificate",
        "",
        "metadata",
        "curve",
        f'    public-key = "{public.decode()}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write_key_file(path: Path, text: str, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists: remove it first or pick another name") from exc
    with os.fdopen(fd, "w") as file:
        file.write(text)


def is_loopback(address: str) -> bool:
    """Whether a bind address is reachable from this machine only (ipc, inproc, a loopback host)."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rpartition(":")[0].strip("[]")
    if scheme != "tcp" or not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name or a host name: reachable from elsewhere
        return False


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


def role_authenticator(ctx: zmq.Context, roles: dict[bytes, frozenset[str]]) -> ThreadAuthenticator:
    """A ZAP handler that admits the keys in ``roles`` (z85) and names each one's roles in its User-Id."""
    from zmq.auth.thread import ThreadAuthenticator  # asyncio comes with it: only the broker pays for it

    class RoleAuthenticator(ThreadAuthenticator):
        def curve_user_id(self, client_public_key: bytes) -> str:
            key = z85.encode(client_public_key)
            return user_id(roles.get(key, frozenset()), key.decode("ascii"))

    authenticator = RoleAuthenticator(ctx)
    authenticator.certs = {"*": dict.fromkeys(roles, True)}  # what ThreadAuthenticator admits
    return authenticator


def key_roles(curve: Curve) -> dict[bytes, frozenset[str]]:
    """Every admitted public key (z85) with its roles, from the broker's key folders."""
    folders = [
        ("--curve-authorized", curve.authorized_dir, frozenset({NODE, CLIENT})),
        ("--curve-nodes", curve.nodes_dir, frozenset({NODE})),
        ("--curve-clients", curve.clients_dir, frozenset({CLIENT})),
    ]
    if all(folder is None for _, folder, _ in folders):
        raise KeyFileError("CURVE needs a folder of public keys: --curve-authorized, --curve-nodes or --curve-clients")
    roles: dict[bytes, frozenset[str]] = {}
    for flag, folder, granted in folders:
        if folder is None:
            continue
        if not folder.is_dir():
            raise KeyFileError(f"{flag} must be a folder of public keys (got {folder})")
        for key in zmq.auth.load_certificates(folder):
            roles[key] = roles.get(key, frozenset()) | granted
    return roles


def secure_server(ctx: zmq.Context, sock: zmq.Socket, curve: Curve | None) -> ThreadAuthenticator | None:
    """Make the broker's socket a CURVE server that admits only the keys of its folders, with their roles."""
    if curve is None:
        return None
    roles = key_roles(curve)
    public, secret = load_key(curve.secret_file, need_secret=True)
    authenticator = role_authenticator(ctx, roles)
    authenticator.start()
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True
    nodes = sum(NODE in granted for granted in roles.values())
    clients = sum(CLIENT in granted for granted in roles.values())
    logger.info("CURVE on: %d key(s) may register as nodes, %d may send requests", nodes, clients)
    return authenticator
