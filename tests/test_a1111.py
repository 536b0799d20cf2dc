"""AUTOMATIC1111's API: sampler names and fields in-process, then the ``webuiapi`` client against the
session gateway, with images equal to diffusers' for the same seed and sampler."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from protocol.messages import ProgressEvent, StatusReply
from tests.family_parity import pipeline
from tests.support import serving_app
from triptych.client import GeneratedImage, GenerationCancelled
from triptych.families.samplers import FLOW_SAMPLERS, NOISE_SAMPLERS, SAMPLERS
from triptych.http import ApiError, create_app
from triptych.http.a1111 import parse_txt2img, prompt_loras, sampler_for

PROMPT = "a watercolor of a heron"
NEGATIVE = "blurry"
SD3_SAMPLERS = [*FLOW_SAMPLERS, "flow_heun"]


# --- names and fields -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "schedule", "accepted", "expected"),
    [
        ("Euler a", None, NOISE_SAMPLERS, "euler_a"),
        ("Euler a", "automatic", NOISE_SAMPLERS, "euler_a"),
        ("DPM++ 2M Karras", "Automatic", NOISE_SAMPLERS, "dpmpp_2m_karras"),
        ("DPM++ 2M", "Karras", NOISE_SAMPLERS, "dpmpp_2m_karras"),
        ("DPM++ 2M SDE", "karras", NOISE_SAMPLERS, "dpmpp_2m_sde_karras"),
        ("DPM++ 2M SDE Karras", None, NOISE_SAMPLERS, "dpmpp_2m_sde_karras"),
        ("DDIM", None, NOISE_SAMPLERS, "ddim"),
        ("PLMS", None, NOISE_SAMPLERS, "pndm"),
        ("UniPC", None, NOISE_SAMPLERS, "unipc"),
        ("euler_a", None, NOISE_SAMPLERS, "euler_a"),  # triptych's own names too
        ("Euler", None, SD3_SAMPLERS, "flow_euler"),  # a flow model's Euler is flow-matching Euler
        ("Euler", "Karras", SD3_SAMPLERS, "flow_euler_karras"),
        ("Euler", "Exponential", SD3_SAMPLERS, "flow_euler_exponential"),
        ("Heun", None, SD3_SAMPLERS, "flow_heun"),
        ("", None, NOISE_SAMPLERS, None),  # the checkpoint's own scheduler
        (None, "Karras", NOISE_SAMPLERS, None),
    ],
)
def test_web_ui_sampler_names_map_onto_the_models_samplers(name, schedule, accepted, expected):
    assert sampler_for(name, schedule, list(accepted)) == expected
    assert expected is None or expected in SAMPLERS


@pytest.mark.parametrize(
    ("name", "schedule", "accepted", "param"),
    [
        ("Euler a", None, SD3_SAMPLERS, "sampler_name"),  # no ancestral sampler for flow models
        ("DDIM", "Karras", NOISE_SAMPLERS, "sampler_name"),
        ("Restart", None, NOISE_SAMPLERS, "sampler_name"),
        ("Euler", "SGM Uniform", NOISE_SAMPLERS, "scheduler"),
        ("Euler", None, [], "sampler_name"),  # Sana: only its own scheduler
    ],
)
def test_a_sampler_the_model_lacks_is_a_400_naming_the_field(name, schedule, accepted, param):
    with pytest.raises(ApiError) as caught:
        sampler_for(name, schedule, list(accepted))
    assert (caught.value.status, caught.value.param) == (400, param)


def test_txt2img_fields_map_onto_a_request():
    body = {
        "prompt": PROMPT,
        "negative_prompt": "",
        "seed": 9,
        "batch_size": 2,
        "n_iter": 3,
        "steps": 12,
        "cfg_scale": 6,
        "width": 64,
        "height": 96,
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
        "restore_faces": False,
        "enable_hr": False,
        "alwayson_scripts": {"Something": {"args": []}},  # extension settings are ignored
    }
    params, sampler = parse_txt2img(body, "sd-tiny", list(NOISE_SAMPLERS))
    assert (params.n, params.seed, params.steps, params.guidance) == (6, 9, 12, 6.0)
    assert (params.width, params.height, params.scheduler, params.negative_prompt) == (64, 96, "dpmpp_2m_karras", None)
    assert sampler == "DPM++ 2M" and params.model == "sd-tiny"
    unset, _ = parse_txt2img({"prompt": PROMPT, "seed": -1}, "m", [])
    assert (unset.steps, unset.guidance, unset.width, unset.scheduler, unset.n) == (None, None, None, None, 1)
    assert 0 <= unset.seed < 2**32  # -1: random, and told back in info


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"enable_hr": True}, "enable_hr"),
        ({"restore_faces": True}, "restore_faces"),
        ({"styles": ["cinematic"]}, "styles"),
        ({"subseed_strength": 0.5}, "subseed_strength"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 9, "n_iter": 2}, "batch_size"),
        ({"steps": "20"}, "steps"),
        ({"cfg_scale": True}, "cfg_scale"),
        ({"cfg_scale": -1}, "cfg_scale"),
        ({"width": 60, "height": 64}, "width"),
        ({"seed": -5}, "seed"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "a <lora:ink:strong> fox"}, "prompt"),
        ({"prompt": "<lora:ink> a <lora:ink:0.5> fox"}, "prompt"),
        ({"prompt": "<lora::0.5> a fox"}, "prompt"),
        ({"prompt": "<lora:ink:11> a fox"}, "prompt"),  # past the broker's weight bound
        ({"prompt": "<lora:a/b> a fox"}, "prompt"),  # not an adapter name
    ],
)
def test_a_bad_or_unsupported_txt2img_field_is_named(change, param):
    with pytest.raises(ApiError) as caught:
        parse_txt2img({"prompt": PROMPT, **change}, "m", list(NOISE_SAMPLERS))
    assert (caught.value.status, caught.value.param) == (400, param)


def test_lora_tags_are_taken_out_of_the_prompt_as_the_web_ui_does():
    assert prompt_loras("<lora:ink:0.8>a fox, <lora:dusk.v2> at dusk") == (
        "a fox,  at dusk",
        {"ink": 0.8, "dusk.v2": 1.0},
    )
    assert prompt_loras("a fox <hypernet:x:1>") == ("a fox <hypernet:x:1>", {})  # only LoRA tags
    assert prompt_loras("<lora:ink:-0.5>") == ("", {"ink": -0.5})
    params, _ = parse_txt2img({"prompt": "<lora:ink:0.8> a fox", "negative_prompt": "<lora:x>"}, "m", [])
    assert (params.prompt, params.loras, params.negative_prompt) == (" a fox", {"ink": 0.8}, "<lora:x>")
    with pytest.raises(ApiError, match="names LoRA 'ink' more than once"):
        prompt_loras("<lora:ink> <lora:ink:2>")


# --- routes, in-process -----------------------------------------------------------------------------


class SlowClient:
    """A broker connection serving "m" and "n" whose generate reports steps with previews until cancelled."""

    def status(self, timeout: float = 5.0) -> StatusReply:
        info = {"samplers": list(NOISE_SAMPLERS)}
        nodes = [{"service": "denoiser", "model": name, "node": "h:1", "info": info} for name in ("n", "m")]
        return StatusReply(request_id="s", nodes=nodes)

    def generate(self, prompt: str, *, model: str, num_images: int, seed: int, cancel, on_progress=None, **options):
        for step in range(1, 1000):
            if on_progress is not None:
                on_progress(
                    ProgressEvent(
                        request_id="r", stage="denoise", node="h:1", step=step, total=1000, previews=[b"preview"]
                    )
                )
            if cancel.wait(0.01) or options.get("steps") == 1:
                break
        if cancel.is_set():
            raise GenerationCancelled()
        params = {"width": 8, "height": 8, "steps": 1, "guidance": 7.5, "scheduler": "PNDMScheduler", "model": model}
        return [GeneratedImage(index=i, seed=seed + i, png=b"png", params=params) for i in range(num_images)]

    def close(self) -> None:
        pass


def call(url: str, body: object = None, headers: dict | None = None) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def basic(user: str, key: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


def test_api_keys_apply_to_the_web_ui_routes_as_bearer_or_basic_auth():
    app = create_app("tcp://unused:1", client_factory=SlowClient, api_keys=["sk-one", "sk-two"])
    with serving_app(app) as url:
        assert call(f"{url}/sdapi/v1/sd-models")[0] == 401
        assert call(f"{url}/sdapi/v1/sd-models", headers=basic("me", "sk-wrong"))[0] == 401
        status, models = call(f"{url}/sdapi/v1/sd-models", headers=basic("me", "sk-two"))
        assert status == 200 and [m["title"] for m in models] == ["m", "n"]
        assert call(f"{url}/sdapi/v1/options", headers={"Authorization": "Bearer sk-one"})[0] == 200

        # Each key has its own current model: the first served until its options choose one.
        status, answer = call(f"{url}/sdapi/v1/options", {"sd_model_checkpoint": "n [0123abcd]"}, basic("a", "sk-one"))
        assert (status, answer) == (200, None)
        assert call(f"{url}/sdapi/v1/options", headers=basic("a", "sk-one"))[1]["sd_model_checkpoint"] == "n"
        assert call(f"{url}/sdapi/v1/options", headers=basic("b", "sk-two"))[1]["sd_model_checkpoint"] == "m"
        status, error = call(f"{url}/sdapi/v1/options", {"sd_model_checkpoint": "nope"}, basic("a", "sk-one"))
        assert status == 404 and set(error) == {"error", "detail", "body", "errors"} and "nope" in error["detail"]


def test_progress_follows_the_running_txt2img_and_interrupt_stops_it():
    app = create_app("tcp://unused:1", client_factory=SlowClient)
    with serving_app(app) as url:
        idle = call(f"{url}/sdapi/v1/progress")[1]
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
        outcome: dict = {}
        worker = threading.Thread(
            target=lambda: outcome.update(answer=call(f"{url}/sdapi/v1/txt2img", {"prompt": "p"}))
        )
        worker.start()
        deadline = time.monotonic() + 10
        while (report := call(f"{url}/sdapi/v1/progress")[1])["state"]["sampling_step"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert 0 < report["progress"] < 1 and report["state"]["sampling_steps"] == 1000
        assert base64.b64decode(report["current_image"]) == b"preview"
        assert call(f"{url}/sdapi/v1/progress?skip_current_image=true")[1]["current_image"] is None
        assert call(f"{url}/sdapi/v1/interrupt", {})[0] == 200
        worker.join(timeout=10)
        status, _ = outcome["answer"]
        assert status == 499  # interrupted: nothing to return
        assert call(f"{url}/sdapi/v1/progress")[1]["state"]["interrupted"] is True


def test_txt2img_answers_images_parameters_and_info_as_the_web_ui_does():
    app = create_app("tcp://unused:1", client_factory=SlowClient)
    with serving_app(app) as url:
        body = {
            "prompt": "p",
            "negative_prompt": "q",
            "seed": 3,
            "batch_size": 2,
            "steps": 1,
            "sampler_name": "Euler a",
        }
        status, answer = call(f"{url}/sdapi/v1/txt2img", body)
        assert status == 200 and answer["parameters"] == body
        assert [base64.b64decode(image) for image in answer["images"]] == [b"png", b"png"]
        info = json.loads(answer["info"])
        assert (info["seed"], info["all_seeds"], info["sd_model_name"], info["sampler_name"]) == (
            3,
            [3, 4],
            "m",
            "Euler a",
        )
        assert info["infotexts"][1].startswith(
            "p\nNegative prompt: q\nSteps: 1, Sampler: Euler a, CFG scale: 7.5, Seed: 4"
        )
        status, answer = call(f"{url}/sdapi/v1/txt2img", {**body, "send_images": False})
        assert status == 200 and answer["images"] == []
        status, error = call(f"{url}/sdapi/v1/txt2img", {**body, "enable_hr": True})
        assert status == 400 and "hires fix" in error["detail"]
        samplers = call(f"{url}/sdapi/v1/samplers")[1]
        assert call(f"{url}/sdapi/v1/refresh-loras", {})[0] == 200
        assert {"name": "DPM++ 2M Karras", "aliases": ["dpmpp_2m_karras"], "options": {}} in samplers
        assert call(f"{url}/sdapi/v1/loras")[1] == [] and call(f"{url}/sdapi/v1/scripts")[1] == {
            "txt2img": [],
            "img2img": [],
        }


class AdapterClient(SlowClient):
    """SlowClient whose model "m" has two adapters; generate keeps the options it was asked with."""

    asked: list[dict] = []

    def status(self, timeout: float = 5.0) -> StatusReply:
        info = {"samplers": list(NOISE_SAMPLERS), "loras": ["ink", "dusk.v2"]}
        return StatusReply(request_id="s", nodes=[{"service": "denoiser", "model": "m", "node": "h:1", "info": info}])

    def generate(self, prompt: str, **options):
        self.asked.append({"prompt": prompt, **options})
        return super().generate(prompt, **{**options, "steps": 1})


def test_loras_are_listed_as_the_web_ui_lists_them_and_prompt_tags_reach_the_request():
    with serving_app(create_app("tcp://unused:1", client_factory=AdapterClient)) as url:
        assert call(f"{url}/sdapi/v1/loras")[1] == [
            {"name": "dusk.v2", "alias": "dusk.v2", "path": "dusk.v2.safetensors", "metadata": {}},
            {"name": "ink", "alias": "ink", "path": "ink.safetensors", "metadata": {}},
        ]
        status, answer = call(f"{url}/sdapi/v1/txt2img", {"prompt": "a fox <lora:ink:0.5>", "seed": 1})
        assert status == 200
        assert json.loads(answer["info"])["prompt"] == "a fox <lora:ink:0.5>"  # as sent, as the web UI reports it
        asked = AdapterClient.asked[-1]
        assert (asked["prompt"], asked["loras"]) == ("a fox ", {"ink": 0.5})
        status, error = call(f"{url}/sdapi/v1/txt2img", {"prompt": "<lora:ink:x> a fox"})
        assert status == 400 and "<lora:ink:x>" in error["detail"]


# --- through the cluster, with the webuiapi client ---------------------------------------------------


def _diffusers_euler_a(path, seed: int, **kwargs) -> Image.Image:
    """diffusers' own pipeline with Euler a swapped in as its users do, then put back."""
    from diffusers import EulerAncestralDiscreteScheduler

    pipe = pipeline(path)
    original = pipe.scheduler
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(original.config)
    try:
        return pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    finally:
        pipe.scheduler = original


def difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a.convert("RGB"), np.int16) - np.asarray(b.convert("RGB"), np.int16)).max())


@pytest.mark.e2e
def test_webuiapi_txt2img_gives_diffusers_images_for_the_same_seed_and_sampler(gateway, checkpoints):
    import webuiapi

    host, port = gateway.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))  # its defaults: sampler "Euler a", 20 steps
    api.util_set_model("sd-tiny")
    assert api.util_get_current_model() == "sd-tiny"
    result = api.txt2img(
        prompt=PROMPT, negative_prompt=NEGATIVE, seed=5, steps=4, cfg_scale=6.5, width=64, height=96, batch_size=2
    )
    assert result.info["all_seeds"] == [5, 6] and result.info["sampler_name"] == "Euler a"
    assert len(result.images) == 2
    for index, got in enumerate(result.images):
        expected = _diffusers_euler_a(
            checkpoints["sd-tiny"],
            5 + index,
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=4,
            guidance_scale=6.5,
            height=96,
            width=64,
        )
        assert got.size == (64, 96) and difference(got, expected) <= 1, f"image {index}"
    assert "sd-tiny" in [model["title"] for model in api.get_sd_models()]
    assert "Euler a" in [sampler["name"] for sampler in api.get_samplers()]


@pytest.mark.e2e
def test_webuiapi_img2img_gives_diffusers_img2img_for_the_same_seed(gateway, checkpoints):
    import webuiapi
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionImg2ImgPipeline

    from tests.test_images_in import init_image

    host, port = gateway.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    api.util_set_model("sd-tiny")
    image = init_image()
    result = api.img2img(images=[image], prompt=PROMPT, seed=3, steps=5, cfg_scale=6.0, denoising_strength=0.6)
    assert len(result.images) == 1 and result.info["all_seeds"] == [3]
    pipe = StableDiffusionImg2ImgPipeline.from_pipe(pipeline(checkpoints["sd-tiny"]))
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)  # webuiapi's "Euler a"
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": PROMPT, "image": image, "num_inference_steps": 5, "guidance_scale": 6.0, "strength": 0.6}
    expected = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert result.images[0].size == image.size and difference(result.images[0], expected) <= 1
