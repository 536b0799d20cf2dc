"""The broker's bounds on request fields: each refusal names its field; the limits themselves pass."""

from __future__ import annotations

import dataclasses

import pytest

from protocol.messages import GenerateRequest
from protocol.validation import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_PIXELS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MAX_TIMEOUT,
    SIZE_MULTIPLE,
    request_error,
)

VALID = GenerateRequest(request_id="r1", model="sd-tiny", prompt="a red fox", seed=0)
NAN, INF = float("nan"), float("inf")


def with_(**changes) -> GenerateRequest:
    return dataclasses.replace(VALID, **changes)


def test_a_valid_request_has_no_error():
    assert request_error(VALID) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"request_id": "x" * 128},
        {"model": ""},
        {"model": "m" * 256},
        {"prompt": ""},
        {"prompt": "p" * MAX_PROMPT_CHARS},
        {"negative_prompt": ""},
        {"negative_prompt": "n" * MAX_PROMPT_CHARS},
        {"steps": 1},
        {"steps": MAX_STEPS},
        {"guidance": 0.0},
        {"guidance": 0},
        {"guidance": MAX_GUIDANCE},
        {"height": SIZE_MULTIPLE, "width": MAX_SIDE},
        {"height": MAX_SIDE, "width": MAX_PIXELS // MAX_SIDE},
        {"height": 512},
        {"width": 8192},
        {"num_images": 1},
        {"num_images": MAX_IMAGES},
        {"seed": MAX_SEED - 1},
        {"seed": MAX_SEED - MAX_IMAGES, "num_images": MAX_IMAGES},
        {"timeout": 0.001},
        {"timeout": MAX_TIMEOUT},
        {"user": "u" * 256},
    ],
    ids=repr,
)
def test_values_at_the_limits_are_accepted(changes):
    assert request_error(with_(**changes)) is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"request_id": ""}, "request_id"),
        ({"request_id": "x" * 129}, "request_id"),
        ({"model": "m" * 257}, "model"),
        ({"prompt": "p" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
        ({"negative_prompt": "n" * (MAX_PROMPT_CHARS + 1)}, "negative_prompt"),
        ({"steps": 0}, "steps"),
        ({"steps": -5}, "steps"),
        ({"steps": MAX_STEPS + 1}, "steps"),
        ({"guidance": -0.1}, "guidance"),
        ({"guidance": MAX_GUIDANCE + 0.5}, "guidance"),
        ({"guidance": NAN}, "guidance"),
        ({"guidance": INF}, "guidance"),
        ({"guidance": -INF}, "guidance"),
        ({"height": 0}, "height"),
        ({"height": SIZE_MULTIPLE - 1}, "height"),
        ({"height": 513}, "height"),
        ({"height": 516}, "height"),
        ({"height": MAX_SIDE + SIZE_MULTIPLE}, "height"),
        ({"height": -512}, "height"),
        ({"width": 0}, "width"),
        ({"width": 100}, "width"),
        ({"width": MAX_SIDE + SIZE_MULTIPLE}, "width"),
        ({"height": MAX_SIDE, "width": MAX_PIXELS // MAX_SIDE + SIZE_MULTIPLE}, "height x width"),
        ({"height": MAX_SIDE, "width": MAX_SIDE}, "height x width"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": -1}, "num_images"),
        ({"num_images": MAX_IMAGES + 1}, "num_images"),
        ({"seed": -1}, "seed"),
        ({"seed": MAX_SEED}, "seed"),
        ({"seed": 2**64 - 1}, "seed"),
        ({"seed": MAX_SEED - 2, "num_images": 3}, "seed"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1.0}, "timeout"),
        ({"timeout": MAX_TIMEOUT + 1}, "timeout"),
        ({"timeout": NAN}, "timeout"),
        ({"timeout": INF}, "timeout"),
        ({"user": "u" * 257}, "user"),
    ],
    ids=repr,
)
def test_each_bound_names_its_field(changes, field):
    problem = request_error(with_(**changes))
    assert problem is not None
    bad_field, message = problem
    assert message.startswith(field), message
    assert bad_field == field.split()[0]  # "height x width" is the height's to change


@pytest.mark.parametrize(
    ("changes", "shown"),
    [({"steps": 0}, "0"), ({"num_images": 17}, "17"), ({"height": 513}, "513"), ({"seed": -1}, "-1")],
)
def test_errors_show_the_offending_value(changes, shown):
    assert f"(got {shown})" in request_error(with_(**changes))[1]


def test_the_first_problem_is_reported():
    bad_field, message = request_error(with_(steps=0, num_images=0))
    assert bad_field == "steps" and message.startswith("steps")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"true_cfg": -1.0}, "true_cfg"),
        ({"true_cfg": NAN}, "true_cfg"),
        ({"scheduler": ""}, "scheduler"),
        ({"images": [b""]}, "image"),
        ({"images": [b"x"] * 9}, "image"),
        ({"mask": b"m"}, "mask"),
        ({"images": [b"a", b"b"], "mask": b"m"}, "mask"),
        ({"strength": 0.5}, "strength"),
        ({"images": [b"x"], "strength": 0.0}, "strength"),
        ({"images": [b"x"], "strength": 1.5}, "strength"),
        ({"images": [b"x"], "strength": NAN}, "strength"),
    ],
    ids=repr,
)
def test_new_options_name_their_field(changes, field):
    problem = request_error(with_(**changes))
    assert problem is not None and problem[0] == field, problem
