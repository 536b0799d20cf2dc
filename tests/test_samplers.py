"""Samplers: each name runs the same scheduler swap diffusers users make, with the same images."""

from __future__ import annotations

import pytest
import torch

from protocol.errors import RequestError
from protocol.stages import DENOISER
from tests.family_parity import max_difference, pipeline, reference_kwargs, request_spec, split_run, stage
from triptych.families.samplers import FLOW_SAMPLERS, NOISE_SAMPLERS, SAMPLERS

PROMPT = "a watercolor of a heron"


def _reference(path, name: str, seed: int, options: dict, steps: int):
    """diffusers with its scheduler swapped as the name says, then put back."""
    pipe = pipeline(path)
    original = pipe.scheduler
    sampler = SAMPLERS[name]
    import diffusers

    pipe.scheduler = getattr(diffusers, sampler.scheduler).from_config(original.config, **sampler.overrides)
    try:
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe(**reference_kwargs(PROMPT, steps, options), generator=generator).images[0]
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("name", NOISE_SAMPLERS)
def test_each_sampler_on_sd_equals_diffusers_with_the_same_swap(family_checkpoint, name):
    path = family_checkpoint("sd")
    options = {"height": 64, "width": 64, "guidance": 6.0, "negative_prompt": "blurry"}
    request = request_spec(path.name, prompt=PROMPT, steps=4, seed=3, num_images=2, scheduler=name, **options)
    images = split_run(path, request)
    for index, image in enumerate(images):
        assert max_difference(image, _reference(path, name, 3 + index, options, steps=4)) <= 1, f"image {index}"


@pytest.mark.parametrize("name", FLOW_SAMPLERS)
def test_each_flow_sampler_on_flux_equals_diffusers_with_the_same_swap(family_checkpoint, name):
    path = family_checkpoint("flux")
    options = {"height": 64, "width": 64, "guidance": 3.0}
    request = request_spec(path.name, prompt=PROMPT, steps=3, seed=5, scheduler=name, **options)
    (image,) = split_run(path, request)
    assert max_difference(image, _reference(path, name, 5, options, steps=3)) <= 1


def test_a_sampler_changes_the_image(family_checkpoint):
    path = family_checkpoint("sd")
    plain = split_run(path, request_spec(path.name, prompt=PROMPT, steps=4, seed=3, height=64, width=64))
    swapped = split_run(
        path, request_spec(path.name, prompt=PROMPT, steps=4, seed=3, height=64, width=64, scheduler="euler_a")
    )
    assert max_difference(plain[0], swapped[0]) > 1


def test_an_unknown_sampler_is_refused_with_the_list(family_checkpoint):
    denoiser = stage(family_checkpoint("flux"), DENOISER)
    with pytest.raises(RequestError, match=r"unknown scheduler 'euler_a' for flux; it accepts flow_euler") as info:
        denoiser.family.resolve_params(denoiser.pipe, request_spec("flux", prompt=PROMPT, scheduler="euler_a"))
    assert info.value.field == "scheduler"


def test_qwenimage_requests_with_different_samplers_batch_apart(family_checkpoint):
    """Qwen-Image keys batches without the prompt length; the sampler still keeps them apart."""
    denoiser = stage(family_checkpoint("qwenimage"), DENOISER)
    family, pipe = denoiser.family, denoiser.pipe
    embeds = {"prompt_embeds": torch.zeros(1, 7, 16), "prompt_embeds_mask": torch.ones(1, 7, dtype=torch.long)}
    names = (None, "flow_euler", "flow_euler_karras")
    keys = {family.batch_key(pipe, embeds, request_spec("qwenimage", prompt=PROMPT, scheduler=n)) for n in names}
    assert len(keys) == 3


def test_requests_with_different_samplers_batch_apart_and_the_checkpoint_scheduler_stays(family_checkpoint):
    denoiser = stage(family_checkpoint("sd"), DENOISER)
    family, pipe = denoiser.family, denoiser.pipe
    embeds = {"prompt_embeds": torch.zeros(1, 77, 32)}
    keys = {
        family.batch_key(pipe, embeds, request_spec("sd", prompt=PROMPT, scheduler=name))
        for name in (None, "ddim", "euler")
    }
    assert len(keys) == 3
    before = type(pipe.scheduler)
    request = request_spec("sd", prompt=PROMPT, steps=2, seed=1, height=64, width=64, guidance=1.0, scheduler="lms")
    embeds = {"prompt_embeds": torch.zeros(1, 77, pipe.unet.config.cross_attention_dim)}
    with torch.inference_mode():
        [(_, params)] = family.denoise(pipe, [(embeds, request)], lambda step, total: None)
    assert params.scheduler == "lms" and type(pipe.scheduler) is before
    unset = family.resolve_params(pipe, request_spec("sd", prompt=PROMPT))
    assert unset.scheduler == before.__name__  # the PNG says which scheduler ran
