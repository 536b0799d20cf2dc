"""Parity for the families with LLM text encoders: Sana, FLUX.2 dev and klein, Qwen-Image, Z-Image.

Each family's guidance maps to the same diffusers argument here as in its module (see the
docstrings in triptych/families/).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protocol.stages import DECODER, DENOISER, ENCODER
from tests.family_parity import (
    max_difference,
    pipeline,
    reference_kwargs,
    reference_run,
    request_spec,
    split_run,
    stage,
    wire,
)

PROMPT = "a watercolor of a heron"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny models gain nothing from intra-op threads, and spinning ones cost many times
    the work itself when the CPU is shared (40-layer encoders over 512 tokens, 32 wide)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# tiny family -> the request's options: non-square sizes, and a negative prompt where it is used
CASES = {
    "sana": {"height": 256, "width": 192, "guidance": 4.0, "negative_prompt": "blurry"},
    "flux2": {"height": 64, "width": 96, "guidance": 2.5},  # guidance-distilled: no negative prompt
    "flux2-klein": {"height": 96, "width": 64, "guidance": 4.0},  # diffusers' klein fixes the negative at ""
    "qwenimage": {"height": 64, "width": 96, "true_cfg": 4.0, "negative_prompt": "blurry"},
    "zimage": {"height": 96, "width": 64, "guidance": 4.0, "negative_prompt": "blurry"},
}
# The same families the other way round: a negative prompt where there was none, none where there was one.
OTHER_WAY = {
    "sana": {"height": 192, "width": 256, "guidance": 4.0},
    "qwenimage": {"height": 96, "width": 64, "true_cfg": 4.0},  # no negative prompt: no true CFG runs
    "zimage": {"height": 64, "width": 96, "guidance": 4.0},
}


def _reference_kwargs(family: str, options: dict) -> dict:
    return reference_kwargs(PROMPT, 3, options)


def _assert_matches(path: Path, images: list, seed: int, **kwargs) -> None:
    assert len(images) == 2
    for index, image in enumerate(images):
        expected = reference_run(path, seed + index, **kwargs)
        assert max_difference(image, expected) <= 1, f"image {index}"


@pytest.mark.parametrize("family", list(CASES))
def test_split_equals_diffusers(family_checkpoint, family):
    path = family_checkpoint(family)
    options = CASES[family]
    request = request_spec(path.name, prompt=PROMPT, steps=3, seed=21, num_images=2, **options)
    _assert_matches(path, split_run(path, request), 21, **_reference_kwargs(family, options))


@pytest.mark.parametrize("family", list(OTHER_WAY))
def test_split_equals_diffusers_the_other_way_round(family_checkpoint, family):
    path = family_checkpoint(family)
    options = OTHER_WAY[family]
    request = request_spec(path.name, prompt=PROMPT, steps=3, seed=11, num_images=2, **options)
    _assert_matches(path, split_run(path, request), 11, **_reference_kwargs(family, options))


def test_flux2_negative_prompt_is_ignored_as_by_its_pipeline(family_checkpoint):
    """Flux2Pipeline takes no negative prompt: the image is made without one, and the client is told."""
    path = family_checkpoint("flux2")
    options = {"height": 64, "width": 64, "guidance": 2.5}
    request = request_spec(path.name, prompt=PROMPT, steps=2, seed=2, num_images=2, negative_prompt="blurry", **options)
    denoiser = stage(path, DENOISER)
    [warning] = denoiser.family.warnings(denoiser.pipe, request)
    assert "negative prompt is ignored" in warning
    _assert_matches(path, split_run(path, request), 2, **reference_kwargs(PROMPT, 2, options))


def test_flux2_klein_negative_prompt(family_checkpoint):
    """klein's negative prompt is what diffusers does given that prompt's embeddings as the negative."""
    path = family_checkpoint("flux2-klein")
    options = {"height": 64, "width": 96, "guidance": 3.0, "negative_prompt": "blurry"}
    request = request_spec(path.name, prompt=PROMPT, steps=3, seed=5, num_images=2, **options)
    pipe = pipeline(path)
    with torch.inference_mode():
        negative, _ = pipe.encode_prompt("blurry", device=pipe.device)
    _assert_matches(
        path,
        split_run(path, request),
        5,
        prompt=PROMPT,
        negative_prompt_embeds=negative,
        num_inference_steps=3,
        guidance_scale=3.0,
        height=64,
        width=96,
    )


# family -> (request options that turn guidance off, the same for diffusers)
UNGUIDED = {
    "qwenimage": ({"true_cfg": 4.0}, {"true_cfg_scale": 4.0}),  # no negative prompt, no true CFG
    "zimage": ({"guidance": 0.0, "negative_prompt": "blurry"}, {"guidance_scale": 0.0, "negative_prompt": "blurry"}),
    "sana": ({"guidance": 1.0}, {"guidance_scale": 1.0}),
}


@pytest.mark.parametrize("family", list(UNGUIDED))
def test_without_guidance_no_negative_is_encoded(family_checkpoint, family):
    path = family_checkpoint(family)
    options, reference = UNGUIDED[family]
    request = request_spec(path.name, prompt=PROMPT, steps=2, seed=3, num_images=2, height=64, width=64, **options)
    encoder = stage(path, ENCODER)
    with torch.inference_mode():
        embeds = encoder.family.encode(encoder.pipe, request)
    assert not any(name.startswith("negative_") for name in embeds)
    kwargs = {"prompt": PROMPT, "num_inference_steps": 2, "height": 64, "width": 64, **reference}
    _assert_matches(path, split_run(path, request), 3, **kwargs)


@pytest.mark.parametrize("family", list(CASES))
def test_encoder_runs_in_bfloat16(family_checkpoint, family):
    path = family_checkpoint(family)
    request = request_spec(path.name, prompt=PROMPT, steps=2, seed=1, **CASES[family])
    (image,) = split_run(path, request, encoder_dtype=torch.bfloat16)
    assert image.size == (CASES[family]["width"], CASES[family]["height"])


@pytest.mark.parametrize("family", list(CASES))
def test_denoiser_knows_the_vae_scale_without_a_vae(family_checkpoint, family):
    path = family_checkpoint(family)
    denoiser, whole = stage(path, DENOISER).pipe, pipeline(path)
    assert denoiser.vae_scale_factor == whole.vae_scale_factor
    assert denoiser.image_processor.config.vae_scale_factor == whole.image_processor.config.vae_scale_factor


@pytest.mark.parametrize("family", ["zimage", "qwenimage"])
def test_prompts_of_different_lengths_batch_like_alone(family_checkpoint, family):
    """Ragged prompts share one denoising batch, and each request gets what it gets alone."""
    path = family_checkpoint(family)
    encoder, denoiser, decoder = stage(path, ENCODER), stage(path, DENOISER), stage(path, DECODER)
    prompts = ("a cat", "a beautiful detailed painting of a red fox in a dark forest at the sea")
    guidance = {"true_cfg": 4.0} if family == "qwenimage" else {"guidance": 4.0}
    options = {"height": 64, "width": 96, "negative_prompt": "blurry", **guidance}
    requests = [
        request_spec(path.name, prompt=prompt, steps=2, seed=9 + i, num_images=1 + i, **options)
        for i, prompt in enumerate(prompts)
    ]
    with torch.inference_mode():
        embeds = [wire(encoder.family.encode(encoder.pipe, request)) for request in requests]
        lengths = {e["prompt_embeds"].shape[-2] for e in embeds}
        assert len(lengths) == 2, "the prompts should tokenize to different lengths"
        keys = {denoiser.family.batch_key(denoiser.pipe, e, r) for e, r in zip(embeds, requests, strict=True)}
        assert len(keys) == 1, "requests differing only in prompt length should share a batch"

        def run(batch: list) -> list[torch.Tensor]:
            return [latents for latents, _ in denoiser.family.denoise(denoiser.pipe, batch, lambda s, t: None)]

        together = run(list(zip(embeds, requests, strict=True)))
        alone = [latents for pair in zip(embeds, requests, strict=True) for latents in run([pair])]
        for request, batched, single in zip(requests, together, alone, strict=True):
            assert batched.shape == single.shape
            params = denoiser.family.resolve_params(denoiser.pipe, request)
            for index in range(request.num_images):
                (a,) = decoder.family.decode(decoder.pipe, batched[index : index + 1], params)
                (b,) = decoder.family.decode(decoder.pipe, single[index : index + 1], params)
                assert max_difference(a, b) <= 1, f"{request.prompt!r} image {index}"
