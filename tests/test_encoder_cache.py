"""The encoder's embedding cache: byte-bounded LRU, one computation per key even when concurrent."""

from __future__ import annotations

import contextlib
import threading
import time

import torch

from encoder_node.cache import EmbeddingCache


def _tensors(kib: int) -> dict[str, torch.Tensor]:
    return {"prompt_embeds": torch.zeros(kib * 256)}  # float32: 1 KiB per 256 values


def test_hit_returns_the_same_tensors_without_computing():
    cache = EmbeddingCache(1 << 20)
    calls = []
    first = cache(("m", "a cat"), lambda: calls.append(1) or _tensors(1))
    again = cache(("m", "a cat"), lambda: calls.append(1) or _tensors(1))
    assert again is first and calls == [1]
    assert (cache.hits, cache.misses) == (1, 1)


def test_evicts_least_recently_used_beyond_its_bytes():
    cache = EmbeddingCache(3 * 1024)
    for key in "abc":
        cache((key,), lambda: _tensors(1))
    cache(("a",), lambda: _tensors(1))  # a is now the most recent
    cache(("d",), lambda: _tensors(1))  # over budget: b goes
    assert cache.bytes == 3 * 1024 and len(cache) == 3
    computed = []
    cache(("b",), lambda: computed.append("b") or _tensors(1))
    cache(("a",), lambda: computed.append("a") or _tensors(1))
    assert computed == ["b"]


def test_an_entry_larger_than_the_cache_is_not_kept():
    cache = EmbeddingCache(1024)
    cache(("big",), lambda: _tensors(4))
    assert len(cache) == 0 and cache.bytes == 0


def test_concurrent_identical_keys_compute_once():
    cache = EmbeddingCache(1 << 20)
    calls = []

    def slow() -> dict[str, torch.Tensor]:
        calls.append(1)
        time.sleep(0.2)
        return _tensors(1)

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache(("same",), slow))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1] and len(results) == 8 and all(r is results[0] for r in results)


def test_a_failed_computation_is_not_cached_and_does_not_block():
    cache = EmbeddingCache(1 << 20)

    def boom() -> dict[str, torch.Tensor]:
        raise RuntimeError("encoder failed")

    for _ in range(2):
        with contextlib.suppress(RuntimeError):
            cache(("k",), boom)
    assert cache(("k",), lambda: _tensors(1))["prompt_embeds"].numel() == 256
