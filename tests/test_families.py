"""Per-family parity: the split pipeline's images equal diffusers' for the same request and seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.family_parity import max_difference, reference_run, request_dict, split_run
from triptych.families import UnsupportedModel, family_for_pipeline
from triptych.tiny import build_tiny_checkpoint

# tiny family -> the request's options (non-square sizes; a negative prompt where the family has one)
CASES = {
    "sd": {"height": 64, "width": 96, "guidance": 6.0, "negative_prompt": "blurry"},
    "pixart-alpha": {"height": 256, "width": 192, "guidance": 4.0, "negative_prompt": "blurry"},
}
PROMPT = "a watercolor of a heron"


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_checkpoint(family, tmp_path_factory.mktemp(family) / family)
        return built[family]

    return get


def _reference_kwargs(options: dict) -> dict:
    kwargs = {"prompt": PROMPT, "num_inference_steps": 3, "height": options["height"], "width": options["width"]}
    if "guidance" in options:
        kwargs["guidance_scale"] = options["guidance"]
    if "negative_prompt" in options:
        kwargs["negative_prompt"] = options["negative_prompt"]
    return kwargs


@pytest.mark.parametrize("family", list(CASES))
def test_split_equals_diffusers(family_checkpoint, family):
    path = family_checkpoint(family)
    options = CASES[family]
    request = request_dict(path.name, prompt=PROMPT, steps=3, seed=21, num_images=2, **options)
    images = split_run(path, request)
    for index, image in enumerate(images):
        expected = reference_run(path, 21 + index, **_reference_kwargs(options))
        assert max_difference(image, expected) <= 1, f"image {index}"


@pytest.mark.parametrize("family", list(CASES))
def test_encoder_runs_in_bfloat16(family_checkpoint, family):
    path = family_checkpoint(family)
    request = request_dict(path.name, prompt=PROMPT, steps=2, seed=1, **CASES[family])
    (image,) = split_run(path, request, encoder_dtype=torch.bfloat16)
    assert image.size == (CASES[family]["width"], CASES[family]["height"])


def test_unsupported_pipeline_is_named():
    with pytest.raises(UnsupportedModel, match=r"KandinskyPipeline.*supported families"):
        family_for_pipeline("KandinskyPipeline")
