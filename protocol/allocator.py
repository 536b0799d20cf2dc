"""Keep freed message buffers in the process for reuse, instead of handing them back to the kernel.

Each message a process receives lands in a fresh buffer that libzmq allocates, and the codec's
tensors are views of it. glibc serves a large allocation from a new memory mapping (or shrinks
its heap once a large block is freed), so a busy node or broker can page-fault every megabyte of
every tensor it receives in again: about 2000 faults, a few milliseconds, for 8 MiB. Raising the
mmap threshold above the largest tensor triptych sends and keeping a generous amount of freed
memory lets the next message reuse the last one's pages.

Call :func:`keep_freed_buffers` first thing in a process's entry point. It is a no-op where the C
library is not glibc, and it leaves alone a setting the user made with glibc's own environment
variables (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

# mallopt(3) parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's upper bound; smaller blocks come from the reusable heap
TRIM_THRESHOLD = 512 << 20  # freed memory kept for reuse before the heap is shrunk


def keep_freed_buffers(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Tune glibc's allocator for message-sized buffers; returns whether anything was set."""
    libc = _glibc()
    if libc is None:
        return False
    applied = False
    for env, param, value in (
        ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, mmap_threshold),
        ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, trim_threshold),
    ):
        if env in os.environ:
            continue  # the user's own choice wins
        if libc.mallopt(param, value) != 1:
            logger.debug("mallopt(%d, %d) was refused", param, value)
            continue
        applied = True
    return applied


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 -- present in glibc only
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc
