"""Every message that crosses the wire, in one place.

A message is a small typed dataclass. On the wire it is a msgpack map
``{"v": PROTOCOL_VERSION, "kind": KIND, **fields}`` (plus tensor frames, see ``codec``).
Decoding checks the version, the kind and the type of every field; anything else is a
:class:`ProtocolError`, never an exception from deep inside a handler.

Directions: client -> broker, broker -> client, worker (node) -> broker, broker -> worker.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from protocol import codec

PROTOCOL_VERSION = 1

# Services: the three kinds of node.
ENCODER = "encoder"
DENOISER = "denoiser"
DECODER = "decoder"
SERVICES = (ENCODER, DENOISER, DECODER)


class ProtocolError(ValueError):
    """A message is malformed, of an unknown kind or version, or has a field of the wrong type."""


@dataclass(kw_only=True)
class Message:
    KIND: ClassVar[str] = ""


# --- client -> broker ---------------------------------------------------------------------


@dataclass(kw_only=True)
class GenerateRequest(Message):
    """Make ``num_images`` images of one prompt; image i uses seed ``seed + i``.

    Unset (None) options take the model's pipeline defaults, resolved by the nodes.
    """

    KIND: ClassVar[str] = "generate"
    request_id: str
    model: str = ""  # "" = the only model the broker serves
    prompt: str
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int
    num_images: int = 1
    timeout: float = 300.0  # seconds the request may wait and run before it fails
    user: str = ""  # whom it is for: queued work takes turns per user ("" = per client connection)


@dataclass(kw_only=True)
class CancelRequest(Message):
    KIND: ClassVar[str] = "cancel"
    request_id: str


@dataclass(kw_only=True)
class StatusRequest(Message):
    KIND: ClassVar[str] = "status"
    request_id: str


# --- broker -> client ---------------------------------------------------------------------


@dataclass(kw_only=True)
class RequestAccepted(Message):
    """The broker holds the request (sent again for every resend of it)."""

    KIND: ClassVar[str] = "accepted"
    request_id: str


@dataclass(kw_only=True)
class ProgressEvent(Message):
    """A stage of a request started on a node (step 0) or advanced (denoiser steps)."""

    KIND: ClassVar[str] = "progress"
    request_id: str
    stage: str
    node: str
    step: int = 0
    total: int = 0


@dataclass(kw_only=True)
class ImageResult(Message):
    KIND: ClassVar[str] = "image"
    request_id: str
    index: int
    seed: int
    png: bytes
    params: dict = field(default_factory=dict)  # resolved generation parameters


@dataclass(kw_only=True)
class RequestFailed(Message):
    KIND: ClassVar[str] = "failed"
    request_id: str
    error: str
    retryable: bool = False


@dataclass(kw_only=True)
class StatusReply(Message):
    KIND: ClassVar[str] = "status_reply"
    request_id: str
    nodes: list = field(default_factory=list)  # [{service, model, node, state, jobs_done, ...}]
    queues: dict = field(default_factory=dict)  # "service/model" -> queued jobs
    requests_in_flight: int = 0


# --- worker -> broker ---------------------------------------------------------------------


@dataclass(kw_only=True)
class WorkerReady(Message):
    """A node announces itself; sent again after the broker asks it to reconnect."""

    KIND: ClassVar[str] = "ready"
    service: str
    model: str
    node: str  # host:pid, for people and logs
    capacity: int = 1  # jobs the node accepts at once
    info: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class Heartbeat(Message):
    """Either way; from a node it may carry the node's counters."""

    KIND: ClassVar[str] = "heartbeat"
    stats: dict = field(default_factory=dict)  # cumulative since the node started, e.g. {"cache_hits": 3}


@dataclass(kw_only=True)
class WorkerGoodbye(Message):
    KIND: ClassVar[str] = "goodbye"


@dataclass(kw_only=True)
class JobProgress(Message):
    KIND: ClassVar[str] = "job_progress"
    job_id: str
    step: int
    total: int


@dataclass(kw_only=True)
class JobDone(Message):
    KIND: ClassVar[str] = "job_done"
    job_id: str
    payload: dict
    stats: dict = field(default_factory=dict)  # the node's counters, as in Heartbeat


@dataclass(kw_only=True)
class JobFailed(Message):
    KIND: ClassVar[str] = "job_failed"
    job_id: str
    error: str


# --- broker -> worker ---------------------------------------------------------------------


@dataclass(kw_only=True)
class JobAssign(Message):
    KIND: ClassVar[str] = "job"
    job_id: str
    request_id: str
    payload: dict


@dataclass(kw_only=True)
class JobCancel(Message):
    """Stop working on a job: its request was cancelled or failed elsewhere."""

    KIND: ClassVar[str] = "job_cancel"
    job_id: str


@dataclass(kw_only=True)
class Reconnect(Message):
    """The broker does not know this worker (it restarted, or declared it dead): re-register."""

    KIND: ClassVar[str] = "reconnect"


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (
        GenerateRequest,
        CancelRequest,
        StatusRequest,
        RequestAccepted,
        ProgressEvent,
        ImageResult,
        RequestFailed,
        StatusReply,
        WorkerReady,
        Heartbeat,
        WorkerGoodbye,
        JobProgress,
        JobDone,
        JobFailed,
        JobAssign,
        JobCancel,
        Reconnect,
    )
}


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` fits a field annotation (str, int, float, bool, bytes, dict, list, X | None)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or annotation)


_HINTS: dict[type[Message], dict[str, Any]] = {}


def _hints(cls: type[Message]) -> dict[str, Any]:
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def to_frames(message: Message) -> list[bytes | memoryview]:
    body = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    return codec.encode({"v": PROTOCOL_VERSION, "kind": message.KIND, **body})


def from_frames(frames: list[Any]) -> Message:
    """Decode and type-check one message; raises ProtocolError (or CodecError) when malformed."""
    body = codec.decode(frames)
    if not isinstance(body, dict):
        raise ProtocolError("message is not a map")
    version = body.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r} (this side speaks {PROTOCOL_VERSION})")
    kind = body.pop("kind", None)
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    hints = _hints(cls)
    unknown = set(body) - set(hints)
    if unknown:
        raise ProtocolError(f"{kind}: unknown field(s) {sorted(unknown, key=str)}")  # keys: str or bytes
    for name, value in body.items():
        if not _accepts(hints[name], value):
            raise ProtocolError(f"{kind}: field {name!r} has the wrong type ({type(value).__name__})")
    try:
        return cls(**body)
    except TypeError as exc:  # a required field is missing
        raise ProtocolError(f"{kind}: {exc}") from exc
