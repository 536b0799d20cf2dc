"""The OpenAI-compatible gateway: field checks and error mapping in-process, then the official
``openai`` client against a gateway process in front of the test cluster."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import io
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import anyio
import openai
import pytest
from PIL import Image

from decoder_node.png import read_metadata
from protocol import errors
from protocol.messages import StatusReply
from protocol.validation import MAX_GUIDANCE
from tests.support import ROOT, free_port, max_pixel_difference, metric, scrape
from triptych.client import BROKER_UNAVAILABLE, GeneratedImage, GenerationCancelled, GenerationError
from triptych.http import (
    MAX_BODY_BYTES,
    STATUSES,
    ApiError,
    ClientPool,
    ImageStore,
    ModelCatalog,
    create_app,
    error_from_failure,
    parse_generation,
    read_api_keys,
)
from triptych.http.admission import TakeTurns
from triptych.http.connections import server_config

PROMPT = "a red fox in the snow, photo"
NEGATIVE = "blurry, low quality"


# --- in-process -------------------------------------------------------------------------------


def bad_param(body: dict) -> str | None:
    with pytest.raises(ApiError) as caught:
        parse_generation(body)
    assert caught.value.status == 400
    return caught.value.param


def failure(message: str, code: str, field: str | None = None) -> GenerationError:
    return GenerationError(message, code=code, field=field)


def test_fields_map_onto_a_request():
    params = parse_generation(
        {"prompt": "p", "model": "m", "n": 3, "size": "64x96", "seed": 7, "num_inference_steps": 4, "guidance_scale": 5}
    )
    assert (params.width, params.height, params.n, params.seed, params.steps) == (64, 96, 3, 7, 4)
    assert params.guidance == 5.0 and params.true_cfg is None and params.response_format == "b64_json"
    defaults = parse_generation({"prompt": "p", "size": "auto", "quality": "hd", "user": "someone"})  # others ignored
    assert (defaults.model, defaults.n, defaults.width, defaults.seed, defaults.steps) == ("", 1, None, None, None)
    assert (defaults.guidance, defaults.true_cfg) == (None, None)


def test_true_cfg_scale_is_its_own_option():
    params = parse_generation({"prompt": "p", "guidance_scale": 3.5, "true_cfg_scale": 4})
    assert (params.guidance, params.true_cfg) == (3.5, 4.0) and isinstance(params.true_cfg, float)
    assert parse_generation({"prompt": "p", "true_cfg_scale": 0}).true_cfg == 0.0
    assert parse_generation({"prompt": "p", "true_cfg_scale": MAX_GUIDANCE}).true_cfg == MAX_GUIDANCE


@pytest.mark.parametrize("name", ["guidance_scale", "true_cfg_scale"])
@pytest.mark.parametrize("value", [-0.5, MAX_GUIDANCE + 1, float("nan"), float("inf"), "high", True, [1]])
def test_a_guidance_scale_must_be_a_finite_number_in_range(name, value):
    with pytest.raises(ApiError) as caught:
        parse_generation({"prompt": "p", name: value})
    assert (caught.value.status, caught.value.param) == (400, name)
    assert caught.value.message.startswith(f"{name} must be")


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"prompt": None}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"n": "2"}, "n"),
        ({"n": True}, "n"),
        ({"size": "64"}, "size"),
        ({"size": "64x96x2"}, "size"),
        ({"size": "60x96"}, "size"),  # not a multiple of 8
        ({"size": "8192x8192"}, "size"),  # too many pixels
        ({"response_format": "gif"}, "response_format"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": "high"}, "guidance_scale"),
        ({"true_cfg_scale": -1}, "true_cfg_scale"),
        ({"negative_prompt": ["a"]}, "negative_prompt"),
        ({"user": 7}, "user"),
        ({"user": "u" * 257}, "user"),
        ({"model": 3}, "model"),
        ({"prompt": "x" * 10_001}, "prompt"),  # the broker's own bound, named here too
    ],
)
def test_a_bad_field_is_named(change, param):
    assert bad_param({"prompt": "p", **change}) == param


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (errors.INVALID_REQUEST, 400),
        (errors.UNKNOWN_MODEL, 404),
        (errors.CANCELLED, 499),
        (errors.MODEL_ERROR, 500),
        (errors.NO_NODE, 503),
        (errors.BUSY, 503),
        (errors.OUT_OF_MEMORY, 503),
        (BROKER_UNAVAILABLE, 503),
        (errors.TIMEOUT, 504),
        ("a_code_from_a_newer_broker", 500),
    ],
)
def test_each_failure_code_has_its_status(code, status):
    error = error_from_failure(failure("it failed", code))
    assert error.status == status
    assert error.kind == ("invalid_request_error" if status < 500 else "server_error")
    if code != errors.CANCELLED:
        assert error.message == "it failed"


def test_every_protocol_code_is_mapped():
    assert set(errors.CODES) | {BROKER_UNAVAILABLE} == set(STATUSES)


@pytest.mark.parametrize(
    ("field", "param"),
    [
        ("height", "size"),
        ("width", "size"),
        ("num_images", "n"),
        ("steps", "num_inference_steps"),
        ("guidance", "guidance_scale"),
        ("true_cfg", "true_cfg_scale"),
        ("prompt", "prompt"),
        ("negative_prompt", "negative_prompt"),
        ("seed", "seed"),
        ("model", "model"),
        (None, None),
    ],
)
def test_an_invalid_request_names_the_body_field(field, param):
    error = error_from_failure(failure("height must be a multiple of 16 (got 200)", errors.INVALID_REQUEST, field))
    assert (error.status, error.param, error.code) == (400, param, errors.INVALID_REQUEST)


def test_failure_codes_come_back_in_the_body():
    unknown = error_from_failure(failure("no node serves model x", errors.UNKNOWN_MODEL, "model"))
    assert (unknown.status, unknown.param, unknown.code) == (404, "model", "model_not_found")  # OpenAI's code
    busy = error_from_failure(failure("broker busy", errors.BUSY, "model"))
    assert (busy.param, busy.code) == (None, errors.BUSY)  # param names a field to fix: 4xx only
    cancelled = error_from_failure(GenerationCancelled())
    assert (cancelled.status, cancelled.code) == (499, errors.CANCELLED)
    assert error_from_failure(RuntimeError("no code at all")).code == errors.MODEL_ERROR


def test_the_text_of_a_failure_decides_nothing():
    error = error_from_failure(failure("timed out after 300s: no denoiser node serves it, busy", errors.MODEL_ERROR))
    assert (error.status, error.code) == (500, errors.MODEL_ERROR)


def test_a_model_is_named_when_several_are_served():
    class TwoModels:
        def status(self) -> StatusReply:
            nodes = [{"service": "denoiser", "model": name, "node": "h:1"} for name in ("b", "a")]
            return StatusReply(request_id="s", nodes=nodes)

        def close(self) -> None:
            pass

    async def call(fn):
        return fn()

    catalog = ModelCatalog(ClientPool(TwoModels), call)
    assert anyio.run(catalog.resolve, "b") == "b"
    for model, status, code, says in [("", 400, "invalid_value", "(a, b)"), ("c", 404, "model_not_found", "a, b")]:
        with pytest.raises(ApiError) as caught:
            anyio.run(catalog.resolve, model)
        assert (caught.value.status, caught.value.param, caught.value.code) == (status, "model", code)
        assert says in caught.value.message


def test_the_gateway_loads_no_model_library():
    code = "import sys, triptych.http; print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_image_store_keeps_the_newest_within_its_budget():
    store = ImageStore(max_bytes=10, ttl=60)
    first, second = store.put(b"12345"), store.put(b"67890")
    assert store.get(first) == b"12345"
    third = store.put(b"abc")
    assert store.get(first) is None and store.get(second) == b"67890" and store.get(third) == b"abc"
    assert store.get("nope") is None
    expiring = ImageStore(ttl=0)
    assert expiring.get(expiring.put(b"x")) is None


class FakeClient:
    """Stands in for a broker connection: serves model "m"; ``outcome`` decides what generate does."""

    outcome: GenerationError | None = None
    users: list[str] = []  # the user each generate call named
    options: list[dict] = []  # the other options of each generate call

    def status(self, timeout: float = 5.0) -> StatusReply:
        return StatusReply(request_id="s", nodes=[{"service": "denoiser", "model": "m", "node": "h:1"}])

    def generate(self, prompt: str, *, model: str, num_images: int, seed: int | None, **options) -> list:
        FakeClient.users.append(options.pop("user", ""))
        FakeClient.options.append(options)
        if FakeClient.outcome is not None:
            raise FakeClient.outcome
        return [GeneratedImage(index=i, seed=(seed or 0) + i, png=f"{model}:{i}".encode()) for i in range(num_images)]

    def close(self) -> None:
        pass


@contextlib.contextmanager
def in_process(app, **options) -> Iterator[str]:
    """``app`` on uvicorn in this process, configured as ``triptych http`` runs it; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, log_level="warning", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def fake_gateway() -> Iterator[str]:
    """The app with FakeClient for a broker."""
    with in_process(create_app("tcp://unused:1", client_factory=FakeClient)) as url:
        yield url


def post(url: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize(
    ("error", "status", "param", "code"),
    [
        (failure("timed out after 300s", errors.TIMEOUT), 504, None, "timeout"),
        (failure("no decoder node serves model m", errors.NO_NODE), 503, None, "no_node"),
        (failure("broker busy (1000 requests in flight), retry later", errors.BUSY), 503, None, "busy"),
        (failure("denoiser h:1 ran out of GPU memory", errors.OUT_OF_MEMORY), 503, None, "out_of_memory"),
        (failure("decoder h:1 failed: RuntimeError: boom", errors.MODEL_ERROR), 500, None, "model_error"),
        (
            failure("height must be a multiple of 16 for m (got 200)", errors.INVALID_REQUEST, "height"),
            400,
            "size",
            "invalid_request",
        ),
        (
            failure("m has no true_cfg_scale", errors.INVALID_REQUEST, "true_cfg"),
            400,
            "true_cfg_scale",
            "invalid_request",
        ),
    ],
)
def test_a_failed_request_comes_back_in_openai_shape(fake_gateway, error, status, param, code):
    FakeClient.outcome = error
    try:
        got, body = post(f"{fake_gateway}/v1/images/generations", {"prompt": "p", "model": "m"})
    finally:
        FakeClient.outcome = None
    assert got == status
    kind = "invalid_request_error" if status < 500 else "server_error"
    assert body == {"error": {"message": str(error), "type": kind, "param": param, "code": code}}


def test_guidance_options_reach_the_client_as_named(fake_gateway):
    FakeClient.options.clear()
    body = {"prompt": "p", "guidance_scale": 3.5, "true_cfg_scale": 4.0, "num_inference_steps": 8}
    status, _ = post(f"{fake_gateway}/v1/images/generations", body)
    assert status == 200
    (options,) = FakeClient.options
    assert (options["guidance"], options["true_cfg"], options["steps"]) == (3.5, 4.0, 8)
    status, answer = post(f"{fake_gateway}/v1/images/generations", {"prompt": "p", "true_cfg_scale": -1})
    assert (status, answer["error"]["param"]) == (400, "true_cfg_scale")
    assert len(FakeClient.options) == 1  # refused before any broker call


def test_the_only_model_is_used_when_none_is_named(fake_gateway):
    FakeClient.users.clear()
    status, body = post(f"{fake_gateway}/v1/images/generations", {"prompt": "p", "n": 2, "seed": 1})
    assert status == 200 and set(body) == {"created", "data"}
    assert FakeClient.users == ["http"]  # without keys the gateway's requests share one turn
    assert [base64.b64decode(item["b64_json"]) for item in body["data"]] == [b"m:0", b"m:1"]


def test_malformed_bodies_and_unknown_paths_get_openai_errors(fake_gateway):
    status, body = post(f"{fake_gateway}/v1/images/generations", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = post(f"{fake_gateway}/v1/images/generations", b"x" * (MAX_BODY_BYTES + 1))
    assert status == 413
    status, body = post(f"{fake_gateway}/v1/nothing", {})
    assert status == 404 and body["error"]["type"] == "invalid_request_error"


def test_api_keys_guard_every_route_but_the_image_files(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# one key per line\n\nsk-first\n  sk-second  \n")
    assert read_api_keys(keys) == ["sk-first", "sk-second"]
    app = create_app("tcp://unused:1", client_factory=FakeClient, api_keys=read_api_keys(keys))
    body = {"prompt": "p", "response_format": "url"}
    with in_process(app) as url:
        status, answer = post(f"{url}/v1/images/generations", body)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert "Authorization: Bearer" in answer["error"]["message"]
        status, answer = post(f"{url}/v1/images/generations", body, {"Authorization": "Bearer sk-wrong"})
        assert (status, answer["error"]["message"]) == (401, "incorrect API key")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/v1/models", timeout=10)
        assert refused.value.code == 401

        FakeClient.users.clear()
        status, answer = post(f"{url}/v1/images/generations", body, {"Authorization": "Bearer sk-second"})
        assert status == 200
        status, _ = post(
            f"{url}/v1/images/generations", {**body, "user": "alice"}, {"Authorization": "Bearer sk-first"}
        )
        assert status == 200
        alice = hashlib.sha256(b"alice").hexdigest()[:16]
        assert FakeClient.users == ["key2", f"key1/{alice}"]  # turns per key and user; the key itself never travels
        with urllib.request.urlopen(answer["data"][0]["url"], timeout=10) as response:  # no key: the URL is the key
            assert response.read() == b"m:0"
        models = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": "bearer sk-first"})
        with urllib.request.urlopen(models, timeout=10) as response:
            assert [card["id"] for card in json.loads(response.read())["data"]] == ["m"]


def test_an_api_key_file_without_keys_is_refused(tmp_path):
    empty = tmp_path / "keys"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="holds no API key"):
        read_api_keys(empty)
    result = subprocess.run(
        [sys.executable, "-m", "triptych", "http", "--api-keys", str(empty)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "holds no API key" in result.stderr


# --- through a gateway process --------------------------------------------------------------


@pytest.fixture(scope="module")
def sdk(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.e2e
def test_openai_client_gets_diffusers_images(sdk, checkpoints, reference):
    result = sdk.images.generate(
        model="sd-tiny",
        prompt=PROMPT,
        n=2,
        size="64x96",
        response_format="b64_json",
        extra_body={"seed": 5, "num_inference_steps": 4, "guidance_scale": 6.5, "negative_prompt": NEGATIVE},
    )
    assert abs(result.created - time.time()) < 120
    assert len(result.data) == 2
    for i, image in enumerate(result.data):
        png = base64.b64decode(image.b64_json)
        expected = reference(
            checkpoints["sd-tiny"],
            5 + i,  # image i uses seed + i
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=4,
            guidance_scale=6.5,
            height=96,
            width=64,
        )
        assert max_pixel_difference(png, expected) <= 1
        assert read_metadata(png)["seed"] == str(5 + i)


@pytest.mark.e2e
def test_models_lists_the_served_models(sdk):
    models = {model.id: model for model in sdk.models.list()}
    assert {"sd-tiny", "pixart-tiny"} <= set(models)
    assert all(m.object == "model" and m.owned_by == "triptych" for m in models.values())
    assert sdk.models.retrieve("pixart-tiny").id == "pixart-tiny"


@pytest.mark.e2e
@pytest.mark.parametrize(("change", "param"), [({"size": "64by96"}, "size"), ({"n": 0}, "n")])
def test_a_bad_field_is_a_400_naming_it(sdk, change, param):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.images.generate(**{"model": "sd-tiny", "prompt": PROMPT, **change})
    assert caught.value.status_code == 400
    assert caught.value.param == param and param in caught.value.message
    assert caught.value.type == "invalid_request_error"


@pytest.mark.e2e
def test_an_option_the_pipeline_lacks_is_a_400_naming_it(sdk):
    with pytest.raises(openai.BadRequestError) as caught:  # refused by the node: StableDiffusionPipeline has none
        sdk.images.generate(model="sd-tiny", prompt=PROMPT, size="64x64", extra_body={"true_cfg_scale": 4.0})
    assert (caught.value.param, caught.value.code) == ("true_cfg_scale", "invalid_request")


@pytest.mark.e2e
def test_an_unknown_model_is_a_404(sdk):
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.images.generate(model="dall-e-3", prompt=PROMPT)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("dall-e-3")


@pytest.mark.e2e
def test_url_response_format_serves_the_png(sdk):
    result = sdk.images.generate(
        model="sd-tiny",
        prompt=PROMPT,
        size="64x64",
        response_format="url",
        extra_body={"seed": 3, "num_inference_steps": 2},
    )
    (image,) = result.data
    assert image.b64_json is None
    with urllib.request.urlopen(image.url, timeout=10) as response:
        assert response.headers["Content-Type"] == "image/png"
        png = response.read()
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    assert read_metadata(png)["seed"] == "3"
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(image.url.replace(".png", "x.png"), timeout=10)
    assert caught.value.code == 404 and json.loads(caught.value.read())["error"]["code"] == "file_not_found"


@pytest.mark.e2e
def test_a_client_that_hangs_up_cancels_the_work(gateway, cluster):
    def in_flight() -> int:
        with cluster.client() as client:
            return client.status().requests_in_flight

    cancelled = metric(scrape(cluster.metrics_port), "triptych_requests_total", model="sd-tiny", outcome="cancelled")
    host, port = gateway.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": "sd-tiny", "prompt": PROMPT, "size": "512x512", "num_inference_steps": 200}
    connection.request("POST", "/v1/images/generations", json.dumps(body), {"Content-Type": "application/json"})
    deadline = time.monotonic() + 20
    while in_flight() == 0:
        assert time.monotonic() < deadline, "the request never reached the broker"
        time.sleep(0.1)
    connection.close()  # hang up long before 200 steps at 512 x 512 are done
    deadline = time.monotonic() + 10
    while in_flight() != 0:
        assert time.monotonic() < deadline, "the request kept running after the client left"
        time.sleep(0.1)
    after = metric(scrape(cluster.metrics_port), "triptych_requests_total", model="sd-tiny", outcome="cancelled")
    assert after == cancelled + 1


def test_a_scheduler_field_reaches_the_client_and_is_checked():
    from triptych.http import parse_generation

    assert parse_generation({"prompt": "p", "scheduler": "euler_a"}).scheduler == "euler_a"
    assert parse_generation({"prompt": "p"}).scheduler is None
    with pytest.raises(ApiError) as info:
        parse_generation({"prompt": "p", "scheduler": 3})
    assert (info.value.status, info.value.param) == (400, "scheduler")


@pytest.mark.e2e
def test_a_model_card_lists_the_samplers_its_denoiser_accepts(gateway):
    with urllib.request.urlopen(f"{gateway}/v1/models/sd-tiny", timeout=30) as response:
        card = json.loads(response.read())
    assert card["id"] == "sd-tiny" and "euler_a" in card["samplers"] and "flow_euler" not in card["samplers"]


# --- slow clients and greedy keys -------------------------------------------------------------


def test_half_open_connections_do_not_stop_the_models_route_and_are_closed_in_time():
    import socket

    app = create_app("tcp://unused:1", client_factory=FakeClient, body_timeout=1.0)
    with in_process(app, header_timeout=1.0) as url:
        host, port = url.removeprefix("http://").split(":")
        stalled = []
        for i in range(200):
            sock = socket.create_connection((host, int(port)))
            if i % 2:  # a head, and a body that never comes
                body = b'{"prompt": "p"'
                head = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                sock.sendall(head + body)
            else:  # a head that never ends
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
            stalled.append(sock)
        started = time.monotonic()
        with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
            assert [card["id"] for card in json.loads(response.read())["data"]] == ["m"]
        assert time.monotonic() - started < 2

        deadline = time.monotonic() + 6  # each is dropped about a second after it stalled
        answers = []
        for sock in stalled:
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            received = b""
            while chunk := sock.recv(65536):  # a timeout here (the server kept it) fails the test
                received += chunk
            answers.append(received.split(b"\r\n", 1)[0])
            sock.close()
        assert set(answers[0::2]) == {b""}  # closed without a word: no request ever came
        assert set(answers[1::2]) == {b"HTTP/1.1 408 Request Timeout"}


def test_generation_slots_go_to_api_keys_in_turns():
    order: list[str] = []

    async def main() -> None:
        turns = TakeTurns(slots=1)
        gate = anyio.Event()

        async def call(tenant: str, name: str) -> None:
            async with turns.turn(tenant):
                order.append(name)
                await gate.wait()

        async with anyio.create_task_group() as tasks:
            for name in ("a0", "a1", "a2", "a3"):  # key a sends four, then key b one
                tasks.start_soon(call, "a", name)
                await anyio.sleep(0.01)
            tasks.start_soon(call, "b", "b0")
            await anyio.sleep(0.01)
            assert (order, turns.waiting()) == (["a0"], 4)
            gate.set()

    anyio.run(main)
    assert order == ["a0", "a1", "b0", "a2", "a3"]  # b's first waits for one of a's, not for all of them


def test_a_caller_that_gives_up_waiting_passes_its_turn_on():
    order: list[str] = []

    async def main() -> None:
        turns = TakeTurns(slots=1)
        release = anyio.Event()

        async def call(tenant: str, name: str) -> None:
            async with turns.turn(tenant):
                order.append(name)
                await release.wait()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(call, "a", "a0")
            await anyio.sleep(0.01)
            with anyio.move_on_after(0.05):  # b's client leaves before its turn comes
                await call("b", "b0")
            tasks.start_soon(call, "c", "c0")
            await anyio.sleep(0.01)
            release.set()

    anyio.run(main)
    assert order == ["a0", "c0"]
