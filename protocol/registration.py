"""What a node may announce: bounds on every field of a WorkerReady, checked before the broker keeps any of it.

Names and info come from the peer, so unbounded they would let one peer grow the broker's state (and
every status reply and metrics scrape) without limit.
"""

from __future__ import annotations

import msgpack

from protocol.budget import BudgetError, check_budget
from protocol.messages import LOADING, READY, SERVICES, WorkerReady

MAX_NAME = 256  # characters of a model or node name
MAX_CAPACITY = 64  # jobs one node may hold; more is taken as this many
MAX_INFO_BYTES = 4096  # a node's info, as msgpack
MAX_INFO_VALUES = 64  # values in a node's info, nested ones included
MAX_INFO_DEPTH = 4
MAX_NODES = 1024  # nodes registered at once; more are refused


def registration_error(msg: WorkerReady) -> str | None:
    """What is wrong with a registration, in a sentence; None when the broker may keep it."""
    if msg.service not in SERVICES:
        return f"unknown service {msg.service[:32]!r}"
    if not 1 <= len(msg.model) <= MAX_NAME:
        return f"model must be 1 to {MAX_NAME} characters"
    if len(msg.node) > MAX_NAME:
        return f"node must be at most {MAX_NAME} characters"
    if msg.capacity < 1:
        return "capacity must be at least 1"
    if msg.state not in (LOADING, READY):
        return f"state must be {LOADING} or {READY}"
    packed = msgpack.packb(msg.info, use_bin_type=True)
    if len(packed) > MAX_INFO_BYTES:
        return f"info must be at most {MAX_INFO_BYTES} bytes (got {len(packed)})"
    try:
        check_budget(packed, max_objects=MAX_INFO_VALUES, max_depth=MAX_INFO_DEPTH)
    except BudgetError as exc:
        return f"info: {exc}"
    return None
