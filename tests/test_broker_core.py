"""The broker's routing, message by message, with fake nodes and a fake client and no sockets.

Every message in and out also goes through to_frames/from_frames, so what the core sends is
known to survive the wire.
"""

from __future__ import annotations

import pytest
import torch

from protocol import messages
from protocol.broker_core import BrokerCore
from protocol.messages import (
    DECODER,
    DENOISER,
    ENCODER,
    CancelRequest,
    GenerateRequest,
    Heartbeat,
    ImageResult,
    JobAssign,
    JobCancel,
    JobDone,
    JobFailed,
    JobProgress,
    Message,
    ProgressEvent,
    Reconnect,
    RequestAccepted,
    RequestFailed,
    StatusReply,
    StatusRequest,
    WorkerGoodbye,
    WorkerReady,
)
from protocol.sockets import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS

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

    def send(self, sender: bytes, message: Message, at: float | None = None) -> Sent:
        self.now = self.now if at is None else at
        self.core.handle(sender, wire(message), self.now)
        return self.take()

    def tick(self, at: float) -> Sent:
        self.now = at
        self.core.tick(at)
        return self.take()

    def take(self) -> Sent:
        outbox, self.core.outbox = self.core.outbox, []
        return [(identity, wire(message)) for identity, message in outbox]

    def register(self, identity: bytes, service: str, model: str = MODEL, capacity: int = 1) -> Sent:
        ready = WorkerReady(service=service, model=model, node=f"{identity.decode()}-node", capacity=capacity)
        return self.send(identity, ready)

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


EMBEDS = {"prompt_embeds": torch.randn(1, 77, 32)}  # (B, 77, D)


def latents(count: int) -> torch.Tensor:
    return torch.randn(count, 4, 8, 8)  # (num_images, C, H/8, W/8)


def to_denoise(sim: Sim, request_id: str, **changes) -> Sent:
    """Submit a request and finish its encode job; returns what the encode result set off."""
    job = only(sim.send(CLIENT, request(request_id, **changes)), JobAssign, ENC)
    return sim.send(ENC, JobDone(job_id=job.job_id, payload={"embeds": EMBEDS}))


def assigned(out: Sent) -> dict[bytes, list[JobAssign]]:
    jobs: dict[bytes, list[JobAssign]] = {}
    for identity, message in out:
        if isinstance(message, JobAssign):
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
    encode = only(out, JobAssign, ENC)
    assert encode.request_id == "r1"
    assert encode.payload["request"]["prompt"] == "a red fox" and encode.payload["request"]["steps"] == 20
    assert [(e.stage, e.node) for e in sent(out, ProgressEvent, CLIENT)] == [("encoder", "enc-node")]

    # 2. Embeddings go to the denoiser with the request.
    embeds = torch.randn(1, 77, 32).to(torch.bfloat16)
    out = sim.send(ENC, JobDone(job_id=encode.job_id, payload={"embeds": {"prompt_embeds": embeds}}))
    denoise = only(out, JobAssign, DEN)
    assert torch.equal(denoise.payload["embeds"]["prompt_embeds"], embeds)
    assert denoise.payload["request"]["num_images"] == 3
    assert [e.stage for e in sent(out, ProgressEvent, CLIENT)] == ["denoiser"]

    # 3. Latents for 3 images become 3 decode jobs, one image each.
    batch = latents(3)
    params = {"steps": 20, "guidance": 7.5, "height": 64, "width": 64}
    out = sim.send(DEN, JobDone(job_id=denoise.job_id, payload={"latents": batch, "params": params}))
    decodes = {job.payload["index"]: job for job in sent(out, JobAssign, DEC)}
    assert sorted(decodes) == [0, 1, 2]
    for index, job in decodes.items():
        assert job.payload["latents"].shape == (1, 4, 8, 8)
        assert torch.equal(job.payload["latents"], batch[index : index + 1])
        assert job.payload["params"] == params
    assert len(sent(out, ProgressEvent, CLIENT)) == 3
    assert not sent(out, ImageResult)

    # 4. Each PNG is sent on as it arrives, in any order; the last one ends the request.
    images = []
    for index in (2, 0, 1):
        out = sim.send(DEC, JobDone(job_id=decodes[index].job_id, payload={"png": b"png%d" % index}))
        assert not sent(out, RequestFailed)
        images += sent(out, ImageResult, CLIENT)
    assert [(i.request_id, i.index, i.seed, i.png) for i in sorted(images, key=lambda i: i.index)] == [
        ("r1", 0, 42, b"png0"),
        ("r1", 1, 43, b"png1"),
        ("r1", 2, 44, b"png2"),
    ]
    assert all(image.params == params for image in images)
    assert sim.core.requests == {} and sim.core.jobs == {}
    status = sim.status()
    assert status.requests_in_flight == 0
    assert {n["node"]: (n["state"], n["jobs_done"]) for n in status.nodes} == {
        "enc-node": ("idle", 1),
        "den-node": ("idle", 1),
        "dec-node": ("idle", 3),
    }

    # A repeated result for a finished job changes nothing.
    assert sim.send(DEC, JobDone(job_id=decodes[0].job_id, payload={"png": b"again"})) == []


def test_a_resent_request_is_accepted_again_but_not_run_twice():
    sim = Sim()
    sim.register(ENC, ENCODER, capacity=4)
    first = sim.send(CLIENT, request())
    assert len(sent(first, JobAssign, ENC)) == 1
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
    out = sim.send(busy, JobDone(job_id=job_a.job_id, payload={"latents": latents(1), "params": {}}))
    (job_c,) = assigned(out)[busy]
    assert job_c.request_id == "c"


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
        sim.send(holder, JobDone(job_id=job.job_id, payload={"latents": latents(1), "params": {}}))
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
    sim.send(b"den2", JobDone(job_id=job.job_id, payload={"latents": latents(1), "params": {}}))
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
    assert holder in sim.core.workers and not sent(out, JobAssign)

    out = sim.tick(t0 + 1 + EXPIRY + 0.01)
    assert holder not in sim.core.workers and other in sim.core.workers
    again = only(out, JobAssign, other)
    assert (again.job_id, again.request_id) == (job.job_id, "r1")
    assert torch.equal(again.payload["embeds"]["prompt_embeds"], job.payload["embeds"]["prompt_embeds"])
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
    assert not sent(sim.tick(t0 + EXPIRY + 0.5), JobAssign)  # a's job is back in the queue, no node free
    assert lost_holder not in sim.core.workers
    out = sim.send(holder, JobDone(job_id=job_b.job_id, payload={"latents": latents(1), "params": {}}))
    assert only(out, JobAssign, holder).job_id == lost.job_id  # ahead of c, which waited longer


def test_a_late_result_from_a_dead_node_is_taken_once():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    sim.register(b"dec1", DECODER, capacity=1)
    sim.register(b"dec2", DECODER, capacity=2)
    denoise = only(to_denoise(sim, "r1", num_images=2), JobAssign, DEN)
    out = sim.send(DEN, JobDone(job_id=denoise.job_id, payload={"latents": latents(2), "params": {}}))
    jobs = assigned(out)
    (lost,) = jobs[b"dec1"]
    (kept,) = jobs[b"dec2"]

    # dec1 goes silent; its job moves to dec2.
    t0 = sim.now
    sim.send(b"dec2", Heartbeat(), at=t0 + EXPIRY)
    out = sim.tick(t0 + EXPIRY + 0.5)
    assert only(out, JobAssign, b"dec2").job_id == lost.job_id

    # dec1 was only slow: its result is taken, and dec2 is told to drop the copy.
    out = sim.send(b"dec1", JobDone(job_id=lost.job_id, payload={"png": b"from dec1"}))
    image = only(out, ImageResult, CLIENT)
    assert (image.index, image.png) == (lost.payload["index"], b"from dec1")
    assert only(out, JobCancel, b"dec2").job_id == lost.job_id
    assert sim.core.workers[b"dec2"].jobs == {kept.job_id}

    # dec2's copy arrives anyway: no second image for that index.
    out = sim.send(b"dec2", JobDone(job_id=lost.job_id, payload={"png": b"from dec2"}))
    assert not sent(out, ImageResult) and not sent(out, RequestFailed)
    assert "r1" in sim.core.requests

    out = sim.send(b"dec2", JobDone(job_id=kept.job_id, payload={"png": b"other"}))
    assert only(out, ImageResult, CLIENT).index == kept.payload["index"]
    assert sim.core.requests == {}


def test_a_job_whose_nodes_keep_dying_fails():
    sim = Sim(max_dispatches=2)
    sim.register(ENC, ENCODER)
    sim.register(b"den1", DENOISER)
    sim.register(b"den2", DENOISER)
    ((first, _),) = assigned(to_denoise(sim, "r1")).items()
    second = ({b"den1", b"den2"} - {first}).pop()
    t0 = sim.now
    sim.send(second, Heartbeat(), at=t0 + EXPIRY)
    assert only(sim.tick(t0 + EXPIRY + 0.5), JobAssign, second)
    failed = only(sim.tick(t0 + 2 * EXPIRY + 1), RequestFailed, CLIENT)
    assert "denoiser" in failed.error and "2 times" in failed.error
    assert sim.core.requests == {} and sim.core.jobs == {}


def test_goodbye_removes_the_node_at_once_and_requeues_its_job():
    sim = Sim()
    sim.register(ENC, ENCODER)
    job = only(sim.send(CLIENT, request()), JobAssign, ENC)
    assert sim.send(ENC, WorkerGoodbye()) == []
    assert ENC not in sim.core.workers
    assert only(sim.register(b"enc2", ENCODER), JobAssign, b"enc2").job_id == job.job_id


def test_broker_heartbeats_every_known_node():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    out = sim.tick(sim.now + 0.1)
    assert sorted(identity for identity, m in out if isinstance(m, Heartbeat)) == [DEN, ENC]
    assert sim.tick(sim.now + HEARTBEAT_INTERVAL / 2) == []


# --- failures ---------------------------------------------------------------------------------


def test_a_failed_job_fails_the_request_naming_the_service():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    denoise = only(to_denoise(sim, "r1"), JobAssign, DEN)
    out = sim.send(DEN, JobFailed(job_id=denoise.job_id, error="out of memory: CUDA"))
    failed = only(out, RequestFailed, CLIENT)
    assert failed.request_id == "r1" and not failed.retryable
    assert "denoiser" in failed.error and "den-node" in failed.error and "out of memory: CUDA" in failed.error
    assert sim.core.requests == {} and sim.core.jobs == {}
    assert not sim.core.workers[DEN].jobs


def test_a_failed_decode_cancels_the_other_images():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    sim.register(DEC, DECODER, capacity=2)
    denoise = only(to_denoise(sim, "r1", num_images=3), JobAssign, DEN)
    out = sim.send(DEN, JobDone(job_id=denoise.job_id, payload={"latents": latents(3), "params": {}}))
    running = sent(out, JobAssign, DEC)
    assert len(running) == 2  # the third waits for a free slot
    out = sim.send(DEC, JobFailed(job_id=running[0].job_id, error="boom"))
    assert "decoder" in only(out, RequestFailed, CLIENT).error
    assert [c.job_id for c in sent(out, JobCancel, DEC)] == [running[1].job_id]
    assert not sent(out, JobAssign)  # the queued third job is gone, not dispatched
    assert sim.status().queues[f"decoder/{MODEL}"] == 0


@pytest.mark.parametrize(
    ("service", "payload"),
    [
        (DENOISER, {"latents": latents(2), "params": {}}),  # 2 images' latents for a 3-image request
        (DENOISER, {"latents": latents(4), "params": {}}),
        (DENOISER, {"latents": torch.tensor(1.0), "params": {}}),
        (DENOISER, {"latents": [1, 2, 3], "params": {}}),
        (DENOISER, {"latents": latents(3)}),
        (DENOISER, {"latents": latents(3), "params": [1]}),
        (DENOISER, {}),
        (ENCODER, {"embeds": [1]}),
        (ENCODER, {"prompt_embeds": latents(1)}),
        (DECODER, {"png": "not bytes"}),
        (DECODER, {}),
    ],
    ids=[
        "latents-2",
        "latents-4",
        "latents-0d",
        "latents-list",
        "no-params",
        "params-list",
        "empty",
        "embeds-list",
        "no-embeds",
        "png-str",
        "no-png",
    ],
)
def test_a_malformed_result_fails_the_request(service, payload):
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    sim.register(DEC, DECODER)
    out = sim.send(CLIENT, request(num_images=3))
    if service != ENCODER:
        out = sim.send(ENC, JobDone(job_id=only(out, JobAssign, ENC).job_id, payload={"embeds": EMBEDS}))
    if service == DECODER:
        done = {"latents": latents(3), "params": {}}
        out = sim.send(DEN, JobDone(job_id=only(out, JobAssign, DEN).job_id, payload=done))
    holder = {ENCODER: ENC, DENOISER: DEN, DECODER: DEC}[service]
    job = only(out, JobAssign, holder)
    out = sim.send(holder, JobDone(job_id=job.job_id, payload=payload))
    failed = only(out, RequestFailed, CLIENT)
    assert service in failed.error and "malformed" in failed.error
    assert not sent(out, JobAssign) and not sent(out, ImageResult)
    assert sim.core.requests == {}


# --- requests the broker refuses or cannot place ----------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"num_images": 17}, "num_images"),
        ({"height": 100}, "height"),
        ({"request_id": ""}, "request_id"),
    ],
)
def test_an_invalid_request_fails_naming_the_field(changes, field):
    sim = Sim()
    sim.register(ENC, ENCODER)
    out = sim.send(CLIENT, request(**changes))
    assert [type(m) for _, m in out] == [RequestFailed]
    failed = only(out, RequestFailed, CLIENT)
    assert failed.error.startswith(field) and not failed.retryable
    assert sim.core.requests == {} and sim.core.jobs == {}


def test_too_many_requests_is_a_retryable_busy_error():
    sim = Sim(max_requests=2)
    assert sent(sim.send(CLIENT, request("r1")), RequestAccepted)
    assert sent(sim.send(CLIENT, request("r2")), RequestAccepted)
    out = sim.send(CLIENT, request("r3"))
    failed = only(out, RequestFailed, CLIENT)
    assert failed.request_id == "r3" and failed.retryable and "busy" in failed.error
    assert not sent(out, RequestAccepted) and "r3" not in sim.core.requests
    assert sent(sim.send(CLIENT, request("r1")), RequestAccepted)  # a resend is not a new request
    sim.send(CLIENT, CancelRequest(request_id="r1"))
    assert sent(sim.send(CLIENT, request("r4")), RequestAccepted)


def test_a_request_without_a_model_gets_the_only_one():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    out = sim.send(CLIENT, request(model=""))
    assert only(out, JobAssign, ENC).payload["request"]["model"] == MODEL


def test_a_request_without_a_model_waits_for_the_first_node():
    sim = Sim()
    out = sim.send(CLIENT, request(model=""))
    assert sent(out, RequestAccepted) and not sent(out, JobAssign)
    out = sim.register(ENC, ENCODER)
    assert only(out, JobAssign, ENC).payload["request"]["model"] == MODEL


def test_a_request_without_a_model_fails_when_two_are_served():
    sim = Sim()
    sim.register(b"enc-a", ENCODER, model="model-a")
    sim.register(b"enc-b", ENCODER, model="model-b")
    failed = only(sim.send(CLIENT, request(model="")), RequestFailed, CLIENT)
    assert "model-a" in failed.error and "model-b" in failed.error
    assert sim.core.requests == {}


def test_a_request_with_no_denoiser_for_its_model_times_out_saying_so():
    sim = Sim()
    sim.register(ENC, ENCODER)
    t0 = sim.now
    job = only(sim.send(CLIENT, request(timeout=10.0)), JobAssign, ENC)
    sim.send(ENC, JobDone(job_id=job.job_id, payload={"embeds": EMBEDS}), at=t0 + 1)
    assert not sent(sim.tick(t0 + 10.0), RequestFailed)
    failed = only(sim.tick(t0 + 10.5), RequestFailed, CLIENT)
    assert failed.error == f"no denoiser node serves model {MODEL}"
    assert sim.core.requests == {} and sim.core.jobs == {}
    assert sim.status().queues[f"denoiser/{MODEL}"] == 0


def test_a_request_whose_job_runs_too_long_times_out_and_cancels_it():
    sim = Sim()
    sim.register(ENC, ENCODER)
    t0 = sim.now
    job = only(sim.send(CLIENT, request(timeout=2.0)), JobAssign, ENC)
    sim.send(ENC, Heartbeat(), at=t0 + 2)
    out = sim.tick(t0 + 2.5)
    assert only(out, RequestFailed, CLIENT).error == "timed out after 2s"
    assert only(out, JobCancel, ENC).job_id == job.job_id


def test_a_request_for_no_model_times_out_saying_so():
    sim = Sim()
    t0 = sim.now
    sim.send(CLIENT, request(model="", timeout=1.0))
    assert only(sim.tick(t0 + 1.5), RequestFailed, CLIENT).error == "no node serves any model yet"


# --- control messages -------------------------------------------------------------------------


def test_a_heartbeat_from_an_unknown_node_asks_it_to_reconnect():
    sim = Sim()
    assert sim.send(b"stranger", Heartbeat()) == [(b"stranger", Reconnect())]
    sim.register(ENC, ENCODER)
    assert sim.send(ENC, Heartbeat()) == []


def test_cancel_removes_the_request_and_cancels_its_running_job():
    sim = Sim()
    sim.register(ENC, ENCODER)
    job = only(sim.send(CLIENT, request()), JobAssign, ENC)

    assert sim.send(b"intruder", CancelRequest(request_id="r1")) == []  # only the owner may cancel
    assert "r1" in sim.core.requests

    out = sim.send(CLIENT, CancelRequest(request_id="r1"))
    assert only(out, JobCancel, ENC).job_id == job.job_id
    failed = only(out, RequestFailed, CLIENT)
    assert failed.request_id == "r1" and "cancel" in failed.error
    assert sim.core.requests == {} and sim.core.jobs == {}

    # The node answers the cancel; that frees its slot for the next request.
    assert sim.send(ENC, JobFailed(job_id=job.job_id, error="cancelled")) == []
    assert only(sim.send(CLIENT, request("r2")), JobAssign, ENC).request_id == "r2"


def test_cancel_of_a_queued_job_takes_it_off_the_queue():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.send(CLIENT, request("r1"))
    assert not sent(sim.send(CLIENT, request("r2")), JobAssign)
    out = sim.send(CLIENT, CancelRequest(request_id="r2"))
    assert not sent(out, JobCancel) and only(out, RequestFailed, CLIENT).request_id == "r2"
    assert sim.status().queues[f"encoder/{MODEL}"] == 0


def test_job_progress_is_forwarded_to_the_client():
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    denoise = only(to_denoise(sim, "r1"), JobAssign, DEN)
    out = sim.send(DEN, JobProgress(job_id=denoise.job_id, step=3, total=20))
    assert out == [(CLIENT, ProgressEvent(request_id="r1", stage="denoiser", node="den-node", step=3, total=20))]
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
    first = only(sim.send(b"greedy", request("g0")), JobAssign, ENC)
    for i in range(1, 6):
        assert not sent(sim.send(b"greedy", request(f"g{i}")), JobAssign)  # the one node is busy
    assert not sent(sim.send(b"polite", request("p0")), JobAssign)
    order = []
    job = first
    for _ in range(6):
        out = sim.send(ENC, JobDone(job_id=job.job_id, payload={"embeds": EMBEDS}))
        job = only(out, JobAssign, ENC)
        order.append(job.request_id)
    assert order == ["g1", "p0", "g2", "g3", "g4", "g5"]


def test_turns_go_per_named_user_across_connections():
    """A gateway spreads a user's requests over its pooled connections: they still share one turn."""
    sim = Sim()
    sim.register(ENC, ENCODER)
    first = only(sim.send(b"conn1", request("a0", user="alice")), JobAssign, ENC)
    for i, conn in enumerate((b"conn2", b"conn3", b"conn1"), start=1):
        sim.send(conn, request(f"a{i}", user="alice"))
    sim.send(b"conn2", request("b0", user="bob"))
    sim.send(b"conn2", request("c0"))  # no user: its connection takes turns
    order, job = [], first
    for _ in range(5):
        job = only(sim.send(ENC, JobDone(job_id=job.job_id, payload={"embeds": EMBEDS})), JobAssign, ENC)
        order.append(job.request_id)
    assert order == ["a1", "b0", "c0", "a2", "a3"]
    assert "user" not in job.payload["request"]  # nodes are not told whom a request is for
