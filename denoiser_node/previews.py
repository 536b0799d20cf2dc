"""Previews during a denoising batch: which requests want one at a step, and the PNGs for them.

The pipeline's step callback hands over the batch's latents (:meth:`StepPreviews.keep`); right
after, the step is reported (:meth:`StepPreviews.step`) with a preview of each image of every
request that asked for one at that step. A preview that cannot be made is left out with a log
line: it never fails the job whose result it only illustrates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from protocol.worker import ProgressFn
from triptych.families.previews import preview_due, preview_pngs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreviewRequest:
    """What one request of the batch needs to know for its previews."""

    count: int  # its images: its rows of the batch's latents
    every: int | None  # RequestSpec.preview_every
    height: int  # the image size, which fixes the grid of packed latents
    width: int


class StepPreviews:
    """Turns each step's latents into per-request previews and reports the step with them."""

    def __init__(self, family: str, requests: list[PreviewRequest], progress: ProgressFn) -> None:
        self.family = family
        self.requests = requests
        self.progress = progress
        self._latents: Any = None
        self._failed = False  # logged once per batch

    def keep(self, latents: Any) -> None:
        """The batch's latents after a step, (sum of counts, ...) in the pipeline's layout."""
        self._latents = latents

    def step(self, step: int, total: int) -> None:
        latents, self._latents = self._latents, None
        due = [preview_due(request.every, step, total) for request in self.requests]
        self.progress(step, total, self._previews(latents, due) if latents is not None and any(due) else None)

    def _previews(self, latents: Any, due: list[bool]) -> list[list[bytes]] | None:
        counts = [request.count for request in self.requests]
        try:
            if latents.shape[0] != sum(counts):
                raise ValueError(f"latents for {latents.shape[0]} images, the batch has {sum(counts)}")
            rows = latents.split(counts)
            return [
                preview_pngs(self.family, part, request.height, request.width) if wanted else []
                for part, request, wanted in zip(rows, self.requests, due, strict=True)
            ]
        except Exception as exc:  # a preview is an illustration: the job goes on without it
            if not self._failed:
                logger.warning("no previews for this %s batch: %s", self.family, exc)
                self._failed = True
            return None
