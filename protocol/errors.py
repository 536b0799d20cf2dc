"""Failure codes: what went wrong, in a word a program can act on, and the field at fault.

Every :class:`~protocol.messages.RequestFailed` and :class:`~protocol.messages.JobFailed` carries
one of these codes; the HTTP gateway maps them to statuses, the CLI and the Python client show
the message. Nothing downstream parses the English text.
"""

from __future__ import annotations

INVALID_REQUEST = "invalid_request"  # a field is out of range or not supported by the model (see `field`)
UNKNOWN_MODEL = "unknown_model"  # no node serves the model the request names
NO_NODE = "no_node"  # the model is served, but no node of a stage it needs is up
BUSY = "busy"  # the broker holds as many requests as it may; retry later
TIMEOUT = "timeout"  # the request ran past its timeout
CANCELLED = "cancelled"  # the client cancelled it
MODEL_ERROR = "model_error"  # a node failed running the model, or returned a malformed result
OUT_OF_MEMORY = "out_of_memory"  # a node ran out of (GPU) memory

CODES = (INVALID_REQUEST, UNKNOWN_MODEL, NO_NODE, BUSY, TIMEOUT, CANCELLED, MODEL_ERROR, OUT_OF_MEMORY)
RETRYABLE = frozenset({BUSY, NO_NODE, OUT_OF_MEMORY})  # may succeed if sent again later


class RequestError(ValueError):
    """A request a stage cannot serve as asked: the node answers ``invalid_request`` naming ``field``.

    Raised by family code (a size this model cannot make, an option its pipeline lacks) so the
    client learns which of its fields to change.
    """

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
