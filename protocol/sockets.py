"""Socket construction and the options every triptych socket shares."""

from __future__ import annotations

import zmq

from protocol.security import Curve, secure_client

HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeats, both directions
HEARTBEAT_LIVENESS = 3  # missed heartbeats before a peer is presumed dead
MAX_MESSAGE_BYTES = 1 << 31  # ZMQ_MAXMSGSIZE: one frame larger than this drops the connection
HIGH_WATER_MARK = 10_000  # messages queued per peer before zmq drops (ROUTER) or blocks


def _common(sock: zmq.Socket) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    return sock


def router(ctx: zmq.Context) -> zmq.Socket:
    """The broker's one socket (bind it after any CURVE options): clients and nodes all connect to it."""
    sock = _common(ctx.socket(zmq.ROUTER))
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting peer with the same identity takes over
    # A send to a peer that is gone, or whose queue is full (it is not reading), raises instead of
    # dropping the message unseen: the broker logs it.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    return sock


def connect_dealer(
    ctx: zmq.Context, address: str, identity: bytes | None = None, curve: Curve | None = None
) -> zmq.Socket:
    sock = _common(ctx.socket(zmq.DEALER))
    secure_client(sock, curve)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    sock.connect(address)
    return sock
