"""Stage plans: the ordered graph of stages a request runs as, built once per request.

A plan is a tuple of :class:`Stage`. Each stage names the stages whose results it reads; once
they have all answered, its ``jobs`` function makes its jobs from the request and those results.
One stage's results are the request's images, one :class:`ImageResult` per job. The broker
knows nothing else of what the jobs carry: dispatch, requeue, exactly-once results, cancel and
timeouts work per job, whatever the plan. A new workflow is a new plan here (and what its nodes
do with the new job types), never a change to the broker.

Text to image::

    encode (encoder) --Embeddings--> denoise (denoiser) --DenoisedLatents--> decode x num_images (decoder)

Images in (img2img, inpainting, instruction editing): the VAE's encoder half runs on the decoder
node, beside the text encoder's work, so the GPU still sees only the denoiser. Without a mask the
encoder gets the images too: an editing model's text encoder reads them with the prompt
(Qwen-Image-Edit); other families' encoders leave them unread::

    encode (encoder)             --Embeddings-----\
                                                   >--> denoise (denoiser) --> decode x num_images (decoder)
    encode_image (decoder: VAE)  --EncodedImages--/
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.messages import (
    DecodedImage,
    DecodeJob,
    DenoisedLatents,
    DenoiseJob,
    Embeddings,
    EncodedImages,
    EncodeImagesJob,
    EncodeJob,
    GenerateRequest,
    ImageResult,
    StageJob,
    StageResult,
)
from protocol.stages import DECODE, DENOISE, ENCODE, ENCODE_IMAGE


class PlanError(ValueError):
    """A stage's result cannot feed the next stage (a node answered with something malformed)."""


@dataclass(frozen=True)
class PlanContext:
    """What a stage's ``jobs`` function reads: the request and the results of the stages before it."""

    request: GenerateRequest
    results: Mapping[str, Sequence[StageResult]]  # stage -> its jobs' results, in job order

    def job(self, cls: type[StageJob], **fields: Any) -> StageJob:
        return cls(job_id=uuid.uuid4().hex, request_id=self.request.request_id, **fields)

    def result(self, stage: str, cls: type[StageResult]) -> Any:
        """The one result of ``stage``, checked to be a ``cls``."""
        (result,) = self.results[stage]
        if not isinstance(result, cls):
            raise PlanError(f"{stage} answered with {result.KIND}, not {cls.KIND}")
        return result


JobsFn = Callable[[PlanContext], list[StageJob]]
ImageFn = Callable[[PlanContext, StageJob, StageResult], ImageResult]


@dataclass(frozen=True)
class Stage:
    name: str  # a stage name of protocol.stages
    needs: tuple[str, ...]  # stages whose results this one reads
    jobs: JobsFn  # this stage's jobs, made once those results are in


@dataclass(frozen=True)
class Plan:
    kind: str
    stages: tuple[Stage, ...]  # in an order where every stage comes after the ones it needs
    images: str  # the stage whose jobs' results are the request's images
    image: ImageFn  # one such job and its result -> the ImageResult the client gets

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for stage in self.stages:
            if missing := [need for need in stage.needs if need not in seen]:
                raise ValueError(f"plan {self.kind}: stage {stage.name} needs {missing}, which do not come before it")
            seen.add(stage.name)
        if self.images not in seen:
            raise ValueError(f"plan {self.kind}: no stage {self.images}")


# --- text to image ------------------------------------------------------------------------


def _encode_jobs(ctx: PlanContext) -> list[StageJob]:
    return [ctx.job(EncodeJob, request=ctx.request.spec())]


def _denoise_jobs(ctx: PlanContext) -> list[StageJob]:
    embeddings: Embeddings = ctx.result(ENCODE, Embeddings)
    return [ctx.job(DenoiseJob, request=ctx.request.spec(), embeds=embeddings.embeds)]


def _decode_jobs(ctx: PlanContext) -> list[StageJob]:
    denoised: DenoisedLatents = ctx.result(DENOISE, DenoisedLatents)
    latents, count = denoised.latents, ctx.request.num_images
    if latents.ndim < 1 or latents.shape[0] != count:
        raise PlanError(f"expected latents for {count} image(s), got shape {list(latents.shape)}")
    # (num_images, ...) -> one (1, ...) row per decode job.
    return [
        ctx.job(DecodeJob, params=denoised.params, index=index, latents=_rows(latents, index)) for index in range(count)
    ]


def _rows(latents: Any, index: int) -> Any:
    """Row ``index`` of a batch, keeping the batch dimension: a WireTensor or a torch tensor."""
    rows = getattr(latents, "rows", None)
    return rows(index, index + 1) if rows is not None else latents[index : index + 1]


def _decoded_image(ctx: PlanContext, job: StageJob, result: StageResult) -> ImageResult:
    if not (isinstance(job, DecodeJob) and isinstance(result, DecodedImage)):
        raise PlanError(f"decode answered with {result.KIND}")
    denoised: DenoisedLatents = ctx.result(DENOISE, DenoisedLatents)
    return ImageResult(
        request_id=ctx.request.request_id,
        index=job.index,
        seed=job.params.seed + job.index,
        png=result.png,
        params=job.params,
        warnings=denoised.warnings,
    )


TEXT_TO_IMAGE = Plan(
    kind="text-to-image",
    stages=(
        Stage(ENCODE, needs=(), jobs=_encode_jobs),
        Stage(DENOISE, needs=(ENCODE,), jobs=_denoise_jobs),
        Stage(DECODE, needs=(DENOISE,), jobs=_decode_jobs),
    ),
    images=DECODE,
    image=_decoded_image,
)


def _encode_with_images_jobs(ctx: PlanContext) -> list[StageJob]:
    request = ctx.request
    # An edit (no mask) may be read by the text encoder too; an inpainting mask means no editing model.
    images = request.images if request.mask is None else []
    return [ctx.job(EncodeJob, request=request.spec(), images=images)]


def _encode_images_jobs(ctx: PlanContext) -> list[StageJob]:
    request = ctx.request
    job = ctx.job(
        EncodeImagesJob, request=request.spec(), images=request.images, mask=request.mask, mask_alpha=request.mask_alpha
    )
    return [job]


def _denoise_with_images_jobs(ctx: PlanContext) -> list[StageJob]:
    embeddings: Embeddings = ctx.result(ENCODE, Embeddings)
    encoded: EncodedImages = ctx.result(ENCODE_IMAGE, EncodedImages)
    state = encoded.inputs.generator_state
    if state.ndim != 2 or state.shape[0] != ctx.request.num_images:
        raise PlanError(f"expected a generator state per image, got shape {list(state.shape)}")
    return [ctx.job(DenoiseJob, request=ctx.request.spec(), embeds=embeddings.embeds, images=encoded.inputs)]


IMAGES_IN = Plan(
    kind="images-in",
    stages=(
        Stage(ENCODE, needs=(), jobs=_encode_with_images_jobs),
        Stage(ENCODE_IMAGE, needs=(), jobs=_encode_images_jobs),
        Stage(DENOISE, needs=(ENCODE, ENCODE_IMAGE), jobs=_denoise_with_images_jobs),
        Stage(DECODE, needs=(DENOISE,), jobs=_decode_jobs),
    ),
    images=DECODE,
    image=_decoded_image,
)


def plan_for(request: GenerateRequest) -> Plan:
    """The plan a request runs as, from what it asks for."""
    return IMAGES_IN if request.images or request.mask is not None else TEXT_TO_IMAGE
