"""Every wire message round-trips; anything malformed is a ProtocolError (or CodecError), never a crash."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import codec, errors, messages
from protocol.codec import CodecError
from protocol.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    SERVICES,
    CancelRequest,
    DecodedImage,
    DecodeJob,
    DenoisedLatents,
    DenoiseJob,
    Embeddings,
    EncodedImages,
    EncodeImagesJob,
    EncodeJob,
    GenerateRequest,
    Heartbeat,
    ImageInputs,
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
    RequestSpec,
    ResolvedParams,
    StageJob,
    StageResult,
    StatusReply,
    StatusRequest,
    WorkerGoodbye,
    WorkerReady,
)
from protocol.stages import STAGE_SERVICE
from protocol.tensors import WireTensor

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROOT = Path(__file__).resolve().parents[1]

EMBEDS = torch.randn(1, 77, 32).to(torch.bfloat16)  # (1, 77, 768) in real models; large: its own frame
POOLED = torch.randn(1, 16)  # small: inside the msgpack document
MASK = torch.ones(1, 77, dtype=torch.bool)
LATENTS = torch.randn(3, 4, 8, 8)  # (num_images, C, H/8, W/8)
IMAGE_INPUTS = ImageInputs(
    tensors={"image": torch.randn(3, 4, 8, 8), "mask_image": torch.ones(3, 1, 64, 64, dtype=torch.float16)},
    generator_state=torch.randint(0, 256, (3, 16), dtype=torch.uint8),
    height=64,
    width=64,
)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(200)

SPEC = RequestSpec(
    model="sd-tiny",
    prompt="a red fox",
    negative_prompt="blurry",
    steps=20,
    guidance=7.5,
    height=64,
    width=64,
    seed=7,
    num_images=3,
    scheduler="euler_a",
    preview_every=0,
    strength=0.75,
    image_sha256=[hashlib.sha256(PNG).hexdigest()],
)
PARAMS = ResolvedParams(
    model="sd-tiny",
    family="sd",
    prompt="a red fox",
    negative_prompt="blurry",
    seed=7,
    steps=20,
    guidance=7.5,
    true_cfg=None,
    height=64,
    width=64,
)

SAMPLES: list[Message] = [
    GenerateRequest(request_id="r1", prompt="a red fox", seed=7),
    GenerateRequest(
        request_id="r2",
        model="sd-tiny",
        prompt="a red fox",
        negative_prompt="blurry",
        steps=20,
        guidance=7.5,
        true_cfg=4,  # an int is a valid float
        height=512,
        width=768,
        seed=2**63 - 4,
        num_images=3,
        scheduler="dpmpp_2m",
        preview_every=5,
        images=[PNG],
        mask=PNG[:100],
        strength=1,
        timeout=12,
        user="alice",
    ),
    CancelRequest(request_id="r1"),
    StatusRequest(request_id="s1"),
    RequestAccepted(request_id="r1"),
    ProgressEvent(request_id="r1", stage="denoise", service="denoiser", node="host:1", step=3, total=20),
    ProgressEvent(request_id="r1", stage="denoise", node="host:1", step=5, total=20, previews=[PNG, PNG]),
    ImageResult(
        request_id="r1",
        index=2,
        seed=9,
        png=b"\x89PNG\r\n\x1a\n" + bytes(2000),
        params=PARAMS,
        warnings=["negative_prompt is ignored"],
    ),
    RequestFailed(
        request_id="r1", error="denoiser host:1 ran out of memory", code=errors.OUT_OF_MEMORY, retryable=True
    ),
    RequestFailed(request_id="r2", error="height must be a multiple of 8", code=errors.INVALID_REQUEST, field="height"),
    StatusReply(
        request_id="s1",
        nodes=[{"service": "denoiser", "model": "m", "node": "h:2", "state": "idle", "info": {"gpu": "H100"}}],
        queues={"denoiser/m": 2},
        requests_in_flight=1,
    ),
    WorkerReady(service="denoiser", model="sd-tiny", node="host:1", capacity=2, info={"device": "cuda:0"}),
    Heartbeat(),
    Heartbeat(stats={"cache_hits": 3, "cache_bytes": 1 << 40, "ratio": 0.5}),
    WorkerGoodbye(),
    JobProgress(job_id="j1", step=5, total=20),
    JobProgress(job_id="j1", step=10, total=20, previews=[PNG]),
    JobFailed(job_id="j1", error="RuntimeError: boom"),
    JobFailed(job_id="j2", error="true_cfg: no true_cfg_scale", code=errors.INVALID_REQUEST, field="true_cfg"),
    Embeddings(job_id="j1", embeds={"prompt_embeds": EMBEDS, "pooled_prompt_embeds": POOLED, "mask": MASK}),
    Embeddings(job_id="j1b", embeds={}, stats={"cache_hits": 1}),
    DenoisedLatents(job_id="j2", latents=LATENTS, params=PARAMS, warnings=["x"], stats={"images": 3}),
    DecodedImage(job_id="j3", png=b"\x89PNG"),
    EncodedImages(job_id="j7", inputs=IMAGE_INPUTS),
    EncodeJob(job_id="j4", request_id="r1", request=SPEC),
    DenoiseJob(job_id="j5", request_id="r1", request=SPEC, embeds={"prompt_embeds": EMBEDS, "mask": MASK}),
    DenoiseJob(job_id="j5b", request_id="r1", request=SPEC, embeds={"prompt_embeds": EMBEDS}, images=IMAGE_INPUTS),
    EncodeImagesJob(job_id="j8", request_id="r1", request=SPEC, images=[PNG]),
    EncodeImagesJob(job_id="j8b", request_id="r1", request=SPEC, images=[PNG, PNG], mask=PNG),
    DecodeJob(job_id="j6", request_id="r1", params=PARAMS, index=1, latents=LATENTS[1:2]),
    JobCancel(job_id="j4"),
    Reconnect(),
]

STAGE_MESSAGES = [m for m in SAMPLES if isinstance(m, StageJob | StageResult)]


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(got: object, want: object, *, torch_tensors: bool = True) -> None:
    """Equality through dataclasses, dicts and lists; tensors compared by dtype, shape and bytes.

    A tensor must come back as a torch.Tensor with ``torch_tensors``, else as a WireTensor.
    """
    if isinstance(want, torch.Tensor):
        name = str(want.dtype).removeprefix("torch.")
        if torch_tensors:
            assert isinstance(got, torch.Tensor), type(got)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert raw_bytes(got) == raw_bytes(want)
        else:
            assert isinstance(got, WireTensor), type(got)
            assert got.dtype == name and got.shape == tuple(want.shape)
            assert got.data.tobytes() == raw_bytes(want)
    elif dataclasses.is_dataclass(want):
        assert type(got) is type(want)
        for f in dataclasses.fields(want):
            assert_same(getattr(got, f.name), getattr(want, f.name), torch_tensors=torch_tensors)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys()
        for key in want:
            assert_same(got[key], want[key], torch_tensors=torch_tensors)
    elif isinstance(want, list | tuple):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w, torch_tensors=torch_tensors)
    else:
        assert type(got) is type(want) and got == want


def raw(body: object) -> list:
    """Frames of an arbitrary body, bypassing to_frames' well-formedness."""
    return codec.encode(body)


def plain(value: object) -> object:
    """A dataclass as the map it travels as."""
    return dataclasses.asdict(value)


def test_samples_cover_every_message_type():
    assert {m.KIND for m in SAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("torch_tensors", [False, True], ids=["wire", "torch"])
@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.KIND)
def test_every_message_roundtrips(message, torch_tensors):
    got = messages.from_frames(messages.to_frames(message), torch_tensors=torch_tensors)
    assert type(got) is type(message)
    assert_same(got, message, torch_tensors=torch_tensors)


@pytest.mark.parametrize("message", STAGE_MESSAGES, ids=lambda m: m.KIND)
def test_a_stage_message_decoded_without_torch_is_forwarded_byte_for_byte(message):
    """What the broker does: decode into WireTensors, send on; the frames are the ones received."""
    frames = [bytes(f) for f in messages.to_frames(message)]
    forwarded = messages.to_frames(messages.from_frames(frames))
    assert [bytes(f) for f in forwarded] == frames


def test_roundtrip_through_plain_bytes():
    message = DenoisedLatents(job_id="j", latents=LATENTS, params=PARAMS)
    frames = [bytes(f) for f in messages.to_frames(message)]
    assert len(frames) == 2  # the latents ride in their own frame
    assert_same(messages.from_frames(frames).latents, LATENTS, torch_tensors=False)
    assert_same(messages.from_frames(frames, torch_tensors=True).latents, LATENTS)


def test_a_decode_job_made_from_rows_of_received_latents_carries_that_image():
    """The broker splits a request's latents into one decode job per image, without torch."""
    received = messages.from_frames(messages.to_frames(DenoisedLatents(job_id="j", latents=LATENTS, params=PARAMS)))
    for index in range(LATENTS.shape[0]):
        job = DecodeJob(
            job_id=f"d{index}",
            request_id="r",
            params=received.params,
            index=index,
            latents=received.latents.rows(index, index + 1),
        )
        got = messages.from_frames(messages.to_frames(job), torch_tensors=True)
        assert_same(got.latents, LATENTS[index : index + 1])
        assert got.params == PARAMS and got.index == index


def test_decoding_a_typed_message_and_forwarding_its_rows_imports_no_torch():
    frames = [bytes(f) for f in messages.to_frames(DenoisedLatents(job_id="j", latents=LATENTS, params=PARAMS))]
    code = """
import sys, msgpack
import protocol.messages, protocol.codec
from protocol.messages import DecodeJob, DenoisedLatents, from_frames, to_frames
from protocol.tensors import WireTensor
got = from_frames(msgpack.unpackb(sys.stdin.buffer.read()))
assert isinstance(got, DenoisedLatents) and isinstance(got.latents, WireTensor), got
assert got.latents.dtype == "float32" and got.latents.shape == (3, 4, 8, 8)
job = DecodeJob(job_id="d", request_id="r", params=got.params, index=2, latents=got.latents.rows(2, 3))
sys.stdout.buffer.write(msgpack.packb([bytes(f) for f in to_frames(job)]))
assert "torch" not in sys.modules, "torch was imported"
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], input=msgpack.packb(frames), capture_output=True, env=env, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    job = messages.from_frames(msgpack.unpackb(done.stdout), torch_tensors=True)
    assert isinstance(job, DecodeJob) and job.index == 2
    assert_same(job.latents, LATENTS[2:3])


def test_defaults_are_filled_in_when_fields_are_absent():
    got = messages.from_frames(
        raw({"v": PROTOCOL_VERSION, "kind": "generate", "request_id": "r", "prompt": "p", "seed": 1})
    )
    assert got == GenerateRequest(request_id="r", prompt="p", seed=1)
    assert got.num_images == 1 and got.model == "" and got.steps is None


def test_nested_defaults_are_filled_in_when_fields_are_absent():
    got = messages.from_frames(raw({**ENCODE, "request": {"model": "m", "prompt": "p", "seed": 1}}))
    assert got.request == RequestSpec(model="m", prompt="p", seed=1)
    assert got.request.num_images == 1 and got.request.steps is None and got.request.true_cfg is None


def test_failures_default_to_a_model_error_naming_no_field():
    for message in (JobFailed(job_id="j", error="e"), RequestFailed(request_id="r", error="e")):
        got = messages.from_frames(messages.to_frames(message))
        assert got.code == errors.MODEL_ERROR and got.code in errors.CODES
        assert got.field is None


def test_wire_form_is_a_versioned_map():
    body = codec.decode(messages.to_frames(JobCancel(job_id="j")))
    assert body == {"v": PROTOCOL_VERSION, "kind": "job_cancel", "job_id": "j"}


def test_nested_dataclasses_travel_as_maps():
    body = codec.decode(messages.to_frames(EncodeJob(job_id="j", request_id="r", request=SPEC)))
    assert body == {
        "v": PROTOCOL_VERSION,
        "kind": "encode_job",
        "job_id": "j",
        "request_id": "r",
        "request": plain(SPEC),
        "images": [],
    }


def test_the_spec_of_a_request_is_what_every_stage_sees_of_it():
    request = SAMPLES[1]
    spec = request.spec()
    assert isinstance(spec, RequestSpec)
    for name in {f.name for f in dataclasses.fields(RequestSpec)} - {"image_sha256", "mask_sha256"}:
        assert getattr(spec, name) == getattr(request, name), name
    # The image files go only to the stage that encodes them; every other stage sees their digests.
    assert spec.image_sha256 == [hashlib.sha256(PNG).hexdigest()]
    assert spec.mask_sha256 == hashlib.sha256(PNG[:100]).hexdigest()
    assert {"request_id", "timeout", "user", "images", "mask"}.isdisjoint(plain(spec))
    assert SAMPLES[0].spec().image_sha256 == [] and SAMPLES[0].spec().mask_sha256 is None


STAGE_JOBS = [cls for cls in MESSAGE_TYPES.values() if issubclass(cls, StageJob)]


def test_the_stage_jobs_include_the_typed_jobs_of_every_stage():
    assert {EncodeJob, EncodeImagesJob, DenoiseJob, DecodeJob} <= set(STAGE_JOBS)
    assert {job.STAGE for job in STAGE_JOBS} == set(STAGE_SERVICE)


@pytest.mark.parametrize("job", STAGE_JOBS, ids=lambda job: job.KIND)
def test_each_stage_job_names_its_stage_service_and_result(job):
    assert job.SERVICE in SERVICES
    assert STAGE_SERVICE[job.STAGE] == job.SERVICE
    assert issubclass(job.RESULT, StageResult) and job.RESULT is not StageResult
    assert MESSAGE_TYPES[job.KIND] is job and MESSAGE_TYPES[job.RESULT.KIND] is job.RESULT
    assert {"job_id", "request_id"} <= {f.name for f in dataclasses.fields(job)}


def test_every_service_runs_some_stage_and_every_stage_has_its_own_result():
    assert [job.SERVICE for job in (EncodeJob, DenoiseJob, DecodeJob)] == list(SERVICES)
    assert EncodeImagesJob.SERVICE == DecodeJob.SERVICE  # the decoder node holds the VAE: both its halves
    assert len({job.RESULT for job in STAGE_JOBS}) == len(STAGE_JOBS)


# --- refusals ---------------------------------------------------------------------------------

GOOD = {"v": PROTOCOL_VERSION, "kind": "generate", "request_id": "r", "prompt": "p", "seed": 1}
ENCODE = {"v": PROTOCOL_VERSION, "kind": "encode_job", "job_id": "j", "request_id": "r", "request": plain(SPEC)}
DENOISE = {**ENCODE, "kind": "denoise_job", "embeds": {"prompt_embeds": EMBEDS}}
DECODE = {
    "v": PROTOCOL_VERSION,
    "kind": "decode_job",
    "job_id": "j",
    "request_id": "r",
    "params": plain(PARAMS),
    "index": 0,
    "latents": LATENTS[:1],
}
LATENTS_BODY = {"v": PROTOCOL_VERSION, "kind": "latents", "job_id": "j", "latents": LATENTS, "params": plain(PARAMS)}
IMAGE = {
    "v": PROTOCOL_VERSION,
    "kind": "image",
    "request_id": "r",
    "index": 0,
    "seed": 1,
    "png": b"",
    "params": plain(PARAMS),
}
DENOISE_IMAGES = {**DENOISE, "images": plain(IMAGE_INPUTS)}
ENCODE_IMAGES = {**ENCODE, "kind": "encode_images_job", "images": [PNG], "mask": PNG}
BODIES = {
    "encode_job": ENCODE,
    "denoise_job": DENOISE,
    "denoise_job+images": DENOISE_IMAGES,
    "encode_images_job": ENCODE_IMAGES,
    "decode_job": DECODE,
    "latents": LATENTS_BODY,
    "image": IMAGE,
}


def nested(body: dict, path: str, value: object = ..., *, delete: bool = False) -> dict:
    """A copy of ``body`` with the field at ``path`` (like 'request.seed') set to ``value``, or deleted."""
    copy = {**body}
    outer, _, inner = path.partition(".")
    target = copy
    if inner:
        copy[outer] = {**copy[outer]}
        target, outer = copy[outer], inner
    if delete:
        del target[outer]
    else:
        target[outer] = value
    return copy


def test_the_hand_made_stage_bodies_are_valid():
    """So each refusal below is refused for the one thing it changes."""
    for body in BODIES.values():
        assert type(messages.from_frames(raw(body))) is MESSAGE_TYPES[body["kind"]]
    assert isinstance(messages.from_frames(raw(DENOISE_IMAGES)).images, ImageInputs)


@pytest.mark.parametrize("version", [0, 1, PROTOCOL_VERSION + 1, "2", None, [2]])
def test_wrong_version_is_refused(version):
    with pytest.raises(ProtocolError, match="version"):
        messages.from_frames(raw({**GOOD, "v": version}))


@pytest.mark.parametrize("version", [1, PROTOCOL_VERSION + 1])
def test_a_stage_job_of_another_version_is_refused(version):
    with pytest.raises(ProtocolError, match="version"):
        messages.from_frames(raw({**ENCODE, "v": version}))


def test_missing_version_is_refused():
    body = dict(GOOD)
    del body["v"]
    with pytest.raises(ProtocolError, match="version"):
        messages.from_frames(raw(body))


@pytest.mark.parametrize(
    "kind", ["generat", "GENERATE", "", 1, None, b"generate", ["generate"], "job_assign", "job_done"]
)
def test_unknown_kind_is_refused(kind):
    with pytest.raises(ProtocolError, match="kind"):
        messages.from_frames(raw({**GOOD, "kind": kind}))


def test_missing_kind_is_refused():
    body = dict(GOOD)
    del body["kind"]
    with pytest.raises(ProtocolError, match="kind"):
        messages.from_frames(raw(body))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", "ten"),
        ("steps", True),  # bool is not an int on this wire
        ("steps", 10.0),
        ("seed", None),
        ("seed", False),
        ("num_images", "3"),
        ("guidance", "7.5"),
        ("guidance", True),
        ("true_cfg", "4"),
        ("prompt", b"bytes"),
        ("prompt", 5),
        ("request_id", None),
        ("negative_prompt", 0),
        ("timeout", [300]),
        ("height", {"h": 1}),
        ("user", 1),
    ],
)
def test_field_of_the_wrong_type_is_refused(field, value):
    with pytest.raises(ProtocolError, match=field):
        messages.from_frames(raw({**GOOD, field: value}))


@pytest.mark.parametrize(
    "body",
    [
        {"v": PROTOCOL_VERSION, "kind": "image", "request_id": "r", "index": 0, "seed": 1, "png": "not bytes"},
        {"v": PROTOCOL_VERSION, "kind": "embeddings", "job_id": "j", "embeds": [1, 2]},
        {"v": PROTOCOL_VERSION, "kind": "embeddings", "job_id": "j", "embeds": torch.ones(2)},
        {"v": PROTOCOL_VERSION, "kind": "decoded", "job_id": "j", "png": 1},
        {"v": PROTOCOL_VERSION, "kind": "status_reply", "request_id": "s", "nodes": {"a": 1}},
        {"v": PROTOCOL_VERSION, "kind": "failed", "request_id": "r", "error": "e", "retryable": 1},
        {"v": PROTOCOL_VERSION, "kind": "failed", "request_id": "r", "error": "e", "code": 5},
        {"v": PROTOCOL_VERSION, "kind": "job_failed", "job_id": "j", "error": "e", "field": 5},
        {"v": PROTOCOL_VERSION, "kind": "ready", "service": "encoder", "model": "m", "node": "n", "capacity": 1.5},
        {"v": PROTOCOL_VERSION, "kind": "heartbeat", "stats": [1]},
        {**DECODE, "index": "0"},
    ],
    ids=[
        "png-str",
        "embeds-list",
        "embeds-tensor",
        "decoded-png-int",
        "nodes-map",
        "retryable-int",
        "code-int",
        "field-int",
        "capacity-float",
        "stats-list",
        "index-str",
    ],
)
def test_other_wrong_types_are_refused(body):
    with pytest.raises(ProtocolError, match="wrong type"):
        messages.from_frames(raw(body))


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("encode_job", "request.seed", "7"),
        ("encode_job", "request.seed", True),
        ("encode_job", "request.steps", 2.5),
        ("encode_job", "request.prompt", None),
        ("encode_job", "request.model", b"sd"),
        ("encode_job", "request.guidance", "7.5"),
        ("denoise_job", "request.num_images", True),
        ("denoise_job", "request.negative_prompt", ["x"]),
        ("denoise_job", "request.image_sha256", "abc"),
        ("encode_images_job", "request.strength", "0.5"),
        ("decode_job", "params.height", "64"),
        ("decode_job", "params.guidance", "7.5"),
        ("decode_job", "params.negative_prompt", None),  # "" when none, never None
        ("latents", "params.steps", None),
        ("image", "params.seed", 1.5),
    ],
    ids=lambda v: v if isinstance(v, str) else repr(v),
)
def test_a_nested_field_of_the_wrong_type_is_refused_naming_its_path(kind, path, value):
    with pytest.raises(ProtocolError, match=re.escape(repr(path)) + ".*wrong type"):
        messages.from_frames(raw(nested(BODIES[kind], path, value)))


OPTIONAL_NESTED_MISTAKES = [
    ("images.height", "64"),
    ("images.width", None),
    ("images.height", torch.tensor(64)),  # a tensor outside a tensor field
    ("images.generator_state", b"\x00" * 48),  # a non-tensor in a tensor field
    ("images.generator_state", None),
    ("images.tensors", [LATENTS]),
]
OPTIONAL_NESTED_IDS = [f"{path}-{type(value).__name__}" for path, value in OPTIONAL_NESTED_MISTAKES]


@pytest.mark.parametrize(("path", "value"), OPTIONAL_NESTED_MISTAKES, ids=OPTIONAL_NESTED_IDS)
def test_a_wrong_field_inside_an_optional_nested_field_is_refused(path, value):
    with pytest.raises(ProtocolError, match=r"'images.*wrong type"):
        messages.from_frames(raw(nested(DENOISE_IMAGES, path, value)))


@pytest.mark.parametrize(("path", "value"), OPTIONAL_NESTED_MISTAKES, ids=OPTIONAL_NESTED_IDS)
def test_a_wrong_field_inside_an_optional_nested_field_is_named_by_its_path(path, value):
    """DenoiseJob.images may be None; a map there is checked as ImageInputs and its mistakes named as such."""
    with pytest.raises(ProtocolError, match=re.escape(repr(path)) + ".*wrong type"):
        messages.from_frames(raw(nested(DENOISE_IMAGES, path, value)))


def test_a_wrong_value_inside_a_nested_map_is_named_by_its_key():
    with pytest.raises(ProtocolError, match=re.escape("images.tensors['image']") + ".*wrong type"):
        messages.from_frames(raw(nested(DENOISE_IMAGES, "images.tensors", {"image": "pixels"})))


@pytest.mark.parametrize("value", ["not a map", [1, 2], None, 5, b"\x80"], ids=repr)
@pytest.mark.parametrize(("kind", "field"), [("encode_job", "request"), ("decode_job", "params")])
def test_a_nested_field_that_is_not_a_map_is_refused(kind, field, value):
    with pytest.raises(ProtocolError, match=re.escape(repr(field)) + ".*wrong type"):
        messages.from_frames(raw({**BODIES[kind], field: value}))


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("encode_job", "request.colour"),
        ("encode_job", "request.timeout"),  # a GenerateRequest field the nodes never see
        ("encode_job", "request.user"),
        ("denoise_job", "request.request_id"),
        ("decode_job", "params.colour"),
        ("denoise_job+images", "images.colour"),
        ("encode_images_job", "request.images"),  # the image files travel beside the spec, not in it
        ("image", "params.index"),
    ],
)
def test_an_unknown_nested_field_is_refused(kind, path):
    outer, _, inner = path.partition(".")
    with pytest.raises(ProtocolError, match=rf"{outer}: unknown field.*'{inner}'"):
        messages.from_frames(raw(nested(BODIES[kind], path, 1)))


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("encode_job", "request.prompt"),
        ("encode_job", "request.seed"),
        ("denoise_job", "request.model"),
        ("decode_job", "params.family"),
        ("decode_job", "params.guidance"),  # may be None, but must be there
        ("latents", "params.width"),
        ("denoise_job+images", "images.generator_state"),
        ("denoise_job+images", "images.tensors"),
    ],
)
def test_a_missing_required_nested_field_is_refused(kind, path):
    outer, _, inner = path.partition(".")
    with pytest.raises(ProtocolError, match=rf"{outer}:.*'{inner}'"):
        messages.from_frames(raw(nested(BODIES[kind], path, delete=True)))


@pytest.mark.parametrize(
    ("kind", "missing"),
    [
        ("encode_job", "request"),
        ("denoise_job", "embeds"),
        ("decode_job", "latents"),
        ("decode_job", "params"),
        ("decode_job", "index"),
        ("latents", "latents"),
    ],
)
def test_a_missing_required_field_of_a_stage_message_is_refused(kind, missing):
    with pytest.raises(ProtocolError, match=missing):
        messages.from_frames(raw(nested(BODIES[kind], missing, delete=True)))


def _wire(tensor: torch.Tensor) -> WireTensor:
    return codec.decode(codec.encode(tensor))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"v": PROTOCOL_VERSION, "kind": "heartbeat", "stats": {"t": torch.ones(3)}}, "stats"),
        ({"v": PROTOCOL_VERSION, "kind": "heartbeat", "stats": {"deep": [{"t": torch.ones(500)}]}}, "stats"),
        ({"v": PROTOCOL_VERSION, "kind": "heartbeat", "stats": {"t": _wire(torch.ones(2))}}, "stats"),
        (
            {"v": PROTOCOL_VERSION, "kind": "ready", "service": "s", "model": "m", "node": "n", "info": {"t": MASK}},
            "info",
        ),
        ({"v": PROTOCOL_VERSION, "kind": "status_reply", "request_id": "s", "nodes": [{"t": MASK}]}, "nodes"),
        ({"v": PROTOCOL_VERSION, "kind": "status_reply", "request_id": "s", "queues": {"q": MASK}}, "queues"),
        ({"v": PROTOCOL_VERSION, "kind": "embeddings", "job_id": "j", "embeds": {}, "stats": {"t": MASK}}, "stats"),
        ({"v": PROTOCOL_VERSION, "kind": "decoded", "job_id": "j", "png": torch.ones(4, dtype=torch.uint8)}, "png"),
        ({"v": PROTOCOL_VERSION, "kind": "job_failed", "job_id": "j", "error": torch.ones(1)}, "error"),
        ({**GOOD, "seed": torch.tensor(1)}, "seed"),
        ({**GOOD, "guidance": torch.tensor(7.5)}, "guidance"),
        ({**IMAGE, "warnings": [torch.ones(1)]}, "warnings[0]"),
        (nested(ENCODE, "request.prompt", torch.ones(2)), "request.prompt"),
        (nested(DECODE, "params.seed", torch.tensor(7)), "params.seed"),
        ({**DECODE, "index": torch.tensor(0)}, "index"),
        ({**ENCODE_IMAGES, "images": [torch.ones(4, dtype=torch.uint8)]}, "images[0]"),
        ({**ENCODE_IMAGES, "mask": torch.ones(4, dtype=torch.uint8)}, "mask"),
        (
            {"v": PROTOCOL_VERSION, "kind": "job_progress", "job_id": "j", "step": 1, "total": 2, "previews": [MASK]},
            "previews[0]",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_tensor_outside_a_tensor_field_is_refused(body, field):
    with pytest.raises(ProtocolError, match=re.escape(repr(field)) + ".*wrong type"):
        messages.from_frames(raw(body))


@pytest.mark.parametrize("torch_tensors", [False, True], ids=["wire", "torch"])
def test_a_tensor_in_heartbeat_stats_is_refused(torch_tensors):
    frames = messages.to_frames(Heartbeat(stats={"cache_hits": 1, "oops": torch.zeros(2)}))
    with pytest.raises(ProtocolError, match="'stats'"):
        messages.from_frames(frames, torch_tensors=torch_tensors)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**DECODE, "latents": b"\x00" * 1024}, "latents"),
        ({**DECODE, "latents": [[1.0, 2.0]]}, "latents"),
        ({**DECODE, "latents": None}, "latents"),
        ({**DECODE, "latents": {"a": LATENTS}}, "latents"),
        ({**DECODE, "latents": 1.5}, "latents"),
        ({**LATENTS_BODY, "latents": "latents"}, "latents"),
        ({**DENOISE, "embeds": {"prompt_embeds": "text"}}, "embeds['prompt_embeds']"),
        ({**DENOISE, "embeds": {"prompt_embeds": [1, 2]}}, "embeds['prompt_embeds']"),
        ({**DENOISE, "embeds": {"prompt_embeds": EMBEDS, "mask": None}}, "embeds['mask']"),
        ({**DENOISE, "embeds": {b"prompt_embeds": EMBEDS}}, "embeds key"),
        ({**DENOISE, "embeds": [EMBEDS]}, "embeds"),
        ({"v": PROTOCOL_VERSION, "kind": "embeddings", "job_id": "j", "embeds": {"x": {"y": POOLED}}}, "embeds['x']"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_non_tensor_in_a_tensor_field_is_refused(body, field):
    with pytest.raises(ProtocolError, match=re.escape(repr(field)) + ".*wrong type"):
        messages.from_frames(raw(body))


@pytest.mark.parametrize("extra", [{"colour": "red"}, {"KIND": "generate"}, {"": 1}])
def test_unknown_field_is_refused(extra):
    with pytest.raises(ProtocolError, match="unknown field"):
        messages.from_frames(raw({**GOOD, **extra}))


@pytest.mark.parametrize("extra", [{"payload": {}}, {"stats": {}}, {"SERVICE": "encoder"}])
def test_unknown_field_of_a_stage_job_is_refused(extra):
    with pytest.raises(ProtocolError, match="unknown field"):
        messages.from_frames(raw({**ENCODE, **extra}))


def test_unknown_fields_of_mixed_key_types_are_refused():
    """msgpack map keys may be str or bytes; naming both in the error must not crash."""
    with pytest.raises(ProtocolError, match="unknown field"):
        messages.from_frames(raw({**GOOD, b"raw": 1, "text": 2}))
    with pytest.raises(ProtocolError, match="unknown field"):
        messages.from_frames(raw({**ENCODE, "request": {**plain(SPEC), b"raw": 1, "text": 2}}))


@pytest.mark.parametrize("missing", ["request_id", "prompt", "seed"])
def test_missing_required_field_is_refused(missing):
    body = dict(GOOD)
    del body[missing]
    with pytest.raises(ProtocolError, match=missing):
        messages.from_frames(raw(body))


def test_missing_required_field_of_a_worker_message_is_refused():
    with pytest.raises(ProtocolError, match="embeds"):
        messages.from_frames(raw({"v": PROTOCOL_VERSION, "kind": "embeddings", "job_id": "j"}))


@pytest.mark.parametrize("body", [[1, "generate"], "generate", 1, None, b"\x81", torch.ones(3)], ids=repr)
def test_body_that_is_not_a_map_is_refused(body):
    with pytest.raises(ProtocolError, match="not a map"):
        messages.from_frames(raw(body))


def test_codec_errors_come_through_as_codec_errors():
    with pytest.raises(CodecError):
        messages.from_frames([b"\xc1"])
    with pytest.raises(CodecError):
        messages.from_frames([b"\xc1"], torch_tensors=True)


# --- properties -------------------------------------------------------------------------------

FIELD_NAMES = sorted({f.name for cls in MESSAGE_TYPES.values() for f in dataclasses.fields(cls)})

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8,
)
keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=6) | st.binary(max_size=4)
small_tensors = st.sampled_from([POOLED, MASK, LATENTS[:1], torch.zeros(0), torch.tensor(3)])
TYPED = {
    str: st.text(max_size=4),
    int: st.integers(0, 5),
    float: st.floats(allow_nan=False, width=32),
    dict: st.just({}),
    bytes: st.binary(max_size=4),
}


def right_typed(hint: object) -> st.SearchStrategy | None:
    """Values a field typed ``hint`` accepts (nested dataclasses and tensors included), or None if not known."""
    if hint in TYPED:
        return TYPED[hint]
    if hint is type(None):
        return st.none()
    if hint is messages.Tensor:
        return small_tensors
    if dataclasses.is_dataclass(hint):
        return fields_of(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [strategy for arg in args if (strategy := right_typed(arg)) is not None]
        return st.one_of(options) if options else None
    if origin is dict and args[1:] == (messages.Tensor,):
        return st.dictionaries(st.text(max_size=4), small_tensors, max_size=2)
    if origin is list and args == (str,):
        return st.lists(st.text(max_size=4), max_size=2)
    return None


@st.composite
def fields_of(draw, cls: type) -> dict:
    """Right-typed values for ``cls``'s required fields, sometimes with one of them spoiled."""
    body: dict = {}
    hints = messages._hints(cls)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and (strategy := right_typed(hints[f.name])) is not None:
            body[f.name] = draw(strategy)
    if body and draw(st.integers(0, 3)) == 0:  # spoil one: a wrong value, or a missing field
        name = draw(st.sampled_from(sorted(body)))
        if draw(st.booleans()):
            del body[name]
        else:
            body[name] = draw(values | small_tensors)
    return body


@st.composite
def bodies(draw) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(values)  # not necessarily a map
    body = draw(st.dictionaries(keys, values, max_size=6))
    if draw(st.booleans()):
        body["v"] = draw(st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 1, "2", None]))
    if draw(st.booleans()):
        body["kind"] = draw(st.sampled_from(sorted(MESSAGE_TYPES)) | st.text(max_size=6) | st.integers(0, 3))
    # Often fill the required fields of the chosen kind with right-typed values, so some bodies pass.
    cls = MESSAGE_TYPES.get(body.get("kind")) if isinstance(body.get("kind"), str) else None
    if cls is not None and draw(st.booleans()):
        if draw(st.booleans()):  # and often keep only the fields the kind has
            names = {"v", "kind", *messages._hints(cls)}
            body = {key: value for key, value in body.items() if key in names}
        body.update(draw(fields_of(cls)))
    return body


@FAST
@given(bodies(), st.booleans())
def test_property_arbitrary_bodies_give_a_message_or_a_protocol_error(body, torch_tensors):
    try:
        frames = codec.encode(body)
    except CodecError:
        return
    try:
        message = messages.from_frames(frames, torch_tensors=torch_tensors)
    except (ProtocolError, CodecError):
        return
    assert isinstance(body, dict)
    assert type(message) is MESSAGE_TYPES[body["kind"]]
    again = messages.from_frames(messages.to_frames(message))  # what was accepted can be sent on
    assert type(again) is type(message)
