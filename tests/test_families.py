"""Per-family parity: the split pipeline's images equal diffusers' for the same request and seed."""

from __future__ import annotations

import pytest
import torch

from tests.family_parity import max_difference, reference_kwargs, reference_run, request_spec, split_run
from triptych.families import UnsupportedModel, family_for_pipeline

# case -> (tiny family, the request's options): non-square sizes, with and without a negative prompt
PARITY = {
    "sd": ("sd", {"height": 64, "width": 96, "guidance": 6.0, "negative_prompt": "blurry"}),
    "sd-no-negative": ("sd", {"height": 96, "width": 64, "guidance": 6.0}),
    "sd-negative-unguided": ("sd", {"height": 64, "width": 64, "guidance": 1.0, "negative_prompt": "blurry"}),
    "pixart-alpha": ("pixart-alpha", {"height": 256, "width": 192, "guidance": 4.0, "negative_prompt": "blurry"}),
    "pixart-alpha-no-negative": ("pixart-alpha", {"height": 192, "width": 256, "guidance": 4.0}),
}
CASES = {"sd": PARITY["sd"][1], "pixart-alpha": PARITY["pixart-alpha"][1]}
PROMPT = "a watercolor of a heron"


@pytest.mark.parametrize("case", list(PARITY))
def test_split_equals_diffusers(family_checkpoint, case):
    family, options = PARITY[case]
    path = family_checkpoint(family)
    request = request_spec(path.name, prompt=PROMPT, steps=3, seed=21, num_images=2, **options)
    images = split_run(path, request)
    for index, image in enumerate(images):
        expected = reference_run(path, 21 + index, **reference_kwargs(PROMPT, 3, options))
        assert max_difference(image, expected) <= 1, f"image {index}"


@pytest.mark.parametrize("family", list(CASES))
def test_encoder_runs_in_bfloat16(family_checkpoint, family):
    path = family_checkpoint(family)
    request = request_spec(path.name, prompt=PROMPT, steps=2, seed=1, **CASES[family])
    (image,) = split_run(path, request, encoder_dtype=torch.bfloat16)
    assert image.size == (CASES[family]["width"], CASES[family]["height"])


def test_unsupported_pipeline_is_named():
    with pytest.raises(UnsupportedModel, match=r"KandinskyPipeline.*supported families"):
        family_for_pipeline("KandinskyPipeline")
