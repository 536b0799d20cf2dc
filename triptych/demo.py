"""The offline demo model of `triptych run`: a small text-to-image model trained by this project.

It ships inside the package (``triptych/demo_model``, fp16 safetensors, a few MB), so
`triptych run "..."` works on a fresh machine with no network and no training. It is a Stable
Diffusion checkpoint in diffusers' layout, loaded by every node like any other, and it draws one
small world only: flat-colour scenes of one or two shapes (``training/scenes.py`` is its grammar,
``python -m training.train_demo`` rebuilds it). A demonstration, not a general model.

The random-weight checkpoints of every family, for tests, stay in ``triptych.testing``.
"""

from __future__ import annotations

import json
from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "demo_model"
# The guidance_scale its held-out score is measured at; the pipeline's default of 7.5 oversaturates it.
RECOMMENDED_GUIDANCE = 4.0


def demo_model() -> Path:
    """The packaged demo checkpoint's folder."""
    if not (DEMO_MODEL / "model_index.json").exists():
        raise FileNotFoundError(
            f"the demo model is missing from {DEMO_MODEL}; rebuild it: python -m training.train_demo"
        )
    return DEMO_MODEL


def describe_demo_model() -> str:
    """One line for stderr: what the demo model can draw, read from the grammar recorded at training."""
    world = json.loads((demo_model() / "training.json").read_text())["world"]
    return (
        "triptych: demo model — pass --model for real images. It draws flat-colour scenes, 128×128: "
        f"one or two {'/'.join(world['shapes'])}; colours {', '.join(world['colours'])}; "
        f"sizes small/large; positions {', '.join(world['positions'])}; and a background colour. "
        f'E.g. "{world["example"]}". Best with --guidance {RECOMMENDED_GUIDANCE:g}'
    )
