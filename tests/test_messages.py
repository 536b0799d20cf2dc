"""Every wire message round-trips; anything malformed is a ProtocolError (or CodecError), never a crash."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import codec, messages
from protocol.codec import CodecError
from protocol.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
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
    ProtocolError,
    Reconnect,
    RequestAccepted,
    RequestFailed,
    StatusReply,
    StatusRequest,
    WorkerGoodbye,
    WorkerReady,
)

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

EMBEDS = torch.randn(1, 77, 32).to(torch.bfloat16)  # (B, 77, 768) in real models; large: its own frame
LATENTS = torch.randn(3, 4, 8, 8)  # (num_images, C, H/8, W/8)

SAMPLES: list[Message] = [
    GenerateRequest(request_id="r1", prompt="a red fox", seed=7),
    GenerateRequest(
        request_id="r2",
        model="sd-tiny",
        prompt="a red fox",
        negative_prompt="blurry",
        steps=20,
        guidance=7.5,
        height=512,
        width=768,
        seed=2**63 - 4,
        num_images=3,
        timeout=12,  # an int is a valid float
    ),
    CancelRequest(request_id="r1"),
    StatusRequest(request_id="s1"),
    RequestAccepted(request_id="r1"),
    ProgressEvent(request_id="r1", stage="denoiser", node="host:1", step=3, total=20),
    ImageResult(request_id="r1", index=2, seed=9, png=b"\x89PNG\r\n\x1a\n" + bytes(2000), params={"steps": 20}),
    RequestFailed(request_id="r1", error="denoiser host:1 failed: out of memory", retryable=True),
    StatusReply(
        request_id="s1",
        nodes=[{"service": "denoiser", "model": "m", "node": "h:2", "state": "idle", "info": {"gpu": "H100"}}],
        queues={"denoiser/m": 2},
        requests_in_flight=1,
    ),
    WorkerReady(service="denoiser", model="sd-tiny", node="host:1", capacity=2, info={"device": "cuda:0"}),
    Heartbeat(),
    WorkerGoodbye(),
    JobProgress(job_id="j1", step=5, total=20),
    JobDone(job_id="j1", payload={"embeds": {"prompt_embeds": EMBEDS, "mask": torch.ones(1, 77, dtype=torch.bool)}}),
    JobDone(job_id="j2", payload={"latents": LATENTS, "params": {"steps": 20, "guidance": 7.5}}),
    JobDone(job_id="j3", payload={"png": b"\x89PNG"}),
    JobFailed(job_id="j1", error="RuntimeError: boom"),
    JobAssign(job_id="j4", request_id="r1", payload={"request": {"prompt": "x"}, "latents": LATENTS[1:2]}),
    JobCancel(job_id="j4"),
    Reconnect(),
]


def assert_same(got: object, want: object) -> None:
    """Equality that compares tensors by dtype, shape and value, through dicts and lists."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys()
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, list | tuple):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    else:
        assert type(got) is type(want) and got == want


def raw(body: object) -> list:
    """Frames of an arbitrary body, bypassing to_frames' well-formedness."""
    return codec.encode(body)


def test_samples_cover_every_message_type():
    assert {m.KIND for m in SAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.KIND)
def test_every_message_roundtrips(message):
    got = messages.from_frames(messages.to_frames(message))
    assert type(got) is type(message)
    for f in dataclasses.fields(message):
        assert_same(getattr(got, f.name), getattr(message, f.name))


def test_roundtrip_through_plain_bytes():
    message = JobDone(job_id="j", payload={"latents": LATENTS})
    frames = [bytes(f) for f in messages.to_frames(message)]
    assert len(frames) == 2  # the latents ride in their own frame
    got = messages.from_frames(frames)
    assert_same(got.payload["latents"], LATENTS)


def test_defaults_are_filled_in_when_fields_are_absent():
    got = messages.from_frames(
        raw({"v": PROTOCOL_VERSION, "kind": "generate", "request_id": "r", "prompt": "p", "seed": 1})
    )
    assert got == GenerateRequest(request_id="r", prompt="p", seed=1)
    assert got.num_images == 1 and got.model == "" and got.steps is None


def test_wire_form_is_a_versioned_map():
    body = codec.decode(messages.to_frames(JobCancel(job_id="j")))
    assert body == {"v": PROTOCOL_VERSION, "kind": "job_cancel", "job_id": "j"}


# --- refusals ---------------------------------------------------------------------------------

GOOD = {"v": PROTOCOL_VERSION, "kind": "generate", "request_id": "r", "prompt": "p", "seed": 1}


@pytest.mark.parametrize("version", [0, 2, PROTOCOL_VERSION + 1, "1", None, [1]])
def test_wrong_version_is_refused(version):
    with pytest.raises(ProtocolError, match="version"):
        messages.from_frames(raw({**GOOD, "v": version}))


def test_missing_version_is_refused():
    body = dict(GOOD)
    del body["v"]
    with pytest.raises(ProtocolError, match="version"):
        messages.from_frames(raw(body))


@pytest.mark.parametrize("kind", ["generat", "GENERATE", "", 1, None, b"generate", ["generate"]])
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
        ("prompt", b"bytes"),
        ("prompt", 5),
        ("request_id", None),
        ("negative_prompt", 0),
        ("timeout", [300]),
        ("height", {"h": 1}),
    ],
)
def test_field_of_the_wrong_type_is_refused(field, value):
    with pytest.raises(ProtocolError, match=field):
        messages.from_frames(raw({**GOOD, field: value}))


@pytest.mark.parametrize(
    "body",
    [
        {"v": 1, "kind": "image", "request_id": "r", "index": 0, "seed": 1, "png": "not bytes"},
        {"v": 1, "kind": "job_done", "job_id": "j", "payload": [1, 2]},
        {"v": 1, "kind": "job_done", "job_id": "j", "payload": torch.ones(2)},
        {"v": 1, "kind": "status_reply", "request_id": "s", "nodes": {"a": 1}},
        {"v": 1, "kind": "failed", "request_id": "r", "error": "e", "retryable": 1},
        {"v": 1, "kind": "ready", "service": "encoder", "model": "m", "node": "n", "capacity": 1.5},
    ],
    ids=["png-str", "payload-list", "payload-tensor", "nodes-map", "retryable-int", "capacity-float"],
)
def test_other_wrong_types_are_refused(body):
    with pytest.raises(ProtocolError, match="wrong type"):
        messages.from_frames(raw(body))


@pytest.mark.parametrize("extra", [{"colour": "red"}, {"KIND": "generate"}, {"": 1}])
def test_unknown_field_is_refused(extra):
    with pytest.raises(ProtocolError, match="unknown field"):
        messages.from_frames(raw({**GOOD, **extra}))


def test_unknown_fields_of_mixed_key_types_are_refused():
    """msgpack map keys may be str or bytes; naming both in the error must not crash."""
    with pytest.raises(ProtocolError, match="unknown field"):
        messages.from_frames(raw({**GOOD, b"raw": 1, "text": 2}))


@pytest.mark.parametrize("missing", ["request_id", "prompt", "seed"])
def test_missing_required_field_is_refused(missing):
    body = dict(GOOD)
    del body[missing]
    with pytest.raises(ProtocolError, match=missing):
        messages.from_frames(raw(body))


def test_missing_required_field_of_a_worker_message_is_refused():
    with pytest.raises(ProtocolError, match="payload"):
        messages.from_frames(raw({"v": 1, "kind": "job_done", "job_id": "j"}))


@pytest.mark.parametrize("body", [[1, "generate"], "generate", 1, None, b"\x81", torch.ones(3)], ids=repr)
def test_body_that_is_not_a_map_is_refused(body):
    with pytest.raises(ProtocolError, match="not a map"):
        messages.from_frames(raw(body))


def test_codec_errors_come_through_as_codec_errors():
    with pytest.raises(CodecError):
        messages.from_frames([b"\xc1"])


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


@st.composite
def bodies(draw) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(values)  # not necessarily a map
    body = draw(st.dictionaries(keys, values, max_size=6))
    if draw(st.booleans()):
        body["v"] = draw(st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 2, "1", None]))
    if draw(st.booleans()):
        body["kind"] = draw(st.sampled_from(sorted(MESSAGE_TYPES)) | st.text(max_size=6) | st.integers(0, 3))
    # Often fill the required fields of the chosen kind with right-typed values, so some bodies pass.
    cls = MESSAGE_TYPES.get(body.get("kind")) if isinstance(body.get("kind"), str) else None
    if cls is not None and draw(st.booleans()):
        typed = {str: st.text(max_size=4), int: st.integers(0, 5), dict: st.just({}), bytes: st.binary(max_size=4)}
        hints = messages._hints(cls)
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and hints[f.name] in typed:
                body[f.name] = draw(typed[hints[f.name]])
    return body


@FAST
@given(bodies())
def test_property_arbitrary_bodies_give_a_message_or_a_protocol_error(body):
    try:
        frames = codec.encode(body)
    except CodecError:
        return
    try:
        message = messages.from_frames(frames)
    except (ProtocolError, CodecError):
        return
    assert isinstance(body, dict)
    assert type(message) is MESSAGE_TYPES[body["kind"]]
    again = messages.from_frames(messages.to_frames(message))  # what was accepted can be sent on
    assert type(again) is type(message)
