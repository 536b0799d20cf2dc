"""Who sent a message: the roles its sender's CURVE key holds, so the broker can tell nodes from clients.

Under CURVE the broker's ZAP handler (:mod:`protocol.security`) stamps every connection with a
User-Id naming the key's roles and the key itself, ``node+client/<z85 public key>``; the broker
reads it off each message it receives. A node key may register and send what nodes send; a client
key may send requests. Without CURVE there is no key, nothing is stamped and every peer may do
everything, as on loopback.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.messages import (
    CancelRequest,
    GenerateRequest,
    Heartbeat,
    JobFailed,
    JobProgress,
    Message,
    StageResult,
    StatusRequest,
    WorkerGoodbye,
    WorkerReady,
)

NODE = "node"  # may register (WorkerReady) and send heartbeats, progress, results and failures
CLIENT = "client"  # may send requests, cancels and status requests
ROLES = (NODE, CLIENT)

_CLIENT_MESSAGES = (GenerateRequest, CancelRequest, StatusRequest)
_NODE_MESSAGES = (WorkerReady, Heartbeat, WorkerGoodbye, JobProgress, JobFailed, StageResult)


@dataclass(frozen=True)
class Peer:
    """A sender as CURVE authenticated it."""

    key: str  # its public key, z85
    roles: frozenset[str]  # NODE and/or CLIENT

    def may_send(self, msg: Message) -> bool:
        role = role_of(msg)
        return role is None or role in self.roles


def role_of(msg: Message) -> str | None:
    """The role a message is sent in (None: no role sends it to the broker; it is dropped anyway)."""
    if isinstance(msg, _CLIENT_MESSAGES):
        return CLIENT
    if isinstance(msg, _NODE_MESSAGES):
        return NODE
    return None


def user_id(roles: frozenset[str], key: str) -> str:
    """The ZAP User-Id of a key: ``node+client/<key>``."""
    return "+".join(role for role in ROLES if role in roles) + "/" + key


def peer_of(user_id: str) -> Peer:
    """The peer a User-Id names; one that names no known role may send nothing."""
    names, _, key = user_id.partition("/")
    return Peer(key=key, roles=frozenset(name for name in names.split("+") if name in ROLES))
