"""Plans: the stages a request runs as, how their jobs are made, and the broker running any plan.

The broker is fed messages through the codec, as in test_broker_core; a custom plan is swapped
in for ``plan_for`` to show that what a plan's jobs carry, and how its stages depend on each
other, is the plan's business alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from protocol import broker_core, errors, messages
from protocol.broker_core import BrokerCore
from protocol.messages import (
    DECODER,
    DENOISER,
    ENCODER,
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
    Message,
    RequestFailed,
    ResolvedParams,
    StageJob,
    StageResult,
    WorkerReady,
)
from protocol.plans import TEXT_TO_IMAGE, Plan, PlanContext, PlanError, Stage, plan_for
from protocol.sockets import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS
from protocol.stages import DECODE, DENOISE, ENCODE, STAGE_SERVICE
from protocol.tensors import WireTensor

MODEL = "sd-tiny"
CLIENT = b"client"
ENC, DEN, DEC = b"enc", b"den", b"dec"
EXPIRY = HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS

PARAMS = ResolvedParams(
    model=MODEL,
    family="sd",
    prompt="a red fox",
    negative_prompt="",
    seed=7,
    steps=20,
    guidance=7.5,
    true_cfg=None,
    height=64,
    width=64,
)

Sent = list[tuple[bytes, Message]]


def request(request_id: str = "r1", **changes) -> GenerateRequest:
    return GenerateRequest(**{"request_id": request_id, "model": MODEL, "prompt": "a red fox", "seed": 7, **changes})


def wire(message: Message) -> Message:
    return messages.from_frames(messages.to_frames(message))


def wire_tensor(tensor: torch.Tensor) -> WireTensor:
    return WireTensor("float32", tuple(tensor.shape), memoryview(tensor.contiguous().numpy().tobytes()))


def torch_of(tensor: WireTensor | torch.Tensor) -> torch.Tensor:
    return tensor.to_torch() if isinstance(tensor, WireTensor) else tensor


class Sim:
    """A BrokerCore with a clock; each call returns (and clears) what the core sent, through the wire."""

    def __init__(self) -> None:
        self.core = BrokerCore()
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

    def register(self, identity: bytes, service: str, capacity: int = 1) -> Sent:
        return self.send(identity, WorkerReady(service=service, model=MODEL, node=identity.decode(), capacity=capacity))


def sent(out: Sent, kind: type[Message], to: bytes | None = None) -> list:
    return [m for identity, m in out if isinstance(m, kind) and (to is None or identity == to)]


def only(out: Sent, kind: type[Message], to: bytes | None = None):
    found = sent(out, kind, to)
    assert len(found) == 1, f"expected one {kind.__name__} to {to!r}, got {out}"
    return found[0]


# --- text to image ----------------------------------------------------------------------------


def test_every_request_runs_as_text_to_image():
    assert plan_for(request()) is TEXT_TO_IMAGE
    assert plan_for(request(model="", num_images=4)) is TEXT_TO_IMAGE


def test_text_to_image_encodes_then_denoises_then_decodes_its_images():
    assert [(stage.name, stage.needs) for stage in TEXT_TO_IMAGE.stages] == [
        (ENCODE, ()),
        (DENOISE, (ENCODE,)),
        (DECODE, (DENOISE,)),
    ]
    assert TEXT_TO_IMAGE.images == DECODE


def stage(name: str) -> Stage:
    (found,) = [s for s in TEXT_TO_IMAGE.stages if s.name == name]
    return found


def test_the_encode_job_carries_what_to_make_and_not_whom_it_is_for():
    req = request(num_images=2, steps=12, user="alice", timeout=30.0)
    (job,) = stage(ENCODE).jobs(PlanContext(request=req, results={}))
    assert isinstance(job, EncodeJob) and (ENCODE, STAGE_SERVICE[ENCODE]) == (job.STAGE, job.SERVICE)
    assert (job.request_id, job.request) == ("r1", req.spec())
    assert job.job_id
    (again,) = stage(ENCODE).jobs(PlanContext(request=req, results={}))
    assert again.job_id != job.job_id  # every job made is a job of its own


def test_the_denoise_job_carries_the_encoders_embeddings():
    req = request(num_images=3)
    embeds = {"prompt_embeds": torch.randn(1, 77, 32), "pooled_prompt_embeds": torch.randn(1, 32)}
    ctx = PlanContext(request=req, results={ENCODE: [Embeddings(job_id="e", embeds=embeds)]})
    (job,) = stage(DENOISE).jobs(ctx)
    assert isinstance(job, DenoiseJob) and job.SERVICE == DENOISER
    assert job.request == req.spec() and job.request_id == "r1"
    assert job.embeds.keys() == embeds.keys()
    assert all(job.embeds[name] is embeds[name] for name in embeds)


@pytest.mark.parametrize("as_wire", [False, True], ids=["torch", "wire"])
def test_decode_jobs_get_one_latents_row_each_with_its_index_and_the_resolved_params(as_wire):
    batch = torch.randn(3, 4, 8, 8)
    latents = wire_tensor(batch) if as_wire else batch
    denoised = DenoisedLatents(job_id="d", latents=latents, params=PARAMS)
    ctx = PlanContext(request=request(num_images=3), results={DENOISE: [denoised]})
    jobs = stage(DECODE).jobs(ctx)
    assert [type(job) for job in jobs] == [DecodeJob] * 3
    assert [job.index for job in jobs] == [0, 1, 2]
    assert len({job.job_id for job in jobs}) == 3
    for job in jobs:
        assert job.SERVICE == DECODER and job.request_id == "r1" and job.params == PARAMS
        assert isinstance(job.latents, WireTensor) == as_wire
        assert tuple(job.latents.shape) == (1, 4, 8, 8)
        assert torch.equal(torch_of(job.latents), batch[job.index : job.index + 1])


@pytest.mark.parametrize(
    "latents",
    [torch.randn(2, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor(1.0)],
    ids=["too-few-rows", "too-many-rows", "0d"],
)
def test_decode_jobs_are_not_made_from_latents_of_another_number_of_images(latents):
    denoised = DenoisedLatents(job_id="d", latents=latents, params=PARAMS)
    ctx = PlanContext(request=request(num_images=3), results={DENOISE: [denoised]})
    with pytest.raises(PlanError, match="expected latents for 3 image"):
        stage(DECODE).jobs(ctx)


def test_a_stage_reading_a_result_of_the_wrong_kind_is_a_plan_error():
    ctx = PlanContext(request=request(), results={ENCODE: [DecodedImage(job_id="x", png=b"png")]})
    with pytest.raises(PlanError, match="encode answered with decoded, not embeddings"):
        stage(DENOISE).jobs(ctx)


def test_an_image_has_its_index_seed_params_and_the_denoisers_warnings():
    denoised = DenoisedLatents(job_id="d", latents=torch.zeros(2, 4, 8, 8), params=PARAMS, warnings=["w"])
    ctx = PlanContext(request=request(num_images=2), results={DENOISE: [denoised]})
    job = stage(DECODE).jobs(ctx)[1]
    image = TEXT_TO_IMAGE.image(ctx, job, DecodedImage(job_id=job.job_id, png=b"png1"))
    assert image == ImageResult(
        request_id="r1", index=1, seed=PARAMS.seed + 1, png=b"png1", params=PARAMS, warnings=["w"]
    )


# --- plans refused at construction --------------------------------------------------------------


def no_jobs(ctx: PlanContext) -> list[StageJob]:
    return []


def no_image(ctx: PlanContext, job: StageJob, result: StageResult) -> ImageResult:
    raise AssertionError("not called")


@pytest.mark.parametrize(
    "stages",
    [
        (Stage("a", needs=("b",), jobs=no_jobs), Stage("b", needs=(), jobs=no_jobs)),  # b comes after a
        (Stage("a", needs=("a",), jobs=no_jobs),),  # itself
        (Stage("a", needs=(), jobs=no_jobs), Stage("b", needs=("a", "nowhere"), jobs=no_jobs)),
    ],
    ids=["later-stage", "itself", "missing-stage"],
)
def test_a_plan_whose_stage_needs_a_stage_not_before_it_is_refused(stages):
    with pytest.raises(ValueError, match="do not come before it"):
        Plan(kind="broken", stages=stages, images="a", image=no_image)


def test_a_plan_whose_images_come_from_no_stage_is_refused():
    with pytest.raises(ValueError, match="no stage decode"):
        Plan(kind="broken", stages=(Stage("a", needs=(), jobs=no_jobs),), images="decode", image=no_image)


# --- the broker running text to image ---------------------------------------------------------


@pytest.mark.parametrize("rows", [2, 4])
def test_latents_for_the_wrong_number_of_images_fail_the_request_as_a_model_error(rows):
    sim = Sim()
    sim.register(ENC, ENCODER)
    sim.register(DEN, DENOISER)
    sim.register(DEC, DECODER)
    encode = only(sim.send(CLIENT, request(num_images=3)), EncodeJob, ENC)
    denoise = only(sim.send(ENC, Embeddings(job_id=encode.job_id, embeds={})), DenoiseJob, DEN)
    done = DenoisedLatents(job_id=denoise.job_id, latents=torch.zeros(rows, 4, 8, 8), params=PARAMS)
    out = sim.send(DEN, done)
    failed = only(out, RequestFailed, CLIENT)
    assert (failed.code, failed.retryable) == (errors.MODEL_ERROR, False)
    assert f"expected latents for 3 image(s), got shape [{rows}, 4, 8, 8]" in failed.error
    assert not sent(out, StageJob) and sim.core.requests == {} and sim.core.jobs == {}


# --- a plan of two independent stages -----------------------------------------------------------


@dataclass(kw_only=True)
class StyleJob(EncodeJob):
    """A second text stage, independent of encode: the prompt's style, on denoiser nodes."""

    KIND: ClassVar[str] = "style_job"
    STAGE: ClassVar[str] = "style"
    SERVICE: ClassVar[str] = DENOISER


class FanIn:
    """encode (encoder) and style (denoiser) both feed decode (decoder), one decode job per image."""

    def __init__(self) -> None:
        self.decode_contexts: list[dict[str, list]] = []  # what each call of the decode stage saw
        self.plan = Plan(
            kind="fan-in",
            stages=(
                Stage(ENCODE, needs=(), jobs=lambda ctx: [ctx.job(EncodeJob, request=ctx.request.spec())]),
                Stage("style", needs=(), jobs=lambda ctx: [ctx.job(StyleJob, request=ctx.request.spec())]),
                Stage(DECODE, needs=(ENCODE, "style"), jobs=self.decode_jobs),
            ),
            images=DECODE,
            image=self.image,
        )

    def decode_jobs(self, ctx: PlanContext) -> list[StageJob]:
        self.decode_contexts.append({name: list(results) for name, results in ctx.results.items()})
        text = ctx.result(ENCODE, Embeddings).embeds["text"]
        style = ctx.result("style", Embeddings).embeds["style"]
        rows = torch_of(text) + torch_of(style)
        return [
            ctx.job(DecodeJob, params=PARAMS, index=index, latents=rows[index : index + 1])
            for index in range(ctx.request.num_images)
        ]

    def image(self, ctx: PlanContext, job: StageJob, result: StageResult) -> ImageResult:
        assert isinstance(job, DecodeJob) and isinstance(result, DecodedImage)
        return ImageResult(request_id=job.request_id, index=job.index, seed=job.index, png=result.png, params=PARAMS)


@pytest.fixture
def fan_in(monkeypatch: pytest.MonkeyPatch) -> FanIn:
    fan = FanIn()
    monkeypatch.setattr(broker_core, "plan_for", lambda req: fan.plan)
    monkeypatch.setitem(messages.MESSAGE_TYPES, StyleJob.KIND, StyleJob)  # so the new job type crosses the wire
    return fan


def fan_in_sim(decoders: int = 1, denoisers: int = 1) -> Sim:
    sim = Sim()
    sim.register(ENC, ENCODER)
    for i in range(denoisers):
        sim.register(b"den%d" % i, DENOISER)
    for i in range(decoders):
        sim.register(b"dec%d" % i, DECODER)
    return sim


def text(job: StageJob) -> Embeddings:
    return Embeddings(job_id=job.job_id, embeds={"text": torch.full((2, 3), 1.0)})


def style(job: StageJob) -> Embeddings:
    return Embeddings(job_id=job.job_id, embeds={"style": torch.full((2, 3), 10.0)})


@pytest.mark.parametrize("first", [ENCODE, "style"])
def test_a_stage_needing_two_others_starts_only_once_both_answered_in_either_order(fan_in, first):
    sim = fan_in_sim(decoders=2)
    out = sim.send(CLIENT, request(num_images=2))
    jobs = {ENCODE: only(out, EncodeJob, ENC), "style": only(out, StyleJob, b"den0")}  # both start at once
    assert type(jobs[ENCODE]) is EncodeJob and jobs["style"].request == request(num_images=2).spec()
    answers = {ENCODE: (ENC, text(jobs[ENCODE])), "style": (b"den0", style(jobs["style"]))}
    second = "style" if first == ENCODE else ENCODE

    out = sim.send(*answers[first])
    assert not sent(out, StageJob) and fan_in.decode_contexts == []

    out = sim.send(*answers[second])
    (seen,) = fan_in.decode_contexts
    assert set(seen) == {ENCODE, "style"} and None not in seen[ENCODE] + seen["style"]
    decodes = sorted(((to, m) for to, m in out if isinstance(m, DecodeJob)), key=lambda sent: sent[1].index)
    assert [(to in (b"dec0", b"dec1"), job.index) for to, job in decodes] == [(True, 0), (True, 1)]
    for _, job in decodes:
        assert torch.equal(job.latents.to_torch(), torch.full((1, 3), 11.0))

    images = []
    for holder, job in reversed(decodes):
        out = sim.send(holder, DecodedImage(job_id=job.job_id, png=b"png%d" % job.index))
        images += sent(out, ImageResult, CLIENT)
    assert [(image.index, image.png) for image in images] == [(1, b"png1"), (0, b"png0")]
    assert sim.core.requests == {} and sim.core.jobs == {}
    assert len(fan_in.decode_contexts) == 1


def test_a_job_of_any_plan_is_requeued_when_its_node_dies(fan_in):
    sim = fan_in_sim(denoisers=2)
    out = sim.send(CLIENT, request(num_images=1))
    encode = only(out, EncodeJob, ENC)
    ((holder, style_job),) = [(to, m) for to, m in out if isinstance(m, StyleJob)]
    other = ({b"den0", b"den1"} - {holder}).pop()

    t0 = sim.now
    sim.send(ENC, text(encode), at=t0 + 1)
    for identity in (ENC, other, b"dec0"):
        sim.send(identity, Heartbeat(), at=t0 + EXPIRY)
    out = sim.tick(t0 + EXPIRY + 0.5)  # the style node has been silent too long
    assert holder not in sim.core.workers
    again = only(out, StyleJob, other)
    assert again.job_id == style_job.job_id and fan_in.decode_contexts == []

    out = sim.send(other, style(again))
    decode = only(out, DecodeJob, b"dec0")
    image = only(sim.send(b"dec0", DecodedImage(job_id=decode.job_id, png=b"png")), ImageResult, CLIENT)
    assert image.index == 0 and sim.core.requests == {}

    # The presumed-dead node's own answer comes too late to make a second decode job.
    assert not sent(sim.send(holder, style(style_job)), StageJob)
    assert len(fan_in.decode_contexts) == 1


def test_cancel_stops_every_running_job_of_any_plan(fan_in):
    sim = fan_in_sim()
    out = sim.send(CLIENT, request())
    encode, style_job = only(out, EncodeJob, ENC), only(out, StyleJob, b"den0")
    out = sim.send(CLIENT, CancelRequest(request_id="r1"))
    assert {(to, m.job_id) for to, m in out if isinstance(m, JobCancel)} == {
        (ENC, encode.job_id),
        (b"den0", style_job.job_id),
    }
    assert only(out, RequestFailed, CLIENT).code == errors.CANCELLED
    assert sim.core.requests == {} and sim.core.jobs == {}

    # Answers that were already on their way start nothing.
    assert sim.send(ENC, text(encode)) == [] and sim.send(b"den0", style(style_job)) == []
    assert fan_in.decode_contexts == []


def test_cancel_after_one_of_two_needed_stages_answered_cancels_the_other(fan_in):
    sim = fan_in_sim()
    out = sim.send(CLIENT, request())
    encode, style_job = only(out, EncodeJob, ENC), only(out, StyleJob, b"den0")
    sim.send(ENC, text(encode))
    out = sim.send(CLIENT, CancelRequest(request_id="r1"))
    assert [(to, m.job_id) for to, m in out if isinstance(m, JobCancel)] == [(b"den0", style_job.job_id)]
    assert only(out, RequestFailed, CLIENT).code == errors.CANCELLED
    assert sim.core.jobs == {} and fan_in.decode_contexts == []


def test_a_plan_stage_without_a_node_times_out_naming_its_service(fan_in):
    sim = Sim()
    sim.register(ENC, ENCODER)
    t0 = sim.now
    encode = only(sim.send(CLIENT, request(timeout=5.0)), EncodeJob, ENC)
    sim.send(ENC, text(encode), at=t0 + 1)
    sim.send(ENC, Heartbeat(), at=t0 + 4)
    failed = only(sim.tick(t0 + 5.5), RequestFailed, CLIENT)
    assert failed.error == f"no denoiser node serves model {MODEL}"
    assert failed.code == errors.NO_NODE and sim.core.jobs == {}


def test_a_plan_stage_answered_with_the_wrong_result_type_fails_the_request(fan_in):
    sim = fan_in_sim()
    style_job = only(sim.send(CLIENT, request()), StyleJob, b"den0")
    result = DenoisedLatents(job_id=style_job.job_id, latents=torch.zeros(1, 1), params=PARAMS)
    out = sim.send(b"den0", result)
    failed = only(out, RequestFailed, CLIENT)
    assert failed.error == "style returned a malformed result: latents, not embeddings"
    assert failed.code == errors.MODEL_ERROR
    assert only(out, JobCancel, ENC)  # the encode job still running is stopped
    assert fan_in.decode_contexts == []


def test_a_malformed_input_to_a_later_stage_fails_the_request_naming_the_stages_it_reads(fan_in):
    sim = fan_in_sim()
    out = sim.send(CLIENT, request())
    encode, style_job = only(out, EncodeJob, ENC), only(out, StyleJob, b"den0")
    sim.send(ENC, Embeddings(job_id=encode.job_id, embeds={}))  # no "text" in it
    out = sim.send(b"den0", style(style_job))
    failed = only(out, RequestFailed, CLIENT)
    assert failed.error.startswith("encode/style returned a malformed result")
    assert failed.code == errors.MODEL_ERROR and sim.core.requests == {} and sim.core.jobs == {}
