"""Real nodes behind a test-controlled broker socket: hostile jobs fail alone, the node serves on."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator

import pytest
import torch
import zmq

from protocol import messages
from protocol.codec import CodecError
from protocol.messages import GenerateRequest, JobAssign, JobCancel, JobDone, JobFailed, WorkerReady
from protocol.worker import describe_error
from tests.support import ProcessCluster

pytestmark = pytest.mark.e2e

MODEL = "sd-tiny"


class FakeBroker:
    def __init__(self) -> None:
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.nodes: dict[str, bytes] = {}  # service -> identity

    def receive(self, timeout: float) -> tuple[bytes, messages.Message] | None:
        if not self.socket.poll(int(timeout * 1000)):
            return None
        identity, *frames = self.socket.recv_multipart()
        msg = messages.from_frames(frames)
        if isinstance(msg, WorkerReady):
            self.nodes[msg.service] = identity
        return identity, msg

    def send(self, service: str, frames: list) -> None:
        self.socket.send_multipart([self.nodes[service], *frames])

    def run_job(self, service: str, payload: dict, timeout: float = 60) -> messages.Message:
        job_id = uuid.uuid4().hex
        self.send(service, messages.to_frames(JobAssign(job_id=job_id, request_id="r", payload=payload)))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.receive(0.5)
            if got is not None and isinstance(got[1], JobDone | JobFailed) and got[1].job_id == job_id:
                return got[1]
        raise TimeoutError(f"no answer to the {service} job")


@pytest.fixture(scope="module")
def fake(checkpoints, tmp_path_factory) -> Iterator[FakeBroker]:
    broker = FakeBroker()
    procs = ProcessCluster(tmp_path_factory.mktemp("node-fuzz-logs"), address=broker.address)
    try:
        procs.start_node("encoder", checkpoints[MODEL])
        procs.start_node("denoiser", checkpoints[MODEL])
        deadline = time.monotonic() + 180
        while set(broker.nodes) != {"encoder", "denoiser"}:
            assert time.monotonic() < deadline, procs.logs()
            broker.receive(0.5)
        yield broker
        procs.check_alive()
    finally:
        procs.stop()
        broker.socket.close()


def _request(**changes) -> dict:
    request = GenerateRequest(request_id="r", model=MODEL, prompt="a cat", steps=2, seed=3, **changes)
    return {name: getattr(request, name) for name in request.__dataclass_fields__}


def test_hostile_jobs_fail_alone_and_nodes_serve_on(fake):
    good = fake.run_job("encoder", {"request": _request()})
    assert isinstance(good, JobDone)
    embeds = good.payload["embeds"]
    hostile = [
        ("encoder", {}),
        ("encoder", {"request": "not a map"}),
        ("encoder", {"request": {"prompt": 5}}),
        ("denoiser", {"request": _request()}),
        ("denoiser", {"request": _request(), "embeds": {"prompt_embeds": "text"}}),
        # The model itself raises on embeddings of the wrong width.
        ("denoiser", {"request": _request(), "embeds": {"prompt_embeds": torch.zeros(1, 77, 5)}}),
        ("denoiser", {"request": _request(num_images=2), "embeds": {"prompt_embeds": torch.zeros(2, 77, 5)}}),
    ]
    for service, payload in hostile:
        answer = fake.run_job(service, payload)
        assert isinstance(answer, JobFailed), (service, payload)
        assert answer.error
    # Garbage and stray control messages are dropped without an answer.
    rng = random.Random(7)
    for _ in range(300):
        for service in ("encoder", "denoiser"):
            fake.send(service, [rng.randbytes(rng.randrange(40))])
    fake.send("denoiser", messages.to_frames(JobCancel(job_id="nobody")))
    # The denoiser still produces real latents from the real embeddings.
    answer = fake.run_job("denoiser", {"request": _request(), "embeds": embeds})
    assert isinstance(answer, JobDone), answer
    assert answer.payload["latents"].shape == (1, 4, 8, 8)


def test_out_of_memory_is_named():
    assert describe_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")).startswith(
        "out of memory"
    )
    assert describe_error(ValueError("bad")) == "ValueError: bad"
    with pytest.raises(CodecError):
        messages.to_frames(JobDone(job_id="x", payload={"t": torch.zeros(2, dtype=torch.complex64)}))
