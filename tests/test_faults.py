"""kill -9 of a node holding a job: another node of its kind finishes the request.

To kill the node that really holds the job, the nodes of the kind under test are frozen
(SIGSTOP) before the job reaches them; the client's "stage started" event names the node the
broker chose, which is then killed while the other is thawed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from protocol.messages import SERVICES, ProgressEvent
from tests.support import ProcessCluster, max_pixel_difference, node_pid, serving

pytestmark = pytest.mark.e2e

PROMPT = "a lighthouse at dusk"


@pytest.fixture(scope="module")
def pool(checkpoints, tmp_path_factory) -> Iterator[ProcessCluster]:
    """Its own broker with two nodes of each kind for the tiny SD model."""
    with serving(tmp_path_factory.mktemp("fault-logs"), [checkpoints["sd-tiny"]], per_kind=2) as procs:
        yield procs


def _pids(procs: ProcessCluster, service: str) -> list[int]:
    return [node_pid(n["node"]) for n in procs.nodes() if n["service"] == service]


KILLED: set[int] = set()  # killed nodes stay listed until the broker misses their heartbeats


@pytest.mark.parametrize("service", SERVICES)
def test_kill_9_mid_request_still_completes(pool, checkpoints, reference, service):
    deadline = time.monotonic() + 120
    while len(pids := [pid for pid in _pids(pool, service) if pid not in KILLED]) < 2:
        assert time.monotonic() < deadline, f"fewer than two live {service} nodes\n{pool.logs()}"
        time.sleep(0.3)
    killed: list[int] = []
    frozen: list[int] = []
    steps = 60 if service == "denoiser" else 3

    def freeze() -> None:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)

    def on_progress(event: ProgressEvent) -> None:
        if killed:
            return
        if service == "decoder" and event.service == "denoiser" and not frozen:
            freeze()  # while the denoiser works, so the decode jobs land on frozen nodes
            return
        if event.service != service or (service == "denoiser" and event.step < 2):
            return
        victim = node_pid(event.node)
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        KILLED.add(victim)
        for pid in frozen:
            if pid != victim:
                os.kill(pid, signal.SIGCONT)

    if service == "encoder":
        freeze()
    try:
        with pool.client(timeout=120) as client:
            images = client.generate(
                PROMPT, model="sd-tiny", steps=steps, seed=42, num_images=3, on_progress=on_progress
            )
    finally:
        for pid in frozen:
            if pid not in killed:
                os.kill(pid, signal.SIGCONT)
    assert killed, f"no {service} job was seen starting"
    assert [image.index for image in images] == [0, 1, 2]
    for image in images:
        expected = reference(checkpoints["sd-tiny"], 42 + image.index, prompt=PROMPT, num_inference_steps=steps)
        assert max_pixel_difference(image.png, expected) <= 1
    # Replace the killed node so the next test again has two of each kind.
    pool.start_node(service, checkpoints["sd-tiny"])


def test_sigterm_finishes_the_job_in_hand_then_exits(pool, checkpoints, reference):
    """A node asked to stop mid-denoise completes that job, says goodbye and exits cleanly."""
    stopped: list[int] = []
    procs = {p.pid: p for p in pool.processes}

    def on_progress(event: ProgressEvent) -> None:
        if event.service == "denoiser" and event.step == 2 and not stopped:
            pid = node_pid(event.node)
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)

    with pool.client(timeout=120) as client:
        (image,) = client.generate(PROMPT, model="sd-tiny", steps=40, seed=8, on_progress=on_progress)
    expected = reference(checkpoints["sd-tiny"], 8, prompt=PROMPT, num_inference_steps=40)
    assert max_pixel_difference(image.png, expected) <= 1
    assert stopped and procs[stopped[0]].wait(timeout=30) == 0
    KILLED.add(stopped[0])
    pool.start_node("denoiser", checkpoints["sd-tiny"])
