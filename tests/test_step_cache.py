"""Step caches: diffusers' cache hooks per request, equal to diffusers' own enable_cache, reset between batches."""

from __future__ import annotations

import argparse
import io

import pytest
import torch
from PIL import Image

from denoiser_node.handler import DenoiserHandler
from denoiser_node.step_cache import KINDS, StepCache, StepCaches, parse_step_cache
from protocol.errors import RequestError
from protocol.messages import DenoiseJob, Embeddings
from protocol.stages import DECODER, DENOISER, ENCODER
from tests.family_parity import max_difference, pipeline, reference_kwargs, request_spec, stage, wire

PROMPT = "a watercolor of a heron"
OPTIONS = {"height": 64, "width": 64, "guidance": 3.0}
STEPS = 6
# Values that make each kind skip work on the tiny random FLUX (so a cached image differs from the plain one).
CACHES = ["first_block:0.5", "taylorseer:2", "mag:0.5"]


def _config(text: str, steps: int = STEPS):
    cache = parse_step_cache(text)
    assert cache is not None
    return cache.config(steps)


def reference(path, seed: int, config=None) -> Image.Image:
    """diffusers' own pipeline, with ``transformer.enable_cache(config)`` for the run when given."""
    pipe = pipeline(path)
    if config is not None:
        pipe.transformer.enable_cache(config)
    try:
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe(**reference_kwargs(PROMPT, STEPS, OPTIONS), generator=generator).images[0]
    finally:
        if config is not None:
            pipe.transformer.disable_cache()


def denoise(path, handler: DenoiserHandler, **fields) -> tuple[list[Image.Image], torch.Tensor, dict]:
    """One request through the encoder, the wire, ``handler`` (one batch) and the decoder."""
    request = request_spec(path.name, prompt=PROMPT, steps=STEPS, **OPTIONS, **fields)
    encoder, decoder = stage(path, ENCODER), stage(path, DECODER)
    with torch.inference_mode():
        embeds = wire(Embeddings(job_id="e", embeds=encoder.family.encode(encoder.pipe, request))).embeds
        job = wire(DenoiseJob(job_id="d", request_id="r", request=request, embeds=embeds))
        [result] = handler([job], lambda *args, **kwargs: None)
        images = [
            decoder.family.decode(decoder.pipe, result.latents[i : i + 1], result.params)[0]
            for i in range(request.num_images)
        ]
    return images, result.latents, {"step_cache": result.params.step_cache}


@pytest.fixture(scope="module")
def flux(family_checkpoint):
    return family_checkpoint("flux")


# --- the spec -----------------------------------------------------------------------------------------


def test_kinds_and_values_parse_with_defaults():
    assert parse_step_cache("off") is None
    assert parse_step_cache("first_block") == StepCache("first_block", 0.05)
    assert parse_step_cache("first_block:0.1") == StepCache("first_block", 0.1)
    assert parse_step_cache("taylorseer:3") == StepCache("taylorseer", 3)
    assert str(parse_step_cache("mag")) == "mag:0.06"
    config = _config("taylorseer:3")
    assert type(config).__name__ == "TaylorSeerCacheConfig" and config.cache_interval == 3
    mag = _config("mag:0.2", steps=9)
    assert (mag.threshold, mag.num_inference_steps, len(mag.mag_ratios)) == (0.2, 9, 9)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("teacache", "unknown step cache 'teacache'; it is off or one of first_block, taylorseer, mag"),
        ("", "unknown step cache ''"),
        ("first_block:fast", "the threshold of first_block must be a number from 0 to 1 (got 'first_block:fast')"),
        ("first_block:nan", "must be a number from 0 to 1"),
        ("first_block:-0.1", "must be a number from 0 to 1"),
        ("mag:2", "the threshold of mag must be a number from 0 to 1"),
        ("taylorseer:2.5", "the cache_interval of taylorseer must be an integer from 1 to 100"),
        ("taylorseer:0", "must be an integer from 1 to 100"),
    ],
)
def test_an_unknown_kind_or_a_bad_value_is_named(text, message):
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        parse_step_cache(text)
    assert info.value.field == "step_cache"


def test_families_without_hooks_offer_none_and_refuse_a_request_naming_the_field(flux, family_checkpoint):
    assert StepCaches(stage(flux, DENOISER)).kinds() == list(KINDS)
    assert StepCaches(stage(flux, DENOISER), compiled=True).kinds() == []
    sd = stage(family_checkpoint("sd"), DENOISER)
    assert StepCaches(sd).kinds() == []
    with pytest.raises(
        RequestError, match="stable-diffusion's UNet2DConditionModel takes no diffusers cache hooks"
    ) as info:
        StepCaches(sd).resolve(request_spec("sd", prompt=PROMPT, step_cache="first_block:0.1"))
    assert info.value.field == "step_cache"
    assert StepCaches(sd).resolve(request_spec("sd", prompt=PROMPT, step_cache="off")) is None


def test_the_node_flag_is_checked_at_start(flux, family_checkpoint):
    from denoiser_node.main import _step_caches
    from triptych.node_runner import NodeStartError

    args = argparse.Namespace(step_cache="first_block:0.2", compile=None)
    assert _step_caches(stage(flux, DENOISER), args).default == StepCache("first_block", 0.2)
    with pytest.raises(NodeStartError, match="--step-cache: unknown step cache 'nope'"):
        _step_caches(stage(flux, DENOISER), argparse.Namespace(step_cache="nope", compile=None))
    with pytest.raises(NodeStartError, match=r"--step-cache: mag:0\.06 is not available"):
        _step_caches(stage(family_checkpoint("sd"), DENOISER), argparse.Namespace(step_cache="mag", compile=None))


# --- images ---------------------------------------------------------------------------------------------


def test_with_the_cache_off_images_equal_diffusers(flux):
    handler = DenoiserHandler(stage(flux, DENOISER))
    for fields in ({}, {"step_cache": "off"}):
        images, _, params = denoise(flux, handler, seed=3, num_images=2, **fields)
        assert params == {"step_cache": ""}
        for index, image in enumerate(images):
            assert max_difference(image, reference(flux, 3 + index)) <= 1, (fields, index)


@pytest.mark.parametrize("text", CACHES)
def test_with_a_cache_images_equal_diffusers_with_the_same_enable_cache(flux, text):
    handler = DenoiserHandler(stage(flux, DENOISER))
    images, latents, params = denoise(flux, handler, seed=5, step_cache=text)
    assert params == {"step_cache": str(parse_step_cache(text))}
    assert max_difference(images[0], reference(flux, 5, _config(text))) <= 1
    _, plain, _ = denoise(flux, handler, seed=5)
    assert not torch.equal(latents, plain)  # the cache skipped work, so its latents are its own
    assert not stage(flux, DENOISER).pipe.transformer.is_cache_enabled  # the hooks left with the batch


def test_consecutive_batches_see_nothing_of_each_others_cached_states(flux):
    handler = DenoiserHandler(stage(flux, DENOISER))
    first, latents, _ = denoise(flux, handler, seed=7, step_cache="first_block:0.5")
    denoise(flux, handler, seed=11, step_cache="first_block:0.5")  # another prompt's states in between...
    denoise(flux, handler, seed=11, step_cache="taylorseer:2")  # ...and another kind's
    again, repeated, _ = denoise(flux, handler, seed=7, step_cache="first_block:0.5")
    assert torch.equal(latents, repeated) and max_difference(first[0], again[0]) == 0


def test_a_cache_that_fails_mid_run_is_still_reset_and_removed(flux):
    caches = StepCaches(stage(flux, DENOISER))
    transformer = stage(flux, DENOISER).pipe.transformer
    with pytest.raises(RuntimeError, match="stopped"), caches.applied(StepCache("first_block", 0.5), STEPS):
        assert transformer.is_cache_enabled
        raise RuntimeError("stopped")
    assert not transformer.is_cache_enabled


def test_requests_batch_only_with_the_same_step_cache(flux):
    denoiser = stage(flux, DENOISER)
    default = DenoiserHandler(denoiser, step_caches=StepCaches(denoiser, StepCache("first_block", 0.1)))
    embeds = {"prompt_embeds": torch.zeros(1, 8, 32), "pooled_prompt_embeds": torch.zeros(1, 32)}

    def key(handler, **fields):
        request = request_spec(flux.name, prompt=PROMPT, steps=STEPS, **OPTIONS, **fields)
        return handler.batch_key(DenoiseJob(job_id="d", request_id="r", request=request, embeds=embeds))

    assert key(default) == key(default, step_cache="first_block:0.1")  # the node's default, named or not
    assert len({key(default), key(default, step_cache="off"), key(default, step_cache="first_block:0.2")}) == 3
    with pytest.raises(RequestError):  # such a job runs alone and fails naming the field
        key(default, step_cache="first_block:x")


def test_the_nodes_default_applies_to_requests_that_name_none(flux):
    denoiser = stage(flux, DENOISER)
    handler = DenoiserHandler(denoiser, step_caches=StepCaches(denoiser, StepCache("first_block", 0.5)))
    images, _, params = denoise(flux, handler, seed=2)
    assert params == {"step_cache": "first_block:0.5"}
    assert max_difference(images[0], reference(flux, 2, _config("first_block:0.5"))) <= 1
    plain, _, params = denoise(flux, handler, seed=2, step_cache="off")
    assert params == {"step_cache": ""} and max_difference(plain[0], reference(flux, 2)) <= 1


# --- the options that carry it ----------------------------------------------------------------------------


def test_the_http_body_and_the_cli_carry_step_cache():
    from triptych.cli import build_parser
    from triptych.http import ApiError
    from triptych.http.params import parse_generation

    assert parse_generation({"prompt": "p", "step_cache": "first_block:0.1"}).step_cache == "first_block:0.1"
    assert parse_generation({"prompt": "p"}).step_cache is None
    with pytest.raises(ApiError) as info:
        parse_generation({"prompt": "p", "step_cache": 0.1})
    assert (info.value.status, info.value.param) == (400, "step_cache")
    args = build_parser().parse_args(["generate", "p", "--step-cache", "mag:0.1"])
    assert args.step_cache == "mag:0.1"


@pytest.fixture(scope="module")
def cached_cluster(flux, tmp_path_factory):
    """A broker and FLUX nodes whose denoiser caches steps by default (--step-cache first_block:0.5)."""
    from tests.support import ProcessCluster

    cluster = ProcessCluster(tmp_path_factory.mktemp("step-cache-logs"))
    cluster.start_broker()
    try:
        cluster.start_node(ENCODER, flux)
        cluster.start_node(DENOISER, flux, "--step-cache", "first_block:0.5")
        cluster.start_node(DECODER, flux)
        cluster.wait_for({(service, flux.name): 1 for service in (ENCODER, DENOISER, DECODER)})
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.e2e
def test_a_node_with_a_default_cache_serves_it_and_requests_override_it(cached_cluster, flux):
    from triptych.client import GenerationError

    nodes = {node["service"]: node for node in cached_cluster.nodes()}
    info = nodes[DENOISER]["info"]
    assert (info["step_cache"], info["step_caches"]) == ("first_block:0.5", list(KINDS))
    options = {"steps": STEPS, **OPTIONS}
    with cached_cluster.client() as client:
        [default] = client.generate(PROMPT, seed=4, **options)
        [off] = client.generate(PROMPT, seed=4, step_cache="off", **options)
        with pytest.raises(GenerationError, match="unknown step cache 'fast'") as caught:
            client.generate(PROMPT, seed=4, step_cache="fast", **options)
    assert caught.value.field == "step_cache"
    assert default.params["step_cache"] == "first_block:0.5" and off.params["step_cache"] == ""
    expected = reference(flux, 4, _config("first_block:0.5"))
    assert max_difference(Image.open(io.BytesIO(default.png)), expected) <= 1
    assert max_difference(Image.open(io.BytesIO(off.png)), reference(flux, 4)) <= 1
    result = cached_cluster.generate_cli(
        PROMPT, "--steps", "1", "--height", "64", "--width", "64", "--step-cache", "first_block:2"
    )
    assert result.returncode == 1 and "triptych: error: --step-cache: the threshold of first_block" in result.stderr
