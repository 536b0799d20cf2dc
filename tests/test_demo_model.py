"""The demo model's training: its scene grammar, its held-out combinations, and the script end to end."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter

import torch
from diffusers import StableDiffusionPipeline

from tests.support import ROOT
from training.scenes import COLOURS, POSITIONS, SHAPES, held_out_triples, training_example
from training.tokenizer import build_tokenizer


def test_no_training_scene_draws_a_held_out_triple():
    rng = random.Random(1)
    seen = Counter()
    for _ in range(20000):
        scene, _ = training_example(rng)
        for thing in scene.things:
            assert (thing.shape, thing.colour, thing.position) not in held_out_triples()
            seen.update([thing.shape, thing.colour, thing.position])
    assert set(seen) == {*SHAPES, *COLOURS, *POSITIONS}  # every part is still seen


def test_every_grammar_word_is_one_token():
    tokenizer = build_tokenizer()
    ids = tokenizer("a small yellow star in the top left corner on a dark blue background").input_ids
    assert len(ids) == 14 + 2  # a token per word, plus start and end


def test_the_training_script_runs_end_to_end_in_a_few_steps(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "training.train_demo", "--out", str(out), "--vae-steps", "2", "--examples", "64"]
    command += ["--steps", "2", "--batch", "4", "--log-every", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "denoiser 2/2" in result.stdout
    pipe = StableDiffusionPipeline.from_pretrained(out, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    [image] = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert image.size == (128, 128)
    assert json.loads((out / "training.json").read_text())["settings"]["steps"] == 2
