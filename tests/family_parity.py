"""Run a request through the three stages in one process, across the wire codec, like the nodes do.

Each stage is loaded on its own through the real loading path (``load_stage``: the family's
pipeline class with only that stage's components), tensors cross ``protocol.codec`` between
stages exactly as they cross the network, and the PNG is written and read back. The result is
compared with the diffusers pipeline run whole, for the same request and seed.
"""

from __future__ import annotations

import dataclasses
import io
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from decoder_node.png import encode_png
from protocol import codec
from protocol.messages import GenerateRequest
from triptych.families import DECODE, DENOISE, ENCODE
from triptych.families.loading import LoadedStage, load_stage


@cache
def stage(path: Path, name: str, dtype: torch.dtype = torch.float32, no_t5: bool = False) -> LoadedStage:
    return load_stage(str(path), name, dtype=dtype, no_t5=no_t5)


@cache
def pipeline(path: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wire(value):
    """What arrives on the far side of a socket."""
    return codec.decode([bytes(frame) for frame in codec.encode(value)])


def request_dict(model: str, **fields) -> dict:
    fields.setdefault("seed", 0)
    return dataclasses.asdict(GenerateRequest(request_id="r", model=model, **fields))


def split_run(
    path: Path, request: dict, encoder_dtype: torch.dtype = torch.float32, no_t5: bool = False
) -> list[Image.Image]:
    """encoder -> wire -> denoiser -> wire -> decoder, one decode job per image, PNG round trip."""
    encoder = stage(path, ENCODE, encoder_dtype, no_t5)
    denoiser, decoder = stage(path, DENOISE), stage(path, DECODE)
    with torch.inference_mode():
        embeds = wire(encoder.family.encode(encoder.pipe, request))
        [(latents, params)] = denoiser.family.denoise(denoiser.pipe, [(embeds, request)], lambda step, total: None)
        latents, params = wire([latents.contiguous(), params])
        images = []
        for index in range(request["num_images"]):
            (image,) = decoder.family.decode(decoder.pipe, latents[index : index + 1], params)
            png = encode_png(image, {**params, "seed": params["seed"] + index})
            images.append(Image.open(io.BytesIO(png)).convert("RGB"))
    return images


def reference_run(path: Path, seed: int, **kwargs) -> Image.Image:
    return pipeline(path)(**kwargs, generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def max_difference(a: Image.Image, b: Image.Image) -> int:
    x, y = np.asarray(a.convert("RGB"), dtype=np.int16), np.asarray(b.convert("RGB"), dtype=np.int16)
    assert x.shape == y.shape, f"{x.shape} != {y.shape}"
    return int(np.abs(x - y).max())
