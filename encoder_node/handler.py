"""Encoder jobs: a prompt (and negative prompt) in, the family's embedding tensors out."""

from __future__ import annotations

import logging

from protocol.worker import Job, ProgressFn
from triptych.families.loading import LoadedStage

logger = logging.getLogger(__name__)


class EncoderHandler:
    def __init__(self, stage: LoadedStage) -> None:
        self.stage = stage

    def __call__(self, job: Job, progress: ProgressFn) -> dict:
        request = job.payload["request"]
        embeds = self.stage.family.encode(self.stage.pipe, request)
        # Tensors cross the wire on CPU, e.g. {"prompt_embeds": (1, 77, 768), ...}.
        return {"embeds": {name: tensor.detach().cpu() for name, tensor in embeds.items()}}
