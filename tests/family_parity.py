"""Run a request through the three stages in one process, across the wire codec, like the nodes do.

Each stage is loaded on its own through the real loading path (``load_stage``: the family's
pipeline class with only that stage's components), tensors cross ``protocol.codec`` between
stages exactly as they cross the network, and the PNG is written and read back. The result is
compared with the diffusers pipeline run whole, for the same request and seed.
"""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from decoder_node.handler import DecoderHandler
from decoder_node.png import encode_png
from protocol import codec, messages
from protocol.messages import (
    DecodeJob,
    DenoisedLatents,
    DenoiseJob,
    Embeddings,
    EncodeImagesJob,
    GenerateRequest,
    RequestSpec,
)
from protocol.stages import DECODER, DENOISER, ENCODER
from triptych.families.loading import LoadedStage, denoiser_config, load_stage


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
    """What a node receives of a message (or of plain tensors): through the codec, checked, tensors rebuilt."""
    if isinstance(value, messages.Message):
        return messages.from_frames([bytes(frame) for frame in messages.to_frames(value)], torch_tensors=True)
    return codec.decode([bytes(frame) for frame in codec.encode(value)], torch_tensors=True)


def request_spec(model: str, **fields) -> RequestSpec:
    fields.setdefault("seed", 0)
    return GenerateRequest(request_id="r", model=model, **fields).spec()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def split_run(
    path: Path,
    request: RequestSpec,
    encoder_dtype: torch.dtype = torch.float32,
    no_t5: bool = False,
    images: list[bytes] | None = None,
    mask: bytes | None = None,
) -> list[Image.Image]:
    """encoder (and image encoder) -> wire -> denoiser -> wire -> decoder, one decode job per image, PNG round trip.

    ``images`` and ``mask`` are the image files of a request with images in (``request`` made with them).
    """
    encoder = stage(path, ENCODER, encoder_dtype, no_t5)
    denoiser, decoder = stage(path, DENOISER), stage(path, DECODER)
    with torch.inference_mode():
        embeds = encoder.family.encode(encoder.pipe, request)
        embeddings = wire(Embeddings(job_id="e", embeds={k: v.cpu() for k, v in embeds.items()}))
        inputs = None
        if images:
            handler = DecoderHandler(decoder, denoiser_config(str(path), decoder.family))
            [encoded] = handler(
                [wire(EncodeImagesJob(job_id="i", request_id="r", request=request, images=images, mask=mask))], None
            )
            inputs = wire(encoded).inputs
        job = wire(DenoiseJob(job_id="d", request_id="r", request=request, embeds=embeddings.embeds, images=inputs))
        [(latents, params)] = denoiser.family.denoise(
            denoiser.pipe, [(job.embeds, job.request)], lambda s, t: None, images=[job.images]
        )
        denoised = wire(DenoisedLatents(job_id="d", latents=latents.contiguous(), params=params))
        images = []
        for index in range(request.num_images):
            row = denoised.latents[index : index + 1]
            decode = wire(DecodeJob(job_id="x", request_id="r", params=denoised.params, index=index, latents=row))
            (image,) = decoder.family.decode(decoder.pipe, decode.latents, decode.params)
            png = encode_png(image, decode.params, index)
            images.append(Image.open(io.BytesIO(png)).convert("RGB"))
    return images


# Each request option and the one pipeline argument it is.
PIPELINE_ARGUMENT = {
    "guidance": "guidance_scale",
    "true_cfg": "true_cfg_scale",
    "negative_prompt": "negative_prompt",
    "height": "height",
    "width": "width",
}


def reference_kwargs(prompt: str, steps: int, options: dict) -> dict:
    """The diffusers call a request means: every option passed as the pipeline argument of its name."""
    return {"prompt": prompt, "num_inference_steps": steps, **{PIPELINE_ARGUMENT[k]: v for k, v in options.items()}}


def reference_run(path: Path, seed: int, **kwargs) -> Image.Image:
    return pipeline(path)(**kwargs, generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def max_difference(a: Image.Image, b: Image.Image) -> int:
    x, y = np.asarray(a.convert("RGB"), dtype=np.int16), np.asarray(b.convert("RGB"), dtype=np.int16)
    assert x.shape == y.shape, f"{x.shape} != {y.shape}"
    return int(np.abs(x - y).max())
