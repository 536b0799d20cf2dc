"""Tensors as they cross the wire: dtype, shape and bytes, checked, and torch only where wanted.

The broker and the client never need torch: the broker forwards embeddings and latents
untouched (slicing a batch of latents into one job per image is a view of the bytes), and the
client receives no tensors at all. So the codec decodes a tensor into a :class:`WireTensor`
and only a node, which computes with it, rebuilds a ``torch.Tensor`` (sharing the received
buffer, no copy).
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    import torch

# The only dtypes that may cross the wire, by name, with their item sizes.
ITEMSIZES: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
}


@dataclass(frozen=True)
class WireTensor:
    """A received tensor: an allow-listed dtype, a shape, and a buffer of exactly the right size."""

    dtype: str  # a key of ITEMSIZES
    shape: tuple[int, ...]
    data: memoryview  # C-contiguous bytes, numel * itemsize of them; read-only

    def __post_init__(self) -> None:
        if self.data.format != "B" or self.data.ndim != 1:  # rows() slices bytes
            object.__setattr__(self, "data", self.data.cast("B") if self.data.nbytes else memoryview(b""))
        expected = math.prod(self.shape) * ITEMSIZES[self.dtype]
        if self.data.nbytes != expected:
            raise ValueError(f"{self.data.nbytes} bytes do not hold a {self.dtype} tensor of shape {list(self.shape)}")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def rows(self, start: int, stop: int) -> WireTensor:
        """Rows ``start:stop`` of the first dimension, as a view of the same bytes."""
        if not (self.shape and 0 <= start <= stop <= self.shape[0]):
            raise IndexError(f"rows {start}:{stop} of a tensor of shape {list(self.shape)}")
        row = self.data.nbytes // self.shape[0] if self.shape[0] else 0
        return WireTensor(self.dtype, (stop - start, *self.shape[1:]), self.data[start * row : stop * row])

    def to_torch(self) -> torch.Tensor:
        """The torch tensor over these bytes (no copy; read-only by convention)."""
        import torch

        dtype = getattr(torch, self.dtype)
        if self.data.nbytes == 0:
            return torch.empty(self.shape, dtype=dtype)
        with warnings.catch_warnings():  # torch warns that the frame's buffer is not writable: by design
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(self.data.cast("B"), dtype=torch.uint8)
        return raw.view(dtype).reshape(self.shape)


# What a tensor-valued message field holds: a WireTensor where it was received by the broker,
# a torch.Tensor where a node built or rebuilt it. The codec encodes either.
if TYPE_CHECKING:
    Tensor: TypeAlias = "torch.Tensor | WireTensor"
else:

    class Tensor:
        """Marker for tensor-valued message fields (see protocol.messages)."""


def is_torch_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch.Tensor, without importing torch (if it isn't loaded, nothing is)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def is_tensor(value: Any) -> bool:
    return isinstance(value, WireTensor) or is_torch_tensor(value)


def to_torch(value: Any) -> Any:
    """``value`` with every WireTensor inside (dicts, lists) rebuilt as a torch tensor."""
    if isinstance(value, WireTensor):
        return value.to_torch()
    if isinstance(value, dict):
        return {key: to_torch(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_torch(item) for item in value]
    return value
