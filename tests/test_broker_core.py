"""The broker's routing, message by message, with fake nodes and a fake client and no sockets.

Every message in and out also goes through to_frames/from_frames, so what the core sends is
known to survive the wire (tensors reach the core, and come back out of it, as WireTensors).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from protocol import errors, messages
from protocol.broker_core import MAX_STATUS_NODES, STARTUP_GRACE, BrokerCore
from protocol.limits import RequestLimits
from protocol.messages import (
    DECODER,
    DENOISER,
    ENCODER,
    LOADING,
    READY,
    CancelRequest,
    DecodedImage,
    DecodeJob,
    DenoisedLatents,
    DenoiseJob,
    Embeddings,
    EncodeJob,
    GenerateRequest,
    Heartbeat,
    ImageResult,
    JobCancel,
    JobFailed,
    JobProgress,
    Message,
    ProgressEvent,
    ProtocolError,
    Reconnect,
    RequestAccepted,
    RequestFailed,
    ResolvedParams,
    StageJob,
    StatusReply,
    StatusRequest,
    WorkerGoodbye,
    WorkerReady,
)
from protocol.peers import CLIENT as CLIENT_ROLE
from protocol.peers import NODE as NODE_ROLE
from protocol.peers import Peer
from protocol.sockets import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS
from protocol.tensors import WireTensor
from protocol.watchdog import StallPolicy

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

MODEL = "sd-tiny"
CLIENT = b"client"
ENC, DEN, DEC = b"enc", b"den", b"dec"
EXPIRY = HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS  # 3 s of silence and a node is presumed dead

Sent = list[tuple[bytes, Message]]


def wire(message: Message) -> Message:
    return messages.from_frames(messages.to_frames(message))


class Sim:
    """A BrokerCore with a clock; each call returns (and clears) what the core sent."""

    def __init__(self, **kwargs) -> None:
        self.core = BrokerCore(**kwargs)
        self.now = 1000.0

    def send(self, sender: bytes, message: Message, at: float | None = None, peer: Peer | None = None) -> Sent:
        self.now = self.now if at is None else at
        self.core.handle(sender, wire(message), self.now, peer=peer)
        return self.take()

    def tick(self, at: float) -> Sent:
        self.now = at
        self.core.tick(at)
        return self.take()

    def take(self) -> Sent:
        outbox, self.core.outbox = self.core.outbox, []
        return [(identity, wire(message)) for identity, message in outbox]

    def register(
        self, identity: bytes, service: str, model: str = MODEL, capacity: int = 1, state: str = READY
    ) -> Sent:
        node = f"{identity.decode()}-node"
        return self.send(identity, WorkerReady(service=service, model=model, node=node, capacity=capacity, state=state))

    def status(self) -> StatusReply:
        return only(self.send(b"someone", StatusRequest(request_id="s")), StatusReply)


def sent(out: Sent, kind: type[Message], to: bytes | None = None) -> list:
    return [m for identity, m in out if isinstance(m, kind) and (to is None or identity == to)]


def only(out: Sent, kind: type[Message], to: bytes | None = None):
    found = sent(out, kind, to)
    assert len(found) == 1, f"expected one {kind.__name__} to {to!r}, got {out}"
    return found[0]


def request(request_id: str = "r1", **changes) -> GenerateRequest:
    fields = {"request_id": request_id, "model": MODEL, "prompt": "a red fox", "seed": 42, **changes}
    return GenerateRequest(**fields)


PARAMS = ResolvedParams(
    model=MODEL,
    family="sd",
    prompt="a red fox",
    negative_prompt="",
    seed=42,
    steps=20,
    guidance=7.5,
    true_cfg=None,
    height=64,
    width=64,
)
EMBEDS = {"prompt_embeds": torch.randn(1, 77, 32)}  # (B, 77, D)


def latents(count: int) -> torch.Tensor:
    return torch.randn(count, 4, 8, 8)  # (num_images, C, H/8, W/8)


def embedded(job: StageJob, **stats) -> Embeddings:
    return Embeddings(job_id=job.job_id, embeds=EMBEDS, stats=stats)


def denoised(job: StageJob, count: int = 1, **changes) -> DenoisedLatents:
    return DenoisedLatents(**{"job_id": job.job_id, "latents": latents(count), "params": PARAMS, **changes})


def decoded(job: StageJob, png: bytes = b"png") -> DecodedImage:
    return DecodedImage(job_id=job.job_id, png=png)


def torch_of(tensor: WireTensor | torch.Tensor) -> torch.Tensor:
    return tensor.to_torch() if isinstance(tensor, WireTensor) else tensor


def to_denoise(sim: Sim, request_id: str, **changes) -> Sent:
    """Submit a request and answer its encode job; returns what the embeddings set off."""
    job = only(sim.send(CLIENT, request(request_id, **changes)), EncodeJob, ENC)
    return sim.send(ENC, embedded(job))


def assigned(out: Sent) -> dict[bytes, list[StageJob]]:
    jobs: dict[bytes, list[StageJob]] = {}
    for identity, message in out:
        if isinstance(message, StageJob):
            jobs.setdefault(identity, []).append(message)
    return jobs


# --- the chain of jobs ------------------------------------------------------------------------


def test_full_chain_gives_one_image_per_seed_then_forgets_the_request():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    sim.register(DEC, DECODER, capacity=3)

    # 1. The request is accepted and its encode job goes to the encoder.
    out = sim.send(CLIENT, request(num_images=3, steps=20))
    assert only(out, RequestAccepted, CLIENT).request_id == "r1"
    encode = only(out, EncodeJob, ENC)
    assert encode.request_id == "r1"
    assert encode.request == request(num_images=3, steps=20).spec()
    progress = sent(out, ProgressEvent, CLIENT)
    assert [(e.stage, e.service, e.node) for e in progress] == [("encode", ENCODER, "enc-node")]

    # 2. Embeddings go to the denoiser with the request.
    embeds = torch.randn(1, 77, 32).to(torch.bfloat16)
    out = sim.send(ENC, Embeddings(job_id=encode.job_id, embeds={"prompt_embeds": embeds}))
    denoise = only(out, DenoiseJob, DEN)
    assert torch.equal(torch_of(denoise.embeds["prompt_embeds"]), embeds)
    assert denoise.request.num_images == 3 and denoise.request.steps == 20
    assert [(e.stage, e.service) for e in sent(out, ProgressEvent, CLIENT)] == [("denoise", DENOISER)]

    # 3. Latents for 3 images become 3 decode jobs, one image each.
    batch = latents(3)
    warnings = ["guidance ignored: this pipeline takes none"]
    out = sim.send(DEN, DenoisedLatents(job_id=denoise.job_id, latents=batch, params=PARAMS, warnings=warnings))
    decodes = {job.index: job for job in sent(out, DecodeJob, DEC)}
    assert sorted(decodes) == [0, 1, 2]
    for index, job in decodes.items():
        assert job.latents.shape == (1, 4, 8, 8)
        assert torch.equal(torch_of(job.latents), batch[index : index + 1])
        assert job.params == PARAMS
    assert [e.stage for e in sent(out, ProgressEvent, CLIENT)] == ["decode"] * 3
    assert not sent(out, ImageResult)

    # 4. Each PNG is sent on as it arrives, in any order; the last one ends the request.
    images = []
    for index in (2, 0, 1):
        out = sim.send(DEC, decoded(decodes[index], b"png%d" % index))
        assert not sent(out, RequestFailed)
        images += sent(out, ImageResult, CLIENT)
    assert [(i.request_id, i.index, i.seed, i.png) for i in sorted(images, key=lambda i: i.index)] == [
        ("r1", 0, 42, b"png0"),
        ("r1", 1, 43, b"png1"),
        ("r1", 2, 44, b"png2"),
    ]
    assert all(image.params == PARAMS and image.warnings == warnings for image in images)
    assert sim.core.requests == {} and sim.core.jobs == {}
    status = sim.status()
    assert status.requests_in_flight == 0
    assert {n["node"]: (n["state"], n["jobs_done"]) for n in status.nodes} == {
        "enc-node": ("idle", 1),
        "den-node": ("idle", 1),
        "dec-node": ("idle", 3),
    }

    # A repeated result for a finished job changes nothing.
    assert sim.send(DEC, decoded(decodes[0], b"again")) == []


def test_an_image_takes_its_seed_from_the_parameters_the_denoiser_resolved():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    sim.register(DEC, DECODER)
    denoise = only(to_denoise(sim, "r1", num_images=2), DenoiseJob, DEN)
    params = dataclasses.replace(PARAMS, seed=1000)
    out = sim.send(DEN, denoised(denoise, 2, params=params))
    first = only(out, DecodeJob, DEC)
    out = sim.send(DEC, decoded(first))
    second = only(out, DecodeJob, DEC)
    image = only(out, ImageResult, CLIENT)
    assert (image.index, image.seed, image.params.seed, image.warnings) == (first.index, 1000 + first.index, 1000, [])
    image = only(sim.send(DEC, decoded(second)), ImageResult, CLIENT)
    assert (image.index, image.seed) == (second.index, 1000 + second.index)


def test_a_resent_request_is_accepted_again_but_not_run_twice():
    sim = Sim()
    sim.register(ENC, ENCODER, capacity=4)
    first = sim.send(CLIENT, request())
    assert len(sent(first, EncodeJob, ENC)) == 1
    again = sim.send(CLIENT, request())
    assert [type(m) for _, m in again] == [RequestAccepted]
    assert len(sim.core.jobs) == 1 and len(sim.core.requests) == 1


# --- dispatch ---------------------------------------------------------------------------------


def test_the_idle_denoiser_gets_the_job_and_a_full_one_gets_none():
    sim = Sim()
    sim.register(ENC, ENCODER, capacity=8)
    sim.register(b"den1", DENOISER)
    sim.register(b"den2", DENOISER)

    first = assigned(to_denoise(sim, "a"))
    assert len(first) == 1
    busy = next(iter(first))
    idle = ({b"den1", b"den2"} - {busy}).pop()

    assert set(assigned(to_denoise(sim, "b"))) == {idle}
    assert assigned(to_denoise(sim, "c")) == {}  # both full: capacity 1 each
    assert sim.status().queues[f"denoiser/{MODEL}"] == 1

    # When the first one finishes, the waiting job goes to it.
    job_a = first[busy][0]
    out = sim.send(busy, denoised(job_a))
    (job_c,) = assigned(out)[busy]
    assert isinstance(job_c, DenoiseJob) and job_c.request_id == "c"


def test_capacity_is_respected_and_the_least_loaded_node_wins():
    sim = Sim()
    sim.register(ENC, ENCODER, capacity=8)
    sim.register(b"big", DENOISER, capacity=3)
    sim.register(b"small", DENOISER, capacity=1)
    holders = []
    for i in range(5):
        sim.now = 1000.0 + i
        out = to_denoise(sim, f"r{i}")
        holders += [identity for identity, jobs in assigned(out).items() for _ in jobs]
    # Loads go (0,0) -> one each -> then only "big" has room, until it is full.
    assert sorted(holders[:2]) == [b"big", b"small"]
    assert holders[2:] == [b"big", b"big"]
    assert len(sim.core.workers[b"big"].jobs) == 3
    assert sim.status().queues[f"denoiser/{MODEL}"] == 1


def test_the_least_recently_assigned_idle_node_gets_the_next_job():
    sim = Sim()
    sim.register(ENC, ENCODER, capacity=8)
    sim.register(b"den1", DENOISER)
    sim.register(b"den2", DENOISER)
    order = []
    for i, request_id in enumerate(["a", "b", "c", "d"]):
        sim.now = 1000.0 + 10 * i
        ((holder, (job,)),) = assigned(to_denoise(sim, request_id)).items()
        order.append(holder)
        sim.send(holder, denoised(job))
        assert all(not w.jobs for w in sim.core.workers.values() if w.service == DENOISER)  # both idle again
    assert order[0] != order[1] and order == [order[0], order[1], order[0], order[1]]


def test_the_emptier_node_wins_even_if_it_was_used_more_recently():
    sim = Sim()
    sim.register(ENC, ENCODER, capacity=8)
    sim.register(b"den1", DENOISER, capacity=3)
    for i, request_id in enumerate(["a", "b"]):
        sim.now = 1000.0 + i
        assert set(assigned(to_denoise(sim, request_id))) == {b"den1"}
    sim.register(b"den2", DENOISER, capacity=3)
    sim.now = 1010.0
    ((holder, (job,)),) = assigned(to_denoise(sim, "c")).items()
    assert holder == b"den2"
    sim.send(b"den2", denoised(job))
    # den1: 2 jobs, last assigned at 1001; den2: none, last assigned at 1010.
    sim.now = 1020.0
    assert set(assigned(to_denoise(sim, "d"))) == {b"den2"}


def test_jobs_go_only_to_nodes_of_their_model():
    sim = Sim()
    sim.register(b"enc-other", ENCODER, model="other")
    assert assigned(sim.send(CLIENT, request())) == {}
    out = sim.register(ENC, ENCODER)
    assert set(assigned(out)) == {ENC}


# --- dead nodes -------------------------------------------------------------------------------


def test_a_silent_node_is_removed_and_its_job_redispatched():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(b"den1", DENOISER)
    sim.register(b"den2", DENOISER)
    ((holder, (job,)),) = assigned(to_denoise(sim, "r1")).items()
    other = ({b"den1", b"den2"} - {holder}).pop()
    t0 = sim.now

    sim.send(holder, Heartbeat(), at=t0 + 1)
    sim.send(other, Heartbeat(), at=t0 + 1 + EXPIRY)
    out = sim.tick(t0 + 1 + EXPIRY)  # silent for exactly the limit: still alive
    assert holder in sim.core.workers and not sent(out, StageJob)

    out = sim.tick(t0 + 1 + EXPIRY + 0.01)
    assert holder not in sim.core.workers and other in sim.core.workers
    again = only(out, DenoiseJob, other)
    assert (again.job_id, again.request_id) == (job.job_id, "r1")
    assert torch.equal(torch_of(again.embeds["prompt_embeds"]), torch_of(job.embeds["prompt_embeds"]))
    assert again.request == job.request
    assert only(out, ProgressEvent, CLIENT).node == f"{other.decode()}-node"

    # The dead node is asked to register again when it next speaks.
    assert sent(sim.send(holder, Heartbeat()), Reconnect, holder)


def test_a_lost_job_goes_to_the_front_of_its_queue():
    sim = Sim()
    sim.register(ENC, ENCODER, capacity=8)
    sim.register(b"den1", DENOISER)
    sim.register(b"den2", DENOISER)
    ((lost_holder, (lost,)),) = assigned(to_denoise(sim, "a")).items()
    ((holder, (job_b,)),) = assigned(to_denoise(sim, "b")).items()
    assert assigned(to_denoise(sim, "c")) == {}  # c waits
    t0 = sim.now
    sim.send(holder, Heartbeat(), at=t0 + EXPIRY)
    sim.send(ENC, Heartbeat(), at=t0 + EXPIRY)
    assert not sent(sim.tick(t0 + EXPIRY + 0.5), StageJob)  # a's job is back in the queue, no node free
    assert lost_holder not in sim.core.workers
    out = sim.send(holder, denoised(job_b))
    assert only(out, DenoiseJob, holder).job_id == lost.job_id  # ahead of c, which waited longer


def test_a_late_result_from_a_dead_node_is_taken_once():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    sim.register(b"dec1", DECODER, capacity=1)
    sim.register(b"dec2", DECODER, capacity=2)
    denoise = only(to_denoise(sim, "r1", num_images=2), DenoiseJob, DEN)
    out = sim.send(DEN, denoised(denoise, 2))
    jobs = assigned(out)
    (lost,) = jobs[b"dec1"]
    (kept,) = jobs[b"dec2"]

    # dec1 goes silent; its job moves to dec2.
    t0 = sim.now
    sim.send(b"dec2", Heartbeat(), at=t0 + EXPIRY)
    out = sim.tick(t0 + EXPIRY + 0.5)
    assert only(out, DecodeJob, b"dec2").job_id == lost.job_id

    # dec1 was only slow: its result is taken, and dec2 is told to drop the copy.
    out = sim.send(b"dec1", decoded(lost, b"from dec1"))
    image = only(out, ImageResult, CLIENT)
    assert (image.index, image.png) == (lost.index, b"from dec1")
    assert only(out, JobCancel, b"dec2").job_id == lost.job_id
    assert sim.core.workers[b"dec2"].jobs == {kept.job_id}

    # dec2's copy arrives anyway: no second image for that index.
    out = sim.send(b"dec2", decoded(lost, b"from dec2"))
    assert not sent(out, ImageResult) and not sent(out, RequestFailed)
    assert "r1" in sim.core.requests

    out = sim.send(b"dec2", decoded(kept, b"other"))
    assert only(out, ImageResult, CLIENT).index == kept.index
    assert sim.core.requests == {}


def test_a_late_result_for_a_requeued_job_takes_it_off_the_queue():
    sim = Sim()
    sim.register(ENC, ENCODER)
    encode = only(sim.send(CLIENT, request()), EncodeJob, ENC)
    t0 = sim.now
    assert not sent(sim.tick(t0 + EXPIRY + 0.5), StageJob)  # the only encoder is presumed dead
    assert ENC not in sim.core.workers and sim.status().queues[f"encoder/{MODEL}"] == 1
    sim.register(DEN, DENOISER)
    out = sim.send(ENC, embedded(encode))  # it was only slow
    assert only(out, DenoiseJob, DEN).request_id == "r1"
    assert sim.status().queues.get(f"encoder/{MODEL}", 0) == 0
    assert not sent(sim.register(b"enc2", ENCODER), StageJob)  # the encode job is not run again


def test_a_job_whose_nodes_keep_dying_fails():
    sim = Sim(max_dispatches=2)
    sim.register(ENC, ENCODER)
    sim.register(b"den1", DENOISER)
    sim.register(b"den2", DENOISER)
    ((first, _),) = assigned(to_denoise(sim, "r1")).items()
    second = ({b"den1", b"den2"} - {first}).pop()
    t0 = sim.now
    sim.send(second, Heartbeat(), at=t0 + EXPIRY)
    assert only(sim.tick(t0 + EXPIRY + 0.5), DenoiseJob, second)
    failed = only(sim.tick(t0 + 2 * EXPIRY + 1), RequestFailed, CLIENT)
    assert failed.error == "denoise job lost 2 times: nodes keep dying"
    assert (failed.code, failed.retryable) == (errors.MODEL_ERROR, False)
    assert sim.core.requests == {} and sim.core.jobs == {}


def test_goodbye_removes_the_node_at_once_and_requeues_its_job():
    sim = Sim()
    sim.register(ENC, ENCODER)
    job = only(sim.send(CLIENT, request()), EncodeJob, ENC)
    assert sim.send(ENC, WorkerGoodbye()) == []
    assert ENC not in sim.core.workers
    assert only(sim.register(b"enc2", ENCODER), EncodeJob, b"enc2").job_id == job.job_id


def test_broker_heartbeats_every_known_node():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    out = sim.tick(sim.now + 0.1)
    assert sorted(identity for identity, m in out if isinstance(m, Heartbeat)) == [DEN, ENC]
    assert sim.tick(sim.now + HEARTBEAT_INTERVAL / 2) == []


# --- failures ---------------------------------------------------------------------------------


def test_a_failed_job_fails_the_request_naming_the_stage_and_node():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    denoise = only(to_denoise(sim, "r1"), DenoiseJob, DEN)
    out = sim.send(DEN, JobFailed(job_id=denoise.job_id, error="scheduler exploded"))
    failed = only(out, RequestFailed, CLIENT)
    assert failed.request_id == "r1"
    assert (failed.code, failed.field, failed.retryable) == (errors.MODEL_ERROR, None, False)
    assert failed.error == "denoise on den-node failed: scheduler exploded"
    assert sim.core.requests == {} and sim.core.jobs == {}
    assert not sim.core.workers[DEN].jobs


def test_a_node_out_of_memory_fails_the_request_as_retryable():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    denoise = only(to_denoise(sim, "r1"), DenoiseJob, DEN)
    out = sim.send(DEN, JobFailed(job_id=denoise.job_id, error="CUDA out of memory", code=errors.OUT_OF_MEMORY))
    failed = only(out, RequestFailed, CLIENT)
    assert (failed.code, failed.retryable) == (errors.OUT_OF_MEMORY, True)
    assert failed.error == "denoise on den-node failed: CUDA out of memory"


def test_a_request_a_node_cannot_serve_fails_naming_the_field_in_the_nodes_words():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    denoise = only(to_denoise(sim, "r1", height=1000), DenoiseJob, DEN)
    error = "height must be a multiple of 16 for this model (got 1000)"
    out = sim.send(DEN, JobFailed(job_id=denoise.job_id, error=error, code=errors.INVALID_REQUEST, field="height"))
    failed = only(out, RequestFailed, CLIENT)
    assert failed == RequestFailed(
        request_id="r1", error=error, code=errors.INVALID_REQUEST, field="height", retryable=False
    )
    assert sim.core.requests == {} and sim.core.jobs == {}


def test_a_failure_code_the_broker_does_not_know_becomes_a_model_error():
    sim = Sim()
    sim.register(ENC, ENCODER)
    encode = only(sim.send(CLIENT, request()), EncodeJob, ENC)
    failed = only(sim.send(ENC, JobFailed(job_id=encode.job_id, error="odd", code="gremlins")), RequestFailed)
    assert (failed.code, failed.retryable) == (errors.MODEL_ERROR, False)
    assert failed.error == "encode on enc-node failed: odd"


def test_a_failed_decode_cancels_the_other_images():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    sim.register(DEC, DECODER, capacity=2)
    denoise = only(to_denoise(sim, "r1", num_images=3), DenoiseJob, DEN)
    out = sim.send(DEN, denoised(denoise, 3))
    running = sent(out, DecodeJob, DEC)
    assert len(running) == 2  # the third waits for a free slot
    out = sim.send(DEC, JobFailed(job_id=running[0].job_id, error="boom"))
    assert only(out, RequestFailed, CLIENT).error == "decode on dec-node failed: boom"
    assert [c.job_id for c in sent(out, JobCancel, DEC)] == [running[1].job_id]
    assert not sent(out, StageJob)  # the queued third job is gone, not dispatched
    assert sim.status().queues[f"decoder/{MODEL}"] == 0


@pytest.mark.parametrize(
    ("stage", "answer"),
    [
        ("denoise", lambda job: denoised(job, 2)),  # 2 images' latents for a 3-image request
        ("denoise", lambda job: denoised(job, 4)),
        ("denoise", lambda job: denoised(job, latents=torch.tensor(1.0))),
        ("denoise", lambda job: embedded(job)),
        ("encode", lambda job: denoised(job, 3)),
        ("encode", lambda job: decoded(job)),
        ("decode", lambda job: embedded(job)),
        ("decode", lambda job: denoised(job, 1)),
    ],
    ids=[
        "latents-2",
        "latents-4",
        "latents-0d",
        "denoise-answers-embeddings",
        "encode-answers-latents",
        "encode-answers-image",
        "decode-answers-embeddings",
        "decode-answers-latents",
    ],
)
def test_a_malformed_result_fails_the_request(stage, answer):
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    sim.register(DEC, DECODER)
    out = sim.send(CLIENT, request(num_images=3))
    if stage != "encode":
        out = sim.send(ENC, embedded(only(out, EncodeJob, ENC)))
    if stage == "decode":
        out = sim.send(DEN, denoised(only(out, DenoiseJob, DEN), 3))
    holder = {"encode": ENC, "denoise": DEN, "decode": DEC}[stage]
    job = only(out, StageJob, holder)
    assert stage == job.STAGE
    out = sim.send(holder, answer(job))
    failed = only(out, RequestFailed, CLIENT)
    assert failed.error.startswith(f"{stage} returned a malformed result")
    assert (failed.code, failed.retryable) == (errors.MODEL_ERROR, False)
    assert not sent(out, StageJob) and not sent(out, ImageResult)
    assert sim.core.requests == {} and sim.core.jobs == {}
    assert not sim.core.workers[holder].jobs


@pytest.mark.parametrize(
    "result",
    [
        DecodedImage(job_id="j", png="not bytes"),  # type: ignore[arg-type]
        Embeddings(job_id="j", embeds=[1]),  # type: ignore[arg-type]
        DenoisedLatents(job_id="j", latents=[1, 2, 3], params=PARAMS),  # type: ignore[arg-type]
        DenoisedLatents(job_id="j", latents=latents(1), params=[1]),  # type: ignore[arg-type]
    ],
    ids=["png-str", "embeds-list", "latents-list", "params-list"],
)
def test_a_result_with_a_field_of_the_wrong_type_is_refused_before_the_core(result):
    # The broker drops what does not decode (see protocol.broker): the core never sees such a result.
    with pytest.raises(ProtocolError, match="wrong type"):
        wire(result)


# --- requests the broker refuses or cannot place ----------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"num_images": 17}, "num_images"),
        ({"height": 100}, "height"),
        ({"height": 8192, "width": 8192}, "height"),
        ({"guidance": float("nan")}, "guidance"),
        ({"true_cfg": -1.0}, "true_cfg"),
        ({"seed": -1}, "seed"),
        ({"timeout": 0.0}, "timeout"),
        ({"request_id": ""}, "request_id"),
    ],
)
def test_an_invalid_request_fails_naming_the_field(changes, field):
    sim = Sim()
    sim.register(ENC, ENCODER)
    out = sim.send(CLIENT, request(**changes))
    assert [type(m) for _, m in out] == [RequestFailed]
    failed = only(out, RequestFailed, CLIENT)
    assert (failed.code, failed.field, failed.retryable) == (errors.INVALID_REQUEST, field, False)
    assert failed.error.startswith(field)
    assert sim.core.requests == {} and sim.core.jobs == {}


def test_too_many_requests_is_a_retryable_busy_error():
    sim = Sim(max_requests=2)
    assert sent(sim.send(CLIENT, request("r1")), RequestAccepted)
    assert sent(sim.send(CLIENT, request("r2")), RequestAccepted)
    out = sim.send(CLIENT, request("r3"))
    failed = only(out, RequestFailed, CLIENT)
    assert failed.request_id == "r3" and "busy" in failed.error
    assert (failed.code, failed.field, failed.retryable) == (errors.BUSY, None, True)
    assert not sent(out, RequestAccepted) and "r3" not in sim.core.requests
    assert sent(sim.send(CLIENT, request("r1")), RequestAccepted)  # a resend is not a new request
    sim.send(CLIENT, CancelRequest(request_id="r1"))
    assert sent(sim.send(CLIENT, request("r4")), RequestAccepted)


def test_a_request_without_a_model_gets_the_only_one():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    out = sim.send(CLIENT, request(model=""))
    assert only(out, EncodeJob, ENC).request.model == MODEL


def test_a_request_without_a_model_waits_for_the_first_node():
    sim = Sim()
    out = sim.send(CLIENT, request(model=""))
    assert sent(out, RequestAccepted) and not sent(out, StageJob)
    out = sim.register(ENC, ENCODER)
    assert only(out, EncodeJob, ENC).request.model == MODEL


def test_a_request_without_a_model_fails_when_two_are_served():
    sim = Sim()
    sim.register(b"enc-a", ENCODER, model="model-a")
    sim.register(b"enc-b", ENCODER, model="model-b")
    failed = only(sim.send(CLIENT, request(model="")), RequestFailed, CLIENT)
    assert "model-a" in failed.error and "model-b" in failed.error
    assert (failed.code, failed.field, failed.retryable) == (errors.INVALID_REQUEST, "model", False)
    assert sim.core.requests == {}


def test_a_request_with_no_denoiser_for_its_model_times_out_saying_so():
    sim = Sim()
    sim.register(ENC, ENCODER)
    t0 = sim.now
    job = only(sim.send(CLIENT, request(timeout=10.0)), EncodeJob, ENC)
    sim.send(ENC, embedded(job), at=t0 + 1)
    sim.send(ENC, Heartbeat(), at=t0 + 9)  # the model is served: only its denoiser is missing
    assert not sent(sim.tick(t0 + 10.0), RequestFailed)
    failed = only(sim.tick(t0 + 10.5), RequestFailed, CLIENT)
    assert failed.error == f"no denoiser node serves model {MODEL}"
    assert (failed.code, failed.retryable) == (errors.NO_NODE, True)
    assert sim.core.requests == {} and sim.core.jobs == {}
    assert sim.status().queues.get(f"denoiser/{MODEL}", 0) == 0


def test_a_request_whose_job_runs_too_long_times_out_and_cancels_it():
    sim = Sim()
    sim.register(ENC, ENCODER)
    t0 = sim.now
    job = only(sim.send(CLIENT, request(timeout=2.0)), EncodeJob, ENC)
    sim.send(ENC, Heartbeat(), at=t0 + 2)
    out = sim.tick(t0 + 2.5)
    failed = only(out, RequestFailed, CLIENT)
    assert failed.error == "timed out after 2s"
    assert (failed.code, failed.retryable) == (errors.TIMEOUT, False)
    assert only(out, JobCancel, ENC).job_id == job.job_id


def test_a_request_for_a_model_no_node_serves_times_out_saying_so():
    sim = Sim()
    sim.register(ENC, ENCODER)
    t0 = sim.now
    sim.send(CLIENT, request(model="no-such-model", timeout=1.0))
    sim.send(ENC, Heartbeat(), at=t0 + 1)
    failed = only(sim.tick(t0 + 1.5), RequestFailed, CLIENT)
    assert failed.error == f"no node serves model no-such-model (served: {MODEL})"
    assert (failed.code, failed.retryable) == (errors.UNKNOWN_MODEL, False)
    assert "encoder/no-such-model" not in sim.status().queues  # freed: clients choose those names


def test_a_request_for_no_model_times_out_saying_so():
    sim = Sim()
    t0 = sim.now
    sim.send(CLIENT, request(model="", timeout=1.0))
    failed = only(sim.tick(t0 + 1.5), RequestFailed, CLIENT)
    assert failed.error == "no node serves any model yet"
    assert (failed.code, failed.retryable) == (errors.NO_NODE, True)


# --- control messages -------------------------------------------------------------------------


def test_a_heartbeat_from_an_unknown_node_asks_it_to_reconnect():
    sim = Sim()
    assert sim.send(b"stranger", Heartbeat()) == [(b"stranger", Reconnect())]
    sim.register(ENC, ENCODER)
    assert sim.send(ENC, Heartbeat()) == []


def test_cancel_removes_the_request_and_cancels_its_running_job():
    sim = Sim()
    sim.register(ENC, ENCODER)
    job = only(sim.send(CLIENT, request()), EncodeJob, ENC)

    out = sim.send(CLIENT, CancelRequest(request_id="r1"))
    assert only(out, JobCancel, ENC).job_id == job.job_id
    failed = only(out, RequestFailed, CLIENT)
    assert failed.request_id == "r1" and "cancel" in failed.error
    assert (failed.code, failed.retryable) == (errors.CANCELLED, False)
    assert sim.core.requests == {} and sim.core.jobs == {}

    # The node answers the cancel; that frees its slot for the next request.
    assert sim.send(ENC, JobFailed(job_id=job.job_id, error="cancelled", code=errors.CANCELLED)) == []
    assert only(sim.send(CLIENT, request("r2")), EncodeJob, ENC).request_id == "r2"


def test_a_result_for_a_cancelled_request_frees_the_node_and_is_dropped():
    sim = Sim()
    sim.register(ENC, ENCODER)
    job = only(sim.send(CLIENT, request()), EncodeJob, ENC)
    sim.send(CLIENT, CancelRequest(request_id="r1"))
    assert sim.send(ENC, embedded(job)) == []  # finished before it read the cancel
    assert not sim.core.workers[ENC].jobs
    assert only(sim.send(CLIENT, request("r2")), EncodeJob, ENC).request_id == "r2"


def test_cancel_of_a_queued_job_takes_it_off_the_queue():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.send(CLIENT, request("r1"))
    assert not sent(sim.send(CLIENT, request("r2")), StageJob)
    out = sim.send(CLIENT, CancelRequest(request_id="r2"))
    assert not sent(out, JobCancel)
    failed = only(out, RequestFailed, CLIENT)
    assert (failed.request_id, failed.code) == ("r2", errors.CANCELLED)
    assert sim.status().queues[f"encoder/{MODEL}"] == 0


def test_job_progress_is_forwarded_to_the_client():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    denoise = only(to_denoise(sim, "r1"), DenoiseJob, DEN)
    out = sim.send(DEN, JobProgress(job_id=denoise.job_id, step=3, total=20))
    expected = ProgressEvent(request_id="r1", stage="denoise", service=DENOISER, node="den-node", step=3, total=20)
    assert out == [(CLIENT, expected)]
    assert sim.send(ENC, JobProgress(job_id=denoise.job_id, step=4, total=20)) == []  # not its job
    assert sim.send(DEN, JobProgress(job_id="unknown", step=4, total=20)) == []


def test_status_lists_nodes_and_queues():
    sim = Sim()
    sim.register(ENC, ENCODER, capacity=2)
    sim.register(DEN, DENOISER)
    to_denoise(sim, "r1")
    to_denoise(sim, "r2")
    out = sim.send(CLIENT, StatusRequest(request_id="s1"))
    reply = only(out, StatusReply, CLIENT)
    assert reply.request_id == "s1"
    assert reply.requests_in_flight == 2
    assert reply.queues == {f"encoder/{MODEL}": 0, f"denoiser/{MODEL}": 1}
    nodes = {n["node"]: n for n in reply.nodes}
    assert nodes.keys() == {"enc-node", "den-node"}
    assert (nodes["enc-node"]["service"], nodes["enc-node"]["state"], nodes["enc-node"]["jobs_done"]) == (
        ENCODER,
        "idle",
        2,
    )
    assert (nodes["den-node"]["service"], nodes["den-node"]["state"], nodes["den-node"]["jobs_in_progress"]) == (
        DENOISER,
        "busy",
        1,
    )
    assert all(n["model"] == MODEL for n in reply.nodes)


@pytest.mark.parametrize(
    "ready",
    [
        WorkerReady(service="upscaler", model=MODEL, node="n"),
        WorkerReady(service=ENCODER, model="", node="n"),
        WorkerReady(service=ENCODER, model=MODEL, node="n", capacity=0),
    ],
    ids=["unknown-service", "no-model", "no-capacity"],
)
def test_a_malformed_registration_is_ignored(ready):
    sim = Sim()
    assert sim.send(b"n", ready) == []
    assert sim.core.workers == {}


def test_clients_take_turns_for_a_busy_node():
    """A client with many requests queued does not hold back another client's first one."""
    sim = Sim()
    sim.register(ENC, ENCODER)
    first = only(sim.send(b"greedy", request("g0")), EncodeJob, ENC)
    for i in range(1, 6):
        assert not sent(sim.send(b"greedy", request(f"g{i}")), StageJob)  # the one node is busy
    assert not sent(sim.send(b"polite", request("p0")), StageJob)
    order = []
    job = first
    for _ in range(6):
        out = sim.send(ENC, embedded(job))
        job = only(out, EncodeJob, ENC)
        order.append(job.request_id)
    assert order == ["g1", "p0", "g2", "g3", "g4", "g5"]


def test_turns_go_per_named_user_across_connections():
    """A gateway spreads a user's requests over its pooled connections: they still share one turn."""
    sim = Sim()
    sim.register(ENC, ENCODER)
    first = only(sim.send(b"conn1", request("a0", user="alice")), EncodeJob, ENC)
    for i, conn in enumerate((b"conn2", b"conn3", b"conn1"), start=1):
        sim.send(conn, request(f"a{i}", user="alice"))
    sim.send(b"conn2", request("b0", user="bob"))
    sim.send(b"conn2", request("c0"))  # no user: its connection takes turns
    order, job = [], first
    for _ in range(5):
        job = only(sim.send(ENC, embedded(job)), EncodeJob, ENC)
        order.append(job.request_id)
    assert order == ["a1", "b0", "c0", "a2", "a3"]
    # Nodes are not told whom a request is for, nor how long it may take.
    assert {f.name for f in dataclasses.fields(job.request)}.isdisjoint({"user", "timeout"})


def test_a_late_failure_from_a_node_presumed_dead_leaves_the_job_running_elsewhere():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    sim.register(b"den2", DENOISER)
    sim.register(DEC, DECODER)
    out = to_denoise(sim, "r1")
    (holder,) = [identity for identity in (DEN, b"den2") if sent(out, DenoiseJob, identity)]
    other = b"den2" if holder == DEN else DEN
    job = only(out, DenoiseJob, holder)
    t0 = sim.now
    for identity in (ENC, other, DEC):
        sim.send(identity, Heartbeat(), at=t0 + EXPIRY)
    assert only(sim.tick(t0 + EXPIRY + 0.5), DenoiseJob, other).job_id == job.job_id

    # The first node was only slow, and then failed: the copy on the other node carries on.
    out = sim.send(holder, JobFailed(job_id=job.job_id, error="out of memory: x", code=errors.OUT_OF_MEMORY))
    assert not sent(out, RequestFailed) and not sent(out, JobCancel)
    assert "r1" in sim.core.requests
    assert only(sim.send(other, denoised(job)), DecodeJob, DEC).index == 0


def test_a_result_that_fails_its_checks_fails_its_request_at_once():
    sim = Sim()
    sim.register(ENC, ENCODER)
    job = only(sim.send(CLIENT, request()), EncodeJob, ENC)
    sim.core.malformed_result(b"someone else", job.job_id, "embeds: wrong type", sim.now)
    assert not sim.take()  # only the node holding the job can fail it
    sim.core.malformed_result(ENC, job.job_id, "field 'embeds' has the wrong type (list)", sim.now)
    failed = only(sim.take(), RequestFailed, CLIENT)
    assert failed.code == errors.MODEL_ERROR and "malformed result" in failed.error
    assert sim.core.workers[ENC].jobs == set()


# --- who may send what, and who may answer a job ----------------------------------------------

NODE_KEY = Peer(key="node-key", roles=frozenset({NODE_ROLE}))
CLIENT_KEY = Peer(key="alice-key", roles=frozenset({CLIENT_ROLE}))
OTHER_CLIENT_KEY = Peer(key="bob-key", roles=frozenset({CLIENT_ROLE}))


def test_under_curve_a_client_key_can_neither_register_nor_answer_jobs():
    sim = Sim()
    ready = WorkerReady(service=ENCODER, model=MODEL, node="posing")
    assert sim.send(b"posing", ready, peer=CLIENT_KEY) == []
    assert sim.core.workers == {}
    sim.send(ENC, WorkerReady(service=ENCODER, model=MODEL, node="enc-node"), peer=NODE_KEY)
    job = only(sim.send(CLIENT, request(), peer=CLIENT_KEY), EncodeJob, ENC)
    assert sim.send(ENC, embedded(job), peer=CLIENT_KEY) == []  # its own connection, but a client's key
    assert job.job_id in sim.core.jobs and sim.core.workers[ENC].jobs == {job.job_id}


def test_under_curve_a_node_key_cannot_send_requests_or_ask_for_status():
    sim = Sim()
    sim.send(ENC, WorkerReady(service=ENCODER, model=MODEL, node="enc-node"), peer=NODE_KEY)
    assert sim.send(ENC, request(), peer=NODE_KEY) == []
    assert sim.send(ENC, StatusRequest(request_id="s"), peer=NODE_KEY) == []
    assert sim.core.requests == {} and sim.core.jobs == {}


def test_a_result_from_a_node_never_handed_the_job_is_refused():
    sim = Sim()
    sim.register(b"enc1", ENCODER)
    sim.register(b"enc2", ENCODER)
    sim.register(DEN, DENOISER)
    ((holder, (job,)),) = assigned(sim.send(CLIENT, request())).items()
    other = ({b"enc1", b"enc2"} - {holder}).pop()
    assert sim.send(other, embedded(job)) == []  # it knows the job id, but never held the job
    assert sim.send(other, JobFailed(job_id=job.job_id, error="x")) == []
    assert sim.send(other, JobProgress(job_id=job.job_id, step=1, total=2)) == []
    assert "r1" in sim.core.requests and sim.core.workers[holder].jobs == {job.job_id}
    assert only(sim.send(holder, embedded(job)), DenoiseJob, DEN).request_id == "r1"


# --- clients that reconnect -------------------------------------------------------------------


def test_a_resend_from_a_new_connection_takes_the_replies_and_gets_the_images_so_far():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    sim.register(DEC, DECODER)
    denoise = only(to_denoise(sim, "r1", num_images=2), DenoiseJob, DEN)
    first = only(sim.send(DEN, denoised(denoise, 2)), DecodeJob, DEC)
    out = sim.send(DEC, decoded(first, b"first"))
    assert only(out, ImageResult, CLIENT).png == b"first"  # sent to a connection that then dropped
    second = only(out, DecodeJob, DEC)

    out = sim.send(b"client-again", request("r1", num_images=2))  # the client resends from its new connection
    assert [type(m) for _, m in out] == [RequestAccepted, ImageResult]
    assert only(out, ImageResult, b"client-again").png == b"first"
    assert not sent(out, StageJob)  # nothing runs twice
    out = sim.send(DEC, decoded(second, b"second"))
    assert only(out, ImageResult, b"client-again").png == b"second"
    assert sim.core.requests == {}


def test_a_resend_after_the_request_ended_gets_its_images_without_a_rerun():
    sim = Sim(result_grace=30.0)
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    sim.register(DEC, DECODER)
    denoise = only(to_denoise(sim, "r1"), DenoiseJob, DEN)
    decode = only(sim.send(DEN, denoised(denoise)), DecodeJob, DEC)
    assert only(sim.send(DEC, decoded(decode, b"img")), ImageResult, CLIENT).png == b"img"
    assert sim.core.requests == {}

    out = sim.send(b"client-again", request("r1"), at=sim.now + 29)
    assert [type(m) for _, m in out] == [RequestAccepted, ImageResult]
    assert only(out, ImageResult, b"client-again").png == b"img"
    keep_alive(sim, sim.now + 2, ENC, DEN, DEC)
    sim.tick(sim.now)  # past the grace period: forgotten, so the same id is a new request
    assert only(sim.send(b"client-again", request("r1")), EncodeJob, ENC).request_id == "r1"


def test_a_resend_after_a_failure_gets_the_failure_again():
    sim = Sim()
    sim.register(ENC, ENCODER)
    job = only(sim.send(CLIENT, request()), EncodeJob, ENC)
    sim.send(ENC, JobFailed(job_id=job.job_id, error="boom"))
    out = sim.send(b"client-again", request())
    assert [type(m) for _, m in out] == [RequestAccepted, RequestFailed]
    assert "boom" in only(out, RequestFailed, b"client-again").error
    assert sim.core.jobs == {}


def test_a_cancel_from_a_new_connection_cancels():
    sim = Sim()
    sim.register(ENC, ENCODER)
    job = only(sim.send(CLIENT, request()), EncodeJob, ENC)
    out = sim.send(b"client-again", CancelRequest(request_id="r1"))
    assert only(out, JobCancel, ENC).job_id == job.job_id
    assert only(out, RequestFailed, b"client-again").code == errors.CANCELLED
    assert sim.core.requests == {}


def test_under_curve_only_the_requests_own_key_may_cancel_or_take_its_replies():
    sim = Sim()
    sim.send(ENC, WorkerReady(service=ENCODER, model=MODEL, node="enc-node"), peer=NODE_KEY)
    job = only(sim.send(CLIENT, request(), peer=CLIENT_KEY), EncodeJob, ENC)
    assert sim.send(b"bob", CancelRequest(request_id="r1"), peer=OTHER_CLIENT_KEY) == []
    assert sim.send(b"bob", request(), peer=OTHER_CLIENT_KEY) == []  # its replies stay with alice
    assert sim.core.requests["r1"].client == CLIENT
    out = sim.send(b"alice-again", CancelRequest(request_id="r1"), peer=CLIENT_KEY)
    assert only(out, JobCancel, ENC).job_id == job.job_id
    assert only(out, RequestFailed, b"alice-again").code == errors.CANCELLED


# --- nodes that stop making progress ----------------------------------------------------------


def stall_sim(**kwargs) -> Sim:
    """Stalls after 1 s of silence (2 s before a stage is measured), three denoisers, an encoder."""
    sim = Sim(stall=StallPolicy(timeout=1.0, factor=10.0, warmup=2.0), **kwargs)
    sim.register(ENC, ENCODER, capacity=8)
    return sim


def keep_alive(sim: Sim, at: float, *identities: bytes) -> None:
    for identity in identities:
        sim.send(identity, Heartbeat(), at=at)


def test_a_node_that_holds_a_job_without_progress_loses_it_and_gets_no_new_work():
    sim = stall_sim()
    sim.register(b"den1", DENOISER)
    sim.register(b"den2", DENOISER)
    sim.register(DEC, DECODER)
    ((stuck, (job,)),) = assigned(to_denoise(sim, "r1")).items()
    other = ({b"den1", b"den2"} - {stuck}).pop()
    t0 = sim.now
    sim.send(stuck, JobProgress(job_id=job.job_id, step=1, total=20), at=t0 + 0.5)
    keep_alive(sim, t0 + 2.4, ENC, DEC, stuck, other)  # its IO thread still heartbeats
    assert not sent(sim.tick(t0 + 2.4), StageJob)  # 1.9 s of silence: within 2 x 1 s before any step was timed
    keep_alive(sim, t0 + 2.6, ENC, DEC, stuck, other)
    out = sim.tick(t0 + 2.6)
    assert only(out, DenoiseJob, other).job_id == job.job_id
    assert not sent(out, JobCancel)  # should it only be slow, its result still counts
    states = {n["node"]: n["state"] for n in sim.status().nodes}
    assert states[f"{stuck.decode()}-node"] == "stalled" and states[f"{other.decode()}-node"] == "busy"

    # Idle, but stalled: new work waits for the healthy node rather than going to it.
    assert assigned(to_denoise(sim, "r2")) == {}
    # It was only slow: its result is taken, the copy cancelled, and it takes work again.
    out = sim.send(stuck, denoised(job))
    assert only(out, JobCancel, other).job_id == job.job_id
    assert only(out, DecodeJob, DEC).request_id == "r1"
    assert only(out, DenoiseJob, stuck).request_id == "r2"
    assert sim.status().nodes[1]["state"] in ("busy", "idle")


def test_a_stalled_node_takes_work_again_once_it_reports():
    sim = stall_sim()
    sim.register(DEN, DENOISER)
    job = only(to_denoise(sim, "r1"), DenoiseJob, DEN)
    t0 = sim.now
    keep_alive(sim, t0 + 2.5, ENC, DEN)
    sim.tick(t0 + 2.5)
    assert sim.status().nodes[1]["state"] == "stalled"
    out = sim.send(DEN, JobProgress(job_id=job.job_id, step=1, total=20))  # it shows progress again
    assert only(out, DenoiseJob, DEN).job_id == job.job_id  # the job was waiting for a node: this one
    assert sim.status().nodes[1]["state"] == "busy"


def test_the_silence_allowed_follows_the_nodes_own_step_time():
    sim = stall_sim()
    sim.register(DEN, DENOISER)
    job = only(to_denoise(sim, "r1"), DenoiseJob, DEN)
    t = sim.now
    for step in range(1, 5):  # 0.5 s a step: 10 x that is 5 s, more than the 1 s floor
        t += 0.5
        sim.send(DEN, JobProgress(job_id=job.job_id, step=step, total=20), at=t)
    keep_alive(sim, t + 4.9, ENC, DEN)
    sim.tick(t + 4.9)
    assert sim.core.workers[DEN].healthy and sim.core.jobs[job.job_id].worker == DEN
    keep_alive(sim, t + 5.1, ENC, DEN)
    sim.tick(t + 5.1)
    assert not sim.core.workers[DEN].healthy and sim.core.jobs[job.job_id].worker is None


def test_a_job_waiting_on_a_node_behind_one_making_progress_is_not_stalled():
    sim = stall_sim()
    sim.register(DEN, DENOISER, capacity=2)
    running = only(to_denoise(sim, "r1"), DenoiseJob, DEN)
    waiting = only(to_denoise(sim, "r2"), DenoiseJob, DEN)
    t = sim.now
    for step in range(1, 30):  # 6 s of progress on the first job; the second gets no word meanwhile
        t += 0.2
        sim.send(DEN, JobProgress(job_id=running.job_id, step=step, total=40), at=t)
        keep_alive(sim, t, ENC)
        sim.tick(t)
        assert sim.core.workers[DEN].healthy
    assert sim.core.workers[DEN].jobs == {running.job_id, waiting.job_id}


def test_a_request_that_times_out_tells_every_node_that_held_its_job_to_cancel():
    sim = stall_sim()
    sim.register(b"den1", DENOISER)
    sim.register(b"den2", DENOISER)
    t0 = sim.now
    ((stuck, (job,)),) = assigned(to_denoise(sim, "r1", timeout=5.0)).items()
    other = ({b"den1", b"den2"} - {stuck}).pop()
    keep_alive(sim, t0 + 2.5, ENC, stuck, other)
    assert only(sim.tick(t0 + 2.5), DenoiseJob, other).job_id == job.job_id
    for step, at in enumerate((3.0, 3.5, 4.0, 4.5, 5.0), start=1):  # this one makes progress
        sim.send(other, JobProgress(job_id=job.job_id, step=step, total=100), at=t0 + at)
    keep_alive(sim, t0 + 5.5, ENC, stuck, other)
    out = sim.tick(t0 + 5.5)
    assert only(out, RequestFailed, CLIENT).code == errors.TIMEOUT
    assert {identity for identity, m in out if isinstance(m, JobCancel) and m.job_id == job.job_id} == {stuck, other}


# --- one user's share, unknown models, limits -------------------------------------------------


def test_one_users_thousand_requests_delay_anothers_first_by_one_job_at_most():
    sim = Sim(max_requests=1000)
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    sim.register(DEC, DECODER)
    refused = []
    for i in range(1000):
        out = sim.send(b"greedy", request(f"g{i}", user="greedy"))
        refused += sent(out, RequestFailed)
    assert len(refused) == 1000 - sim.core.limits.max_user_requests
    assert all(f.code == errors.BUSY and f.retryable and "--max-user-requests" in f.error for f in refused)
    assert sent(sim.send(b"polite", request("p0", user="polite")), RequestAccepted)

    holding = {ENC: sim.core.workers[ENC].jobs, DEN: sim.core.workers[DEN].jobs, DEC: sim.core.workers[DEC].jobs}
    images: list[str] = []
    answers = {ENC: embedded, DEN: denoised, DEC: decoded}
    while "p0" not in images:
        for identity, answer in answers.items():  # each node finishes its job in turn
            (job_id,) = holding[identity]
            out = sim.send(identity, answer(sim.core.jobs[job_id].message))
            images += [image.request_id for image in sent(out, ImageResult)]
    # Behind the job the encoder was running when it came, and the one greedy job whose turn it was.
    assert images == ["g0", "g1", "p0"]
    assert len(sim.core.requests) == sim.core.limits.max_user_requests - 2


def test_a_request_for_a_model_no_node_announced_fails_at_once_naming_the_served_ones():
    sim = Sim()
    sim.register(ENC, ENCODER)
    out = sim.send(CLIENT, request(model="no-such-model"), at=sim.now + STARTUP_GRACE)
    failed = only(out, RequestFailed, CLIENT)
    assert (failed.code, failed.retryable) == (errors.UNKNOWN_MODEL, False)
    assert failed.error == f"no node serves model no-such-model (served: {MODEL})"
    assert not sent(out, RequestAccepted) and sim.core.requests == {} and sim.core.queues == {}


def test_a_request_for_a_model_whose_node_is_loading_waits_for_it():
    sim = Sim()
    sim.tick(sim.now + STARTUP_GRACE)
    sim.register(ENC, ENCODER, state=LOADING)
    out = sim.send(CLIENT, request())
    assert sent(out, RequestAccepted) and not sent(out, StageJob)
    assert sim.status().nodes[0]["state"] == LOADING
    out = sim.register(ENC, ENCODER, state=READY)  # its weights are read
    assert only(out, EncodeJob, ENC).request_id == "r1"


def test_requests_taken_while_nodes_could_still_register_fail_once_none_did():
    sim = Sim()
    t0 = sim.now
    sim.register(ENC, ENCODER)
    assert sent(sim.send(CLIENT, request(model="later")), RequestAccepted)  # the broker only just started
    keep_alive(sim, t0 + STARTUP_GRACE - 1, ENC)
    assert not sent(sim.tick(t0 + STARTUP_GRACE - 1), RequestFailed)
    keep_alive(sim, t0 + STARTUP_GRACE, ENC)
    failed = only(sim.tick(t0 + STARTUP_GRACE), RequestFailed, CLIENT)
    assert failed.code == errors.UNKNOWN_MODEL and MODEL in failed.error


def test_with_no_node_at_all_requests_wait_past_the_grace_for_the_first_one():
    sim = Sim()
    t0 = sim.now
    out = sim.send(CLIENT, request(timeout=60.0), at=t0 + STARTUP_GRACE + 5)  # nodes still importing torch
    assert sent(out, RequestAccepted) and not sent(out, RequestFailed)
    assert not sent(sim.tick(t0 + STARTUP_GRACE + 20), RequestFailed)
    assert only(sim.register(ENC, ENCODER), EncodeJob, ENC).request_id == "r1"


def test_a_request_for_a_model_whose_last_node_just_left_waits_a_while():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.send(ENC, WorkerGoodbye(), at=sim.now + STARTUP_GRACE)
    assert sent(sim.send(CLIENT, request()), RequestAccepted)  # it may be restarting
    assert only(sim.register(b"enc2", ENCODER), EncodeJob, b"enc2").request_id == "r1"


def test_a_request_timeout_is_capped_by_the_broker():
    sim = Sim(limits=RequestLimits(max_timeout=5.0))
    sim.register(ENC, ENCODER)
    t0 = sim.now
    sim.send(CLIENT, request(timeout=3600.0))
    keep_alive(sim, t0 + 5.5, ENC)
    failed = only(sim.tick(t0 + 5.5), RequestFailed, CLIENT)
    assert (failed.code, failed.error) == (errors.TIMEOUT, "timed out after 5s")


@pytest.mark.parametrize(
    ("changes", "field", "flag"),
    [
        ({"steps": 201}, "steps", "--max-steps"),
        ({"num_images": 5}, "num_images", "--max-images"),
        ({"height": 2048, "width": 2056}, "height", "--max-pixels"),
    ],
)
def test_a_request_past_the_brokers_limits_fails_naming_the_limit(changes, field, flag):
    sim = Sim(limits=RequestLimits(max_images=4))
    sim.register(ENC, ENCODER)
    failed = only(sim.send(CLIENT, request(**changes)), RequestFailed, CLIENT)
    assert (failed.code, failed.field, failed.retryable) == (errors.INVALID_REQUEST, field, False)
    assert flag in failed.error and failed.error.startswith(field)
    assert sim.core.requests == {}


def test_a_job_that_takes_two_nodes_down_fails_its_request():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    for identity in (b"dec1", b"dec2", b"dec3"):
        sim.register(identity, DECODER)
    decode = only(sim.send(DEN, denoised(only(to_denoise(sim, "r1"), DenoiseJob, DEN))), StageJob)
    t = sim.now
    for _ in range(2):  # each decoder that takes the job dies (it never answers, nor heartbeats)
        holder = next(w.identity for w in sim.core.workers.values() if decode.job_id in w.jobs)
        t += EXPIRY + 0.5
        keep_alive(sim, t, ENC, DEN, *[i for i in sim.core.workers if i not in (holder, ENC, DEN)])
        out = sim.tick(t)
    failed = only(out, RequestFailed, CLIENT)
    assert failed.error == "this request made two decoder nodes exit"
    assert failed.code == errors.MODEL_ERROR
    assert len([w for w in sim.core.workers.values() if w.service == DECODER]) == 1  # the third was spared


def test_only_the_job_a_node_was_running_is_blamed_for_its_death():
    sim = Sim()
    sim.register(ENC, ENCODER, capacity=4)
    sim.register(b"den1", DENOISER, capacity=2)
    running = only(to_denoise(sim, "r1"), DenoiseJob, b"den1")
    sim.send(b"den1", JobProgress(job_id=running.job_id, step=1, total=20))
    waiting = only(to_denoise(sim, "r2"), DenoiseJob, b"den1")
    t0 = sim.now
    keep_alive(sim, t0 + EXPIRY + 0.5, ENC)
    sim.tick(t0 + EXPIRY + 0.5)
    assert (sim.core.jobs[running.job_id].losses, sim.core.jobs[waiting.job_id].losses) == (1, 0)


# --- bounded state ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ready",
    [
        WorkerReady(service=ENCODER, model="m" * 257, node="n"),
        WorkerReady(service=ENCODER, model=MODEL, node="n" * 257),
        WorkerReady(service=ENCODER, model=MODEL, node="n", info={"blob": "x" * 5000}),
        WorkerReady(service=ENCODER, model=MODEL, node="n", info={f"k{i}": i for i in range(100)}),
        WorkerReady(service=ENCODER, model=MODEL, node="n", state="hungry"),
    ],
    ids=["long-model", "long-node", "big-info", "many-info-values", "unknown-state"],
)
def test_a_registration_with_a_field_past_its_bound_is_ignored(ready):
    sim = Sim()
    assert sim.send(b"n", ready) == []
    assert sim.core.workers == {}


def test_a_queue_is_freed_once_empty():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER, capacity=2)
    job = only(sim.send(CLIENT, request()), EncodeJob, ENC)
    sim.send(CLIENT, request("r2"))
    assert list(sim.core.queues) == [(ENCODER, MODEL)]
    sim.send(ENC, embedded(job))  # r2's job leaves the queue for the encoder
    assert sim.core.queues == {}
    assert sim.status().queues == {f"encoder/{MODEL}": 0, f"denoiser/{MODEL}": 0}  # listed all the same


def test_a_status_reply_lists_a_bounded_number_of_nodes():
    sim = Sim()
    for i in range(MAX_STATUS_NODES + 6):
        sim.register(b"dec%d" % i, DECODER)
    status = sim.status()
    assert (len(status.nodes), status.nodes_left_out) == (MAX_STATUS_NODES, 6)
