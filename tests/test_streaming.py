"""Server-sent events over HTTP: OpenAI's image stream through the official SDK, and the page's
progress stream, against the session gateway; the event shapes in-process."""

from __future__ import annotations

import base64
import http.client
import io
import json
import time
import urllib.request
from collections.abc import Iterator

import openai
import pytest
from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent
from PIL import Image

from protocol import errors
from protocol.messages import ProgressEvent, StatusReply
from tests.support import serving_app
from triptych.client import GeneratedImage, GenerationError
from triptych.http import create_app
from triptych.http.streaming import OpenAIEvents, ProgressEvents, sse

PROMPT = "a red fox in the snow, photo"


def preview(step: int, total: int, images: int = 1) -> ProgressEvent:
    previews = [f"png {i} at {step}".encode() for i in range(images)]
    return ProgressEvent(request_id="r", stage="denoise", node="h:1", step=step, total=total, previews=previews)


def image(index: int) -> GeneratedImage:
    return GeneratedImage(index=index, seed=7 + index, png=b"png %d" % index, params={"width": 64, "height": 96})


# --- event shapes -------------------------------------------------------------------------------


def test_partial_images_are_the_previews_nearest_an_even_spread_of_the_steps():
    events = OpenAIEvents(partial_images=2, n=1, size="64x96")
    sent = [events.progress(preview(step, 9)) for step in range(1, 9)]
    steps = [step for step, out in zip(range(1, 9), sent, strict=True) if out]
    assert steps == [3, 6]  # the first previews at or past 1/3 and 2/3 of nine steps
    (name, data), *_ = sent[2]
    assert name == data["type"] == "image_generation.partial_image"
    assert data["partial_image_index"] == 0 and base64.b64decode(data["b64_json"]) == b"png 0 at 3"
    assert ImageGenPartialImageEvent.model_validate(data).size == "64x96"
    assert OpenAIEvents(partial_images=0, n=1, size="auto").progress(preview(5, 9)) == []


def test_completed_images_come_in_image_order_in_openai_shape():
    events = OpenAIEvents(partial_images=0, n=3, size="auto")
    assert events.image(image(1)) == []  # waits for image 0
    done = events.image(image(0)) + events.image(image(2))
    assert [base64.b64decode(data["b64_json"]) for _, data in done] == [b"png 0", b"png 1", b"png 2"]
    completed = ImageGenCompletedEvent.model_validate(done[0][1])
    assert (completed.type, completed.size, completed.output_format) == ("image_generation.completed", "64x96", "png")


def test_the_progress_stream_names_every_event_and_ends_with_done():
    events = ProgressEvents()
    assert events.start() == [("queued", {"type": "queued"})]
    ((name, data),) = events.progress(preview(2, 4, images=2))
    assert name == "progress" and (data["stage"], data["step"], data["total"]) == ("denoise", 2, 4)
    assert [base64.b64decode(b64) for b64 in data["previews"]] == [b"png 0 at 2", b"png 1 at 2"]
    ((name, data),) = events.image(image(0))
    assert name == "image" and (data["index"], data["seed"], data["params"]["width"]) == (0, 7, 64)
    assert events.end() == [("done", {"type": "done", "images": 1})]
    assert sse("done", {"a": 1}) == b'event: done\ndata: {"a":1}\n\n'


# --- through the gateway --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdk(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)


def read_events(response) -> Iterator[tuple[str, dict]]:
    """(name, data) of each server-sent event of an HTTP response, as they arrive."""
    name, data = "message", []
    for raw in response:
        line = raw.decode().rstrip("\n")
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def size_of(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


@pytest.mark.e2e
def test_the_sdk_streams_partial_images_then_completed_images_equal_to_the_plain_answer(sdk):
    options = {"model": "sd-tiny", "prompt": PROMPT, "n": 2, "size": "64x64"}
    extra = {"seed": 21, "num_inference_steps": 6}
    events = list(sdk.images.generate(**options, stream=True, partial_images=2, extra_body=extra))
    plain = sdk.images.generate(**options, response_format="b64_json", extra_body=extra)

    partial = [event for event in events if isinstance(event, ImageGenPartialImageEvent)]
    completed = [event for event in events if isinstance(event, ImageGenCompletedEvent)]
    assert len(partial) + len(completed) == len(events)
    assert [event.partial_image_index for event in partial] == [0, 0, 1, 1]  # two per image, both images each time
    assert all(size_of(event.b64_json) == (8, 8) for event in partial)  # the latent grid of a 64 px image
    assert [event.b64_json for event in completed] == [item.b64_json for item in plain.data]
    assert all(event.size == "64x64" and event.output_format == "png" for event in completed)
    assert events[-2:] == completed


@pytest.mark.e2e
def test_a_stream_without_partial_images_sends_only_the_completed_ones(sdk):
    stream = sdk.images.generate(
        model="sd-tiny", prompt=PROMPT, size="64x64", stream=True, partial_images=0, extra_body={"seed": 2, "num_inference_steps": 2}
    )  # fmt: skip
    assert [event.type for event in stream] == ["image_generation.completed"]


@pytest.mark.e2e
def test_a_stream_that_fails_before_any_event_gets_the_status_of_the_failure(sdk):
    with pytest.raises(openai.BadRequestError) as caught:  # refused by the node: StableDiffusionPipeline has none
        list(
            sdk.images.generate(
                model="sd-tiny", prompt=PROMPT, size="64x64", stream=True, extra_body={"true_cfg_scale": 4.0}
            )
        )
    assert (caught.value.param, caught.value.code) == ("true_cfg_scale", "invalid_request")


@pytest.mark.e2e
def test_the_progress_stream_sends_every_stage_the_previews_and_the_images(gateway):
    body = {"model": "sd-tiny", "prompt": PROMPT, "size": "64x64", "seed": 4, "num_inference_steps": 4, "n": 2}
    request = urllib.request.Request(
        f"{gateway}/v1/images/generations/events",
        data=json.dumps({**body, "preview_every": 1}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = list(read_events(response))
    names = [name for name, _ in events]
    assert names[0] == "queued" and names[-1] == "done" and names.count("image") == 2
    stages = [data["stage"] for name, data in events if name == "progress"]
    assert stages[0] == "encode" and "denoise" in stages and stages[-1] == "decode"
    previews = [data["previews"] for name, data in events if name == "progress" and data["previews"]]
    assert previews and all(len(pair) == 2 and size_of(pair[0]) == (8, 8) for pair in previews)
    images = sorted((data for name, data in events if name == "image"), key=lambda data: data["index"])
    assert [data["seed"] for data in images] == [4, 5] and images[0]["params"]["steps"] == 4
    plain = urllib.request.Request(
        f"{gateway}/v1/images/generations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(plain, timeout=120) as response:
        assert [item["b64_json"] for item in json.loads(response.read())["data"]] == [i["b64_json"] for i in images]


@pytest.mark.e2e
def test_a_stream_whose_client_hangs_up_cancels_the_work(gateway, cluster):
    def in_flight() -> int:
        with cluster.client() as client:
            return client.status().requests_in_flight

    host, port = gateway.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": "sd-tiny", "prompt": PROMPT, "size": "128x128", "num_inference_steps": 200, "preview_every": 1}
    connection.request("POST", "/v1/images/generations/events", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    for name, data in read_events(response):
        if name == "progress" and data["stage"] == "denoise" and data["step"] > 0:
            break
    connection.close()  # hang up long before 200 steps are done
    deadline = time.monotonic() + 10
    while in_flight() != 0:
        assert time.monotonic() < deadline, "the request kept running after the client left"
        time.sleep(0.1)


class FailsMidway:
    """A broker connection serving "m" whose generate reports one step with a preview, then fails."""

    def status(self, timeout: float = 5.0) -> StatusReply:
        return StatusReply(request_id="s", nodes=[{"service": "denoiser", "model": "m", "node": "h:1"}])

    def generate(self, prompt: str, *, on_progress=None, **options) -> list:
        if on_progress is not None:
            on_progress(preview(2, 4))
        raise GenerationError("denoise on h:1 failed: out of memory", code=errors.OUT_OF_MEMORY)

    def close(self) -> None:
        pass


def test_a_failure_after_the_stream_began_is_an_error_event_the_sdk_raises():
    with serving_app(create_app("tcp://unused:1", client_factory=FailsMidway)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        stream = client.images.generate(
            prompt=PROMPT, stream=True, partial_images=1, extra_body={"num_inference_steps": 4}
        )
        first = next(iter(stream))
        assert first.type == "image_generation.partial_image" and base64.b64decode(first.b64_json) == b"png 0 at 2"
        with pytest.raises(openai.APIError, match="out of memory") as caught:
            list(stream)
        assert caught.value.code == "out_of_memory"
