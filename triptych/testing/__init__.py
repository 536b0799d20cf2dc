"""Builders of tiny random-weight checkpoints for tests, benchmarks and the offline demo (like numpy.testing).

Every checkpoint is a real diffusers pipeline of one model family with miniature configs
shaped like the released model's, built entirely offline: tokenizers come from small
in-memory vocabularies, weights are random but deterministic given the seed. They serve the
parity tests against diffusers, the benchmarks' tiny modes and the demo model of
``triptych run``.

``tokenizers`` holds the tokenizers, ``components`` the text encoder configs, VAEs,
schedulers and denoisers, ``pipelines`` one pipeline per family.
"""

from __future__ import annotations

from triptych.testing.pipelines import FAMILIES, build_tiny_checkpoint

__all__ = ["FAMILIES", "build_tiny_checkpoint"]
