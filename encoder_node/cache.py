"""A byte-bounded LRU cache of encoder outputs, so each distinct text is encoded once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

Tensors = dict[str, torch.Tensor]


def tensors_bytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class EmbeddingCache:
    """``cache(key, compute)`` returns the cached tensors for ``key`` or computes and keeps them.

    Entries are evicted least recently used first once their bytes exceed ``max_bytes``. A
    computation for a key already being computed by another thread is waited for, not repeated.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, Tensors] = OrderedDict()
        self._lock = threading.Lock()
        self._pending: dict[Hashable, threading.Event] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __call__(self, key: Hashable, compute: Callable[[], Tensors]) -> Tensors:
        while True:
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return self._entries[key]
                waiting = self._pending.get(key)
                if waiting is None:
                    self._pending[key] = threading.Event()
                    self.misses += 1
                    break
            waiting.wait()  # another thread is encoding this very key; then look again
        try:
            value = compute()
            self._put(key, value)
            return value
        finally:
            with self._lock:
                self._pending.pop(key).set()

    def _put(self, key: Hashable, value: Tensors) -> None:
        size = tensors_bytes(value)
        if size > self.max_bytes:
            return
        with self._lock:
            self._entries[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= tensors_bytes(evicted)
