"""Pipelines that VAE-encode their images inside ``__call__`` and take no latents in their place.

Qwen-Image-Edit and FLUX.2 (reference images) call their own ``_encode_vae_image`` on the
preprocessed pixels and go on from there. On the denoiser, which holds no VAE, the pipeline runs
as it is, given stand-in images (of what they read of an image: its size), and each of those calls
is answered with the latents the decoder node encoded, in the order the pipeline asks for them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image


class VaeStandIn(torch.nn.Module):
    """What a pipeline reads of a VAE whose encode it does not run itself: its device and dtype, and its config."""

    def __init__(self, config: Any, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.config, self._device, self._dtype = config, device, dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype


@contextlib.contextmanager
def answered_vae_encode(runner: Any, latents: list[torch.Tensor], vae: Any = None) -> Iterator[None]:
    """The pipeline's ``_encode_vae_image`` answered with the decoder node's latents, image by image in order;
    with ``vae``, that in place of the pipeline's own for the call."""
    answers = iter(latents)
    before, before_vae = runner.__dict__.get("_encode_vae_image"), getattr(runner, "vae", None)
    runner._encode_vae_image = lambda image, generator: next(answers)
    if vae is not None:
        runner.vae = vae
    try:
        yield
    finally:
        if before is None:
            del runner._encode_vae_image
        else:
            runner._encode_vae_image = before
        if vae is not None:
            runner.vae = before_vae


def stand_in(width: int, height: int, smallest: int = 1) -> Image.Image:
    """A blank image with exactly the aspect ratio of ``width`` x ``height``, as small as that allows
    with each side at least ``smallest``."""
    divisor = math.gcd(width, height)
    width, height = width // divisor, height // divisor
    scale = max(1, math.ceil(smallest / min(width, height)))
    return Image.new("RGB", (width * scale, height * scale))
