"""protocol.allocator: received buffers are reused instead of page-faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from protocol.allocator import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="the allocator tuning applies to glibc only")

MESSAGE = 8 << 20
PAGES = MESSAGE // 4096

# The pattern a broker and a node have: an IO thread allocates each arriving message, the main
# thread frees it a few messages later, once the stage that needed it has answered.
SCRIPT = textwrap.dedent(
    """
    import ctypes, json, queue, resource, sys, threading
    from protocol.allocator import keep_freed_buffers

    applied = keep_freed_buffers() if sys.argv[1] == "tuned" else False
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size, held, arrived, todo = {size}, [], queue.Queue(), queue.Queue()

    def receive():  # the IO thread: a fresh buffer per message, written in full
        while todo.get():
            buffer = libc.malloc(size)
            ctypes.memset(buffer, 1, size)
            arrived.put(buffer)

    def message():
        todo.put(True)
        held.append(arrived.get())
        while len(held) > 4:
            libc.free(held.pop(0))

    threading.Thread(target=receive, daemon=True).start()
    for _ in range(5):
        message()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        message()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
    print(json.dumps({{"applied": applied, "faults": faults}}))
    """
).format(size=MESSAGE)


def faults_per_message(mode: str, env: dict[str, str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | (env or {})
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, timeout=60, env=env
    ).stdout
    return json.loads(out)


def test_received_buffers_are_reused_not_faulted_in_again() -> None:
    plain = faults_per_message("plain")
    tuned = faults_per_message("tuned")
    assert tuned["applied"]
    # Without the tuning this pattern faults whole messages in again; the scenario must show it.
    assert plain["faults"] > PAGES / 8, plain
    assert tuned["faults"] < PAGES / 50, (plain, tuned)


def test_the_users_own_glibc_settings_win() -> None:
    env = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10), "MALLOC_TRIM_THRESHOLD_": str(128 << 10)}
    result = faults_per_message("tuned", env)
    assert not result["applied"]
    assert result["faults"] > PAGES / 8  # glibc's own (user-chosen) behaviour, untouched
