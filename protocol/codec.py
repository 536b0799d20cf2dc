"""Wire codec: Python values and tensors <-> a list of ZeroMQ frames.

Frame 0 is a msgpack document. A tensor inside it is a msgpack extension holding
``[dtype, shape, data]`` where ``data`` is either the raw bytes (small tensors, inline) or
the index of an extra frame that carries the bytes (large tensors, sent with ``copy=False``
so an embedding is never copied into the msgpack buffer).

Decoding never runs code: only plain msgpack types and tensors of an allow-listed dtype are
rebuilt, and a tensor's byte length must equal ``numel * itemsize`` before it is built. The work a
message may cost is bounded before msgpack builds anything (:mod:`protocol.budget`: values and
nesting across the whole document, and at most ``MAX_TENSORS`` tensors). A tensor
decodes to a :class:`~protocol.tensors.WireTensor` sharing memory with the received frame (the
broker forwards it as is); ``torch_tensors=True`` rebuilds torch tensors instead, for the nodes.
Nothing here imports torch unless a torch tensor is encoded or asked for.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import msgpack

from protocol.budget import BudgetError, check_budget
from protocol.tensors import ITEMSIZES, WireTensor, is_torch_tensor, to_torch

EXT_TENSOR = 1
INLINE_MAX_BYTES = 1024  # tensors up to this size travel inside the msgpack document
MAX_DIMS = 8
MAX_TENSOR_BYTES = 1 << 32  # 4 GiB: anything larger is hostile or a bug
MAX_FRAMES = 4096
MAX_TENSORS = 256  # tensors in one message (a stage result holds a few)
SPEC_MAX_BYTES = 4096  # one tensor's [dtype, shape, data] spec: inline data is at most INLINE_MAX_BYTES
DTYPE_NAMES = tuple(ITEMSIZES)  # the only dtypes that may cross the wire

# Limits handed to the msgpack unpacker so a hostile header cannot allocate without bound.
_UNPACK_LIMITS = {
    "max_str_len": 16 << 20,
    "max_bin_len": 64 << 20,
    "max_array_len": 1 << 16,
    "max_map_len": 1 << 12,
    "max_ext_len": SPEC_MAX_BYTES,
}

Frame = bytes | memoryview | Any  # zmq.Frame is accepted too (anything with the buffer protocol)


class CodecError(ValueError):
    """A message could not be encoded or decoded."""


def _torch_bytes(tensor: Any) -> tuple[str, tuple[int, ...], memoryview]:
    """dtype name, shape and raw bytes of a CPU torch tensor, without copying (uint8 view: bfloat16, bool)."""
    import torch

    name = str(tensor.dtype).removeprefix("torch.")
    if name not in ITEMSIZES:
        raise CodecError(f"dtype {tensor.dtype} is not allowed on the wire")
    if tensor.device.type != "cpu":
        raise CodecError("tensors cross the wire on CPU; move it with .cpu() first")
    dense = tensor.detach().contiguous()
    # Not reshape(-1): a contiguous tensor may keep any stride on a size-1 dim, and view(uint8) needs stride 1.
    flat = dense.as_strided((dense.numel(),), (1,))
    data = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
    return name, tuple(tensor.shape), data


def _spec_of(value: Any) -> tuple[str, tuple[int, ...], memoryview]:
    if isinstance(value, WireTensor):
        return value.dtype, value.shape, value.data
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.ndarray):
        import torch

        value = torch.from_numpy(value)
    if is_torch_tensor(value):
        return _torch_bytes(value)
    raise CodecError(f"cannot encode a value of type {type(value).__name__}")


def encode(obj: Any) -> list[bytes | memoryview]:
    """Encode ``obj`` into frames: ``[msgpack header, *tensor buffers]``."""
    frames: list[bytes | memoryview] = [b""]

    def default(value: Any) -> msgpack.ExtType:
        name, shape, data = _spec_of(value)
        if data.nbytes <= INLINE_MAX_BYTES:
            ref: bytes | int = data.tobytes()
        else:
            ref = len(frames)
            frames.append(data)
        spec = msgpack.packb([name, list(shape), ref], use_bin_type=True)
        return msgpack.ExtType(EXT_TENSOR, spec)

    try:
        frames[0] = msgpack.packb(obj, default=default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, CodecError):
            raise
        raise CodecError(str(exc)) from exc
    return frames


def _buffer(frame: Frame) -> memoryview:
    buffer = getattr(frame, "buffer", None)  # zmq.Frame
    return buffer if buffer is not None else memoryview(frame)


def _check_spec(spec: Any) -> tuple[str, tuple[int, ...], bytes | int]:
    if not (isinstance(spec, list) and len(spec) == 3):
        raise CodecError("tensor spec must be [dtype, shape, data]")
    name, shape, ref = spec
    if not isinstance(name, str) or name not in ITEMSIZES:
        raise CodecError(f"dtype {name!r} is not allowed on the wire")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise CodecError(f"tensor shape must be a list of at most {MAX_DIMS} sizes")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise CodecError(f"tensor shape {shape!r} must hold non-negative integers")
    if math.prod(max(n, 1) for n in shape) > MAX_TENSOR_BYTES:
        # A zero-sized tensor's other sizes together, as torch multiplies them into its strides.
        raise CodecError(f"tensor shape {shape!r} spans more than {MAX_TENSOR_BYTES} elements")
    if not isinstance(ref, bytes | int) or isinstance(ref, bool):
        raise CodecError("tensor data must be bytes or a frame index")
    return name, tuple(shape), ref


_PLAIN_TYPES = (type(None), bool, int, float, str, bytes, WireTensor)


def _check_plain(obj: Any) -> None:
    """Refuse what msgpack rebuilds on its own besides plain values: its Timestamp (extension -1)."""
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif not isinstance(value, _PLAIN_TYPES):
            raise CodecError(f"msgpack type {type(value).__name__} is not allowed on the wire")


def peek(frame: Frame) -> Any:
    """The msgpack document of a message's first frame with its tensors left unbuilt (None): enough to
    read the kind and job id of a message that failed to decode. Bounded as :func:`decode` is."""
    try:
        header = _buffer(frame)
        check_budget(header)
        return msgpack.unpackb(
            header, ext_hook=lambda code, data: None, raw=False, strict_map_key=True, **_UNPACK_LIMITS
        )
    except Exception as exc:  # msgpack raises several types on garbage
        raise CodecError(f"malformed message: {type(exc).__name__}: {exc}") from None


def decode(frames: Sequence[Frame], *, torch_tensors: bool = False) -> Any:
    """Decode frames made by :func:`encode`; raises :class:`CodecError` on anything malformed.

    Tensors come back as :class:`WireTensor`, or as torch tensors with ``torch_tensors``.
    """
    if not frames:
        raise CodecError("no frames")
    if len(frames) > MAX_FRAMES:
        raise CodecError(f"too many frames ({len(frames)} > {MAX_FRAMES})")
    used: set[int] = set()
    tensors = 0

    def ext_hook(code: int, data: bytes) -> WireTensor:
        nonlocal tensors
        if code != EXT_TENSOR:
            raise CodecError(f"unknown msgpack extension type {code}")
        tensors += 1
        if tensors > MAX_TENSORS:
            raise CodecError(f"more than {MAX_TENSORS} tensors in one message")
        try:
            check_budget(data, max_objects=64, max_depth=3)  # room for the shape check to name what is wrong
            spec = msgpack.unpackb(data, raw=False, **_UNPACK_LIMITS)
        except Exception as exc:
            raise CodecError(f"malformed tensor spec: {exc}") from exc
        dtype, shape, ref = _check_spec(spec)
        if isinstance(ref, int):
            if not 1 <= ref < len(frames) or ref in used:
                raise CodecError(f"tensor frame index {ref} is invalid or used twice")
            used.add(ref)
            buffer = _buffer(frames[ref])
        else:
            buffer = memoryview(ref)
        expected = math.prod(shape) * ITEMSIZES[dtype]
        if expected > MAX_TENSOR_BYTES:
            raise CodecError(f"tensor of {expected} bytes exceeds the {MAX_TENSOR_BYTES} byte limit")
        if buffer.nbytes != expected:
            raise CodecError(
                f"tensor byte length {buffer.nbytes} does not match shape {list(shape)} of {dtype} ({expected} bytes)"
            )
        return WireTensor(dtype, shape, buffer.cast("B") if buffer.nbytes else memoryview(b""))

    try:
        header = _buffer(frames[0])
        check_budget(header)
    except BudgetError as exc:
        raise CodecError(f"message refused before decoding: {exc}") from None
    except TypeError as exc:
        raise CodecError(f"a frame must be bytes: {exc}") from None
    try:
        obj = msgpack.unpackb(header, ext_hook=ext_hook, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises several types on garbage, incl. ValueError/TypeError
        raise CodecError(f"malformed message: {type(exc).__name__}: {exc}") from exc
    _check_plain(obj)
    if len(used) != len(frames) - 1:
        raise CodecError(f"{len(frames) - 1 - len(used)} frame(s) not referenced by the message")
    if not torch_tensors:
        return obj
    try:
        return to_torch(obj)
    except (RuntimeError, ValueError) as exc:  # checked above; torch refusing anyway must not escape as such
        raise CodecError(f"tensor could not be built: {exc}") from exc
