"""Parity for SDXL, SD3, FLUX.1 and PixArt-Sigma: the split pipeline's images equal diffusers'."""

from __future__ import annotations

import pytest
import torch

from protocol.errors import RequestError
from protocol.stages import DENOISER, ENCODER
from tests.family_parity import max_difference, reference_kwargs, reference_run, request_spec, split_run, stage, wire
from triptych.families import family_for_pipeline

PROMPT = "a watercolor of a heron"

# case -> (tiny family, the request's options). Non-square sizes everywhere; every family with and
# without a negative prompt (SDXL's "zero negative" is its path with none).
CASES = {
    "sdxl": ("sdxl", {"height": 64, "width": 96, "guidance": 6.0, "negative_prompt": "blurry"}),
    "sdxl-zero-negative": ("sdxl", {"height": 96, "width": 64, "guidance": 5.0}),
    "sd3": ("sd3", {"height": 96, "width": 64, "guidance": 5.0, "negative_prompt": "blurry"}),
    "sd3-no-negative": ("sd3", {"height": 64, "width": 96, "guidance": 5.0}),
    "flux-true-cfg": (
        "flux",
        {"height": 64, "width": 96, "guidance": 3.0, "true_cfg": 4.0, "negative_prompt": "blurry"},
    ),
    # A negative prompt without --true-cfg: the pipeline ignores it, and so must triptych.
    "flux-negative-ignored": ("flux", {"height": 64, "width": 64, "guidance": 3.0, "negative_prompt": "blue sky"}),
    "flux": ("flux", {"height": 96, "width": 64, "guidance": 2.5}),
    "pixart-sigma": ("pixart-sigma", {"height": 256, "width": 192, "guidance": 4.0, "negative_prompt": "blurry"}),
    "pixart-sigma-no-negative": ("pixart-sigma", {"height": 192, "width": 256, "guidance": 4.0}),
}


def _reference_kwargs(family: str, options: dict, steps: int) -> dict:
    return reference_kwargs(PROMPT, steps, options)


@pytest.mark.parametrize("case", list(CASES))
def test_split_equals_diffusers(family_checkpoint, case):
    family, options = CASES[case]
    path = family_checkpoint(family)
    request = request_spec(path.name, prompt=PROMPT, steps=3, seed=21, num_images=2, **options)
    images = split_run(path, request)
    assert len(images) == 2
    for index, image in enumerate(images):
        expected = reference_run(path, 21 + index, **_reference_kwargs(family, options, steps=3))
        assert max_difference(image, expected) <= 1, f"image {index}"


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "pixart-sigma"])
def test_encoder_runs_in_bfloat16(family_checkpoint, family):
    path = family_checkpoint(family)
    options = CASES[family if family != "flux" else "flux-true-cfg"][1]
    request = request_spec(path.name, prompt=PROMPT, steps=2, seed=1, **options)
    (image,) = split_run(path, request, encoder_dtype=torch.bfloat16)
    assert image.size == (options["width"], options["height"])


def test_flux_guidance_options_are_the_pipeline_arguments_of_their_names(family_checkpoint):
    denoiser = stage(family_checkpoint("flux"), DENOISER)
    family, pipe = denoiser.family, denoiser.pipe
    plain = request_spec("flux", prompt=PROMPT, guidance=2.0)
    negative = request_spec("flux", prompt=PROMPT, guidance=2.0, negative_prompt="")
    true_cfg = request_spec("flux", prompt=PROMPT, guidance=2.0, true_cfg=4.0, negative_prompt="")
    for request in (plain, negative):
        params = family.resolve_params(pipe, request)
        assert family.guidance_kwargs(params) == {"guidance_scale": 2.0, "true_cfg_scale": 1.0}  # diffusers' 1.0
    assert family.guidance_kwargs(family.resolve_params(pipe, true_cfg)) == {
        "guidance_scale": 2.0,
        "true_cfg_scale": 4.0,
    }
    assert not family.uses_negative(pipe, plain)
    assert not family.uses_negative(pipe, negative)  # as in FluxPipeline: no real CFG at true_cfg_scale 1
    assert family.uses_negative(pipe, true_cfg)  # an empty negative prompt still turns real CFG on
    assert family.warnings(pipe, plain) == []
    assert family.warnings(pipe, true_cfg) == []
    [warning] = family.warnings(pipe, negative)
    assert "negative prompt is ignored" in warning and "--true-cfg" in warning


def test_true_cfg_is_refused_where_the_pipeline_has_none(family_checkpoint):
    denoiser = stage(family_checkpoint("sdxl"), DENOISER)
    request = request_spec("sdxl", prompt=PROMPT, true_cfg=4.0)
    with pytest.raises(RequestError, match="true_cfg_scale") as info:
        denoiser.family.resolve_params(denoiser.pipe, request)
    assert info.value.field == "true_cfg"


@pytest.mark.parametrize(
    ("pipeline", "name"),
    [
        ("StableDiffusionXLPipeline", "stable-diffusion-xl"),
        ("StableDiffusion3Pipeline", "stable-diffusion-3"),
        ("FluxPipeline", "flux"),
        ("PixArtSigmaPipeline", "pixart-sigma"),
    ],
)
def test_registered(pipeline, name):
    assert family_for_pipeline(pipeline).name == name


@pytest.mark.parametrize(("family", "size"), [("sdxl", (64, 64)), ("sd3", (64, 64)), ("flux", (1024, 1024))])
def test_default_size(family_checkpoint, family, size):
    denoiser = stage(family_checkpoint(family), DENOISER)
    assert denoiser.family.default_size(denoiser.pipe) == size


# family -> (negative prompt, the encoder's tensors as {name: shape}) for the tiny checkpoints
WIRE = {
    # no negative prompt: SDXL's denoiser makes zero negatives itself, so none are sent
    "sdxl": (None, {"prompt_embeds": (1, 77, 64), "pooled_prompt_embeds": (1, 32)}),
    # 77 CLIP tokens then 256 T5 tokens; a negative "" is encoded for CFG
    "sd3": (
        None,
        {
            "prompt_embeds": (1, 333, 64),
            "pooled_prompt_embeds": (1, 64),
            "negative_prompt_embeds": (1, 333, 64),
            "negative_pooled_prompt_embeds": (1, 64),
        },
    ),
    # no text_ids: the denoiser's pipeline builds them
    "flux": (None, {"prompt_embeds": (1, 512, 32), "pooled_prompt_embeds": (1, 32)}),
    "pixart-sigma": (
        "blurry",
        {
            "prompt_embeds": (1, 300, 32),
            "prompt_attention_mask": (1, 300),
            "negative_prompt_embeds": (1, 300, 32),
            "negative_prompt_attention_mask": (1, 300),
        },
    ),
}


@pytest.mark.parametrize("family", list(WIRE))
def test_what_the_encoder_sends(family_checkpoint, family):
    negative, shapes = WIRE[family]
    encoder = stage(family_checkpoint(family), ENCODER)
    request = request_spec(family, prompt=PROMPT, negative_prompt=negative, guidance=5.0)
    embeds = encoder.family.encode(encoder.pipe, request)
    assert {name: tuple(tensor.shape) for name, tensor in embeds.items()} == shapes


@pytest.mark.parametrize("case", ["sdxl", "sdxl-zero-negative", "sd3", "flux-true-cfg", "flux"])
def test_batching_changes_nothing(family_checkpoint, case):
    family, options = CASES[case]
    path = family_checkpoint(family)
    encoder, denoiser = stage(path, ENCODER), stage(path, DENOISER)
    requests = [
        request_spec(path.name, prompt=prompt, steps=2, seed=seed, num_images=count, **options)
        for prompt, seed, count in [(PROMPT, 3, 2), ("a red fox", 7, 1)]
    ]

    def no_progress(step: int, total: int) -> None:
        pass

    with torch.inference_mode():
        jobs = [(wire(encoder.family.encode(encoder.pipe, request)), request) for request in requests]
        keys = {denoiser.family.batch_key(denoiser.pipe, embeds, request) for embeds, request in jobs}
        assert len(keys) == 1
        batched = denoiser.family.denoise(denoiser.pipe, jobs, no_progress)
        alone = [denoiser.family.denoise(denoiser.pipe, [job], no_progress)[0] for job in jobs]
    for (together, _), (single, _) in zip(batched, alone, strict=True):
        torch.testing.assert_close(together, single, atol=1e-4, rtol=1e-4)


def test_flux_batches_apart_with_and_without_true_cfg(family_checkpoint):
    denoiser = stage(family_checkpoint("flux"), DENOISER)
    plain = request_spec("flux", prompt=PROMPT, guidance=1.0)
    negative = request_spec("flux", prompt=PROMPT, guidance=1.0, true_cfg=3.0, negative_prompt="blurry")
    embeds = {"prompt_embeds": torch.zeros(1, 512, 32), "pooled_prompt_embeds": torch.zeros(1, 32)}
    family, pipe = denoiser.family, denoiser.pipe
    assert family.batch_key(pipe, embeds, plain) != family.batch_key(pipe, embeds, negative)


def test_sd3_without_t5_equals_diffusers_without_t5(family_checkpoint):
    from diffusers import StableDiffusion3Pipeline

    path = family_checkpoint("sd3")
    options = CASES["sd3"][1]
    request = request_spec(path.name, prompt=PROMPT, steps=3, seed=4, **options)
    images = split_run(path, request, no_t5=True)
    assert stage(path, ENCODER, torch.float32, True).pipe.text_encoder_3 is None
    reference = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    reference.set_progress_bar_config(disable=True)
    kwargs = _reference_kwargs("sd3", options, steps=3)
    expected = reference(**kwargs, generator=torch.Generator("cpu").manual_seed(4)).images[0]
    assert max_difference(images[0], expected) <= 1
    with_t5 = reference_run(path, 4, **kwargs)
    assert max_difference(with_t5, expected) > 1  # leaving T5 out does change the image


def test_sd3_checkpoint_saved_without_t5(family_checkpoint, tmp_path):
    """A folder whose model_index.json has no T5 needs no flag: its T5 tokens are zeros too."""
    import json

    path = family_checkpoint("sd3")
    folder = tmp_path / "sd3-no-t5"
    folder.mkdir()
    for entry in path.iterdir():
        if entry.name not in ("model_index.json", "text_encoder_3", "tokenizer_3"):
            (folder / entry.name).symlink_to(entry)
    index = json.loads((path / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))

    request = request_spec(folder.name, prompt=PROMPT, negative_prompt="blurry", guidance=5.0)
    saved = stage(folder, ENCODER)
    flagged = stage(path, ENCODER, torch.float32, True)
    embeds = saved.family.encode(saved.pipe, request)
    expected = flagged.family.encode(flagged.pipe, request)
    assert embeds.keys() == expected.keys()
    for name in embeds:
        assert torch.equal(embeds[name], expected[name]), name
    assert embeds["prompt_embeds"][:, 77:].abs().max() == 0  # T5's 256 tokens


def test_no_t5_is_refused_where_t5_is_needed(family_checkpoint):
    from triptych.families.loading import load_stage

    with pytest.raises(ValueError, match="flux encoder cannot leave out a T5 encoder"):
        load_stage(str(family_checkpoint("flux")), ENCODER, no_t5=True)
    with pytest.raises(ValueError, match="stable-diffusion-3 denoiser cannot leave out"):
        load_stage(str(family_checkpoint("sd3")), DENOISER, no_t5=True)
