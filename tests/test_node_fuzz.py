"""Real nodes behind a test-controlled broker socket: hostile jobs fail alone, the node serves on."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator

import pytest
import torch
import zmq

from protocol import codec, errors, messages
from protocol.codec import CodecError
from protocol.errors import RequestError
from protocol.messages import (
    PROTOCOL_VERSION,
    DecodedImage,
    DecodeJob,
    DenoisedLatents,
    DenoiseJob,
    Embeddings,
    EncodeImagesJob,
    EncodeJob,
    Heartbeat,
    JobCancel,
    JobFailed,
    RequestSpec,
    ResolvedParams,
    StageJob,
    StageResult,
    WorkerReady,
)
from protocol.tensors import WireTensor
from protocol.worker import failure
from tests.support import ProcessCluster

MODEL = "sd-tiny"
SERVICES = ("encoder", "denoiser", "decoder")


class FakeBroker:
    """A ROUTER socket the nodes register with; it heartbeats them and hands out jobs, nothing more."""

    def __init__(self) -> None:
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.nodes: dict[str, bytes] = {}  # service -> identity
        self.issued: set[str] = set()  # job ids sent
        self.strays: list[messages.Message] = []  # answers to jobs never sent
        self.last_beat = 0.0

    def _beat(self) -> None:
        """Heartbeat every node, so none decides the broker is gone and reconnects under a new identity."""
        if time.monotonic() - self.last_beat >= 0.5:
            for identity in self.nodes.values():
                self.socket.send_multipart([identity, *messages.to_frames(Heartbeat())])
            self.last_beat = time.monotonic()

    def receive(self, timeout: float) -> tuple[bytes, messages.Message] | None:
        self._beat()
        if not self.socket.poll(int(timeout * 1000)):
            return None
        identity, *frames = self.socket.recv_multipart()
        msg = messages.from_frames(frames)  # what a node sends is always well-formed
        if isinstance(msg, WorkerReady) and msg.state != messages.LOADING:  # a loading node takes no jobs yet
            self.nodes[msg.service] = identity
        if isinstance(msg, StageResult | JobFailed) and msg.job_id not in self.issued:
            self.strays.append(msg)
        return identity, msg

    def send(self, service: str, frames: list) -> None:
        self.socket.send_multipart([self.nodes[service], *frames])

    def ask(self, service: str, job_id: str, frames: list, timeout: float = 60) -> messages.Message:
        """Send a job's frames and wait for its answer: a stage result or a JobFailed."""
        self.issued.add(job_id)
        self.send(service, frames)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.receive(0.5)
            if got is not None and isinstance(got[1], StageResult | JobFailed) and got[1].job_id == job_id:
                return got[1]
        raise TimeoutError(f"no answer from the {service} to job {job_id}")

    def run(self, service: str, job: StageJob, timeout: float = 60) -> messages.Message:
        return self.ask(service, job.job_id, messages.to_frames(job), timeout)

    def run_raw(self, service: str, kind: str, timeout: float = 60, **fields: object) -> messages.Message:
        """Send a job as a raw msgpack map, which need not be a valid message."""
        job_id = uuid.uuid4().hex
        body = {"v": PROTOCOL_VERSION, "kind": kind, "job_id": job_id, "request_id": "r", **fields}
        return self.ask(service, job_id, codec.encode(body), timeout)


@pytest.fixture(scope="module")
def fake(checkpoints, tmp_path_factory) -> Iterator[FakeBroker]:
    broker = FakeBroker()
    procs = ProcessCluster(tmp_path_factory.mktemp("node-fuzz-logs"), address=broker.address)
    try:
        for service in SERVICES:
            procs.start_node(service, checkpoints[MODEL])
        deadline = time.monotonic() + 180
        while set(broker.nodes) != set(SERVICES):
            assert time.monotonic() < deadline, procs.logs()
            broker.receive(0.5)
        yield broker
        procs.check_alive()
    finally:
        procs.stop()
        broker.socket.close()


def _spec(**changes) -> RequestSpec:
    return RequestSpec(**{"model": MODEL, "prompt": "a cat", "steps": 2, "seed": 3, **changes})


def _plain_spec(**changes) -> dict:
    spec = _spec()
    return {**{name: getattr(spec, name) for name in spec.__dataclass_fields__}, **changes}


def _job_id() -> str:
    return uuid.uuid4().hex


def _encode(request: RequestSpec) -> EncodeJob:
    return EncodeJob(job_id=_job_id(), request_id="r", request=request)


def _denoise(request: RequestSpec, embeds: dict) -> DenoiseJob:
    return DenoiseJob(job_id=_job_id(), request_id="r", request=request, embeds=embeds)


def _assert_failed(answer: messages.Message, code: str, *words: str, field: str | None = None) -> None:
    assert isinstance(answer, JobFailed), answer
    assert answer.code == code, answer
    assert answer.field == field, answer
    for word in words:
        assert word in answer.error, answer


@pytest.mark.e2e
def test_hostile_jobs_fail_alone_and_nodes_serve_on(fake):
    good = fake.run("encoder", _encode(_spec(num_images=2)))
    assert isinstance(good, Embeddings), good
    embeds = good.embeds  # as the broker holds them: WireTensors, forwarded untouched
    assert embeds and all(isinstance(tensor, WireTensor) for tensor in embeds.values())
    plain = _plain_spec()

    # Jobs that fail their checks are answered, naming what is wrong, instead of being dropped.
    malformed = [
        ("encoder", "encode_job", {}, "request"),
        ("encoder", "encode_job", {"request": "not a map"}, "request"),
        ("encoder", "encode_job", {"request": {"prompt": 5}}, "request.prompt"),
        ("encoder", "encode_job", {"request": {**plain, "seed": "3"}}, "request.seed"),
        ("encoder", "encode_job", {"request": {**plain, "colour": "red"}}, "colour"),
        ("encoder", "encode_job", {"request": {**plain, "prompt": torch.ones(3)}}, "request.prompt"),
        ("encoder", "encode_job", {"request": plain, "payload": {}}, "payload"),
        ("denoiser", "denoise_job", {"request": plain}, "embeds"),
        ("denoiser", "denoise_job", {"request": plain, "embeds": {"prompt_embeds": "text"}}, "prompt_embeds"),
        ("denoiser", "denoise_job", {"request": plain, "embeds": [torch.zeros(1, 77, 32)]}, "embeds"),
        ("decoder", "encode_images_job", {"request": plain, "images": "not a list"}, "images"),
        ("decoder", "encode_images_job", {"request": plain, "images": [torch.ones(8, dtype=torch.uint8)]}, "images"),
        ("decoder", "decode_job", {"index": 0, "latents": b"\x00" * 1024}, "latents"),
        (
            "decoder",
            "decode_job",
            {"params": {"model": MODEL}, "index": 0, "latents": torch.zeros(1, 4, 8, 8)},
            "params",
        ),
    ]
    for service, kind, fields, named in malformed:
        answer = fake.run_raw(service, kind, **fields)
        _assert_failed(answer, errors.MODEL_ERROR, "malformed", named)
    # A job of another protocol version is refused as well, not left waiting.
    job_id = _job_id()
    body = {"v": PROTOCOL_VERSION - 1, "kind": "encode_job", "job_id": job_id, "request_id": "r", "request": plain}
    _assert_failed(fake.ask("encoder", job_id, codec.encode(body)), errors.MODEL_ERROR, "version")

    # A node refuses the jobs of another kind of node.
    params = ResolvedParams(
        model=MODEL,
        family="sd",
        prompt="a cat",
        negative_prompt="",
        seed=3,
        steps=2,
        guidance=7.5,
        true_cfg=None,
        height=64,
        width=64,
    )
    latents_job = DecodeJob(job_id=_job_id(), request_id="r", params=params, index=0, latents=torch.zeros(1, 4, 8, 8))
    for service, job in [
        ("encoder", _denoise(_spec(), embeds)),
        ("denoiser", _encode(_spec())),
        ("decoder", _encode(_spec())),
        ("encoder", latents_job),
    ]:
        _assert_failed(fake.run(service, job), errors.MODEL_ERROR, service, job.KIND)

    # Requests the model cannot serve as asked name the field at fault.
    _assert_failed(fake.run("denoiser", _denoise(_spec(height=100), embeds)), errors.INVALID_REQUEST, field="height")
    _assert_failed(
        fake.run("denoiser", _denoise(_spec(true_cfg=4.0), embeds)),
        errors.INVALID_REQUEST,
        "true_cfg",
        field="true_cfg",
    )
    _assert_failed(
        fake.run("denoiser", _denoise(_spec(scheduler="no-such-sampler"), embeds)),
        errors.INVALID_REQUEST,
        "no-such-sampler",
        field="scheduler",
    )
    not_an_image = EncodeImagesJob(job_id=_job_id(), request_id="r", request=_spec(), images=[b"not an image"])
    _assert_failed(fake.run("decoder", not_an_image), errors.INVALID_REQUEST, field="image")

    # Well-formed jobs the model itself raises on: embeddings of the wrong width.
    for service, job in [
        ("denoiser", _denoise(_spec(), {"prompt_embeds": torch.zeros(1, 77, 5)})),
        ("denoiser", _denoise(_spec(num_images=2), {"prompt_embeds": torch.zeros(2, 77, 5)})),
    ]:
        answer = fake.run(service, job)
        assert isinstance(answer, JobFailed) and answer.code == errors.MODEL_ERROR, answer
        assert answer.error and answer.field is None

    # Garbage and stray control messages are dropped without an answer.
    rng = random.Random(7)
    for _ in range(300):
        for service in SERVICES:
            fake.send(service, [rng.randbytes(rng.randrange(40))])
    fake.send("denoiser", messages.to_frames(JobCancel(job_id="nobody")))
    fake.send("decoder", messages.to_frames(Embeddings(job_id="nobody", embeds={})))

    # The denoiser still makes real latents from the real embeddings, and the decoder a PNG of each image.
    answer = fake.run("denoiser", _denoise(_spec(num_images=2), embeds))
    assert isinstance(answer, DenoisedLatents), answer
    assert isinstance(answer.latents, WireTensor) and answer.latents.shape == (2, 4, 8, 8)
    assert answer.params.seed == 3 and answer.params.steps == 2
    for index in range(2):
        job = DecodeJob(
            job_id=_job_id(),
            request_id="r",
            params=answer.params,
            index=index,
            latents=answer.latents.rows(index, index + 1),
        )
        image = fake.run("decoder", job)
        assert isinstance(image, DecodedImage), image
        assert image.png.startswith(b"\x89PNG")
    # ... and latents of the wrong number of channels fail at the decoder's VAE.
    bad_latents = DecodeJob(
        job_id=_job_id(), request_id="r", params=answer.params, index=0, latents=torch.zeros(1, 3, 8, 8)
    )
    _assert_failed(fake.run("decoder", bad_latents), errors.MODEL_ERROR)
    assert fake.strays == []  # nothing answered the garbage


@pytest.mark.e2e
def test_a_job_whose_tensor_torch_cannot_build_fails_alone(fake):
    """Zero elements in all, but dimensions no torch tensor can have (its strides overflow)."""
    huge = WireTensor("float32", (0, 2**32, 2**32), memoryview(b""))
    job = _denoise(_spec(), {"prompt_embeds": huge})
    answer = fake.run("denoiser", job, timeout=20)
    assert isinstance(answer, JobFailed), answer
    good = fake.run("encoder", _encode(_spec()))
    assert isinstance(fake.run("denoiser", _denoise(_spec(), good.embeds)), DenoisedLatents)


# --- what a handler's exception becomes ---------------------------------------------------------


def test_a_request_error_is_an_invalid_request_naming_its_field():
    answer = failure("j1", RequestError("height", "height must be a multiple of 8 for sd (got 100)"))
    assert answer == JobFailed(
        job_id="j1",
        error="height must be a multiple of 8 for sd (got 100)",
        code=errors.INVALID_REQUEST,
        field="height",
    )


def test_a_request_error_without_a_field_is_still_an_invalid_request():
    answer = failure("j1", RequestError(None, "this model takes no negative prompt"))
    assert answer.code == errors.INVALID_REQUEST and answer.field is None


def test_out_of_memory_is_named():
    answer = failure("j2", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert answer.code == errors.OUT_OF_MEMORY and answer.field is None
    assert answer.error.startswith("out of memory")
    assert "Tried to allocate 2 GiB" in answer.error
    assert errors.OUT_OF_MEMORY in errors.RETRYABLE


def test_an_out_of_memory_runtime_error_is_named_too():
    answer = failure("j2", RuntimeError("CUDA error: out of memory"))
    assert answer.code == errors.OUT_OF_MEMORY


def test_any_other_exception_is_a_model_error():
    answer = failure("j3", ValueError("bad"))
    assert answer == JobFailed(job_id="j3", error="ValueError: bad", code=errors.MODEL_ERROR, field=None)
    assert failure("j3", KeyError("prompt_embeds")).error == "KeyError: 'prompt_embeds'"


def test_a_failure_keeps_the_first_line_of_the_error_and_at_most_500_characters():
    answer = failure("j4", RuntimeError("first line\n" + "second line"))
    assert answer.error == "RuntimeError: first line"
    assert len(failure("j4", RuntimeError("x" * 5000)).error) == 500
    assert len(failure("j4", RequestError("prompt", "y" * 5000)).error) == 500


@pytest.mark.parametrize("exc", [RequestError("steps", "s"), torch.OutOfMemoryError("o"), ValueError("v"), Exception()])
def test_every_failure_travels(exc):
    answer = failure("j5", exc)
    assert answer.code in errors.CODES
    assert messages.from_frames(messages.to_frames(answer)) == answer


def test_a_result_the_wire_cannot_carry_is_a_codec_error():
    result = Embeddings(job_id="x", embeds={"t": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(CodecError):
        messages.to_frames(result)
