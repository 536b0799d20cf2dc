"""Qwen-Image-Edit and Qwen-Image-Edit Plus: Qwen-Image told what to change in one or more images.

Both the text encoder and the VAE read the images, so a request's images go to two nodes:

- The encoder node runs Qwen2.5-VL over the edit template with the images in it, each resized as
  the pipeline resizes it for its processor (Edit: to about 1024 x 1024 pixels; Plus: to about
  384 x 384, each "Picture i:"), and keeps the hidden states after the template's first tokens, as
  ``encode_prompt`` does: (1, L, D) ``prompt_embeds`` and a (1, L) ``prompt_embeds_mask``, with the
  image's tokens among them. The negative prompt, with ``--true-cfg`` above 1, sees the images too.
- The decoder node resizes each image to about 1024 x 1024 pixels (sides multiples of 32) and
  encodes it with the VAE's mode (no generator is drawn from), normalized by its ``latents_mean``
  / ``latents_std``: (N, 16, 1, h, w) per image, one row per image of the request, with each
  image's own size, which decides the size of what it encodes.

The denoiser runs the pipeline itself with a stand-in image of the same aspect ratio (the
pipeline reads its size for the output and latent shapes) and the decoder node's latents where
its ``_encode_vae_image`` would have encoded pixels; it packs them after the noise tokens.

The output size is ``--height`` / ``--width``, each defaulting to the (last) image's ~1 MP size,
rounded down to a multiple of 16. No strength and no mask: the edit starts from noise. Guidance
is Qwen-Image's (``--true-cfg``, default 4, with a negative prompt). Edit Plus runs a batch of one
prompt only, so its denoiser makes a request's images one at a time.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image

from protocol.errors import RequestError
from protocol.messages import IMAGE_TO_IMAGE, TEXT_TO_IMAGE, ImageInputs, RequestSpec, ResolvedParams
from protocol.stages import ENCODER
from triptych.families.base import EncodeCache, LatentsFn, StepFn, Tensors
from triptych.families.qwenimage import QwenImage
from triptych.families.references import answered_vae_encode, stand_in

if TYPE_CHECKING:
    from triptych.families.lora import LoraAdapters

_TARGET_AREA = 1024 * 1024  # the pipelines' output (and Edit's VAE and prompt image) area
_SIZES = "image_sizes"  # ImageInputs tensor: each image's own (width, height), (N, K, 2)


def _latents_name(index: int) -> str:
    return f"image_latents_{index}"  # ImageInputs tensor: image ``index``'s VAE latents, (N, 16, 1, h, w)


class QwenImageEdit(QwenImage):
    name = "qwenimage-edit"
    pipelines: ClassVar[tuple[str, ...]] = ("QwenImageEditPipeline",)
    img2img_pipeline = "QwenImageEditPipeline"  # the checkpoint's own pipeline, given images
    components = {**QwenImage.components, ENCODER: ("tokenizer", "text_encoder", "processor")}
    max_images: ClassVar[int] = 1  # how many images the pipeline reads

    # --- the images each node resizes, as the pipeline does ---------------------------------

    def check_images(self, pipe: Any, request: RequestSpec, images: list[Any]) -> None:
        if request.mask_sha256 is not None:
            raise RequestError("mask", f"{type(pipe).__name__} edits by instruction and takes no mask")
        if request.strength is not None:
            raise RequestError("strength", f"{type(pipe).__name__} takes no strength: it edits from noise")
        if not images:
            raise RequestError("image", f"{type(pipe).__name__} edits an image: the request needs one")
        if len(images) > self.max_images:
            most = "one image" if self.max_images == 1 else f"at most {self.max_images} images"
            raise RequestError("image", f"{type(pipe).__name__} reads {most} (got {len(images)})")

    @staticmethod
    def _dimensions(area: int, width: int, height: int) -> tuple[int, int]:
        """(width, height) of about ``area`` pixels at the image's aspect ratio: the pipeline's calculate_dimensions."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

        return calculate_dimensions(area, width / height)

    def prompt_images(self, pipe: Any, images: list[Image.Image]) -> Any:
        """What the pipeline hands Qwen2.5-VL: the image at about 1024 x 1024 pixels."""
        width, height = self._dimensions(_TARGET_AREA, *images[0].size)
        return pipe.image_processor.resize(images[0], height, width)

    def vae_pixels(self, pipe: Any, images: list[Image.Image]) -> list[torch.Tensor]:
        """What the pipeline's VAE encodes, (1, 3, 1, H, W) in [-1, 1] per image."""
        width, height = self._dimensions(_TARGET_AREA, *images[0].size)
        resized = pipe.image_processor.resize(images[0], height, width)
        return [pipe.image_processor.preprocess(resized, height, width).unsqueeze(2)]

    def output_size(self, pipe: Any, request: RequestSpec, sizes: list[tuple[int, int]]) -> tuple[int, int]:
        """(height, width): the request's, else the pipeline's from the (last) image's aspect ratio."""
        width, height = self._dimensions(_TARGET_AREA, *sizes[-1 if self.max_images > 1 else 0])
        multiple = pipe.vae_scale_factor * 2
        height, width = request.height or height, request.width or width
        return height // multiple * multiple, width // multiple * multiple

    # --- stage 1: encode, with the images -----------------------------------------------------

    def encode(self, pipe: Any, request: RequestSpec, cache: EncodeCache | None = None) -> Tensors:
        return self.encode_with_images(pipe, request, [], cache)  # no images: refused, naming the field

    def encode_with_images(
        self, pipe: Any, request: RequestSpec, images: list[Image.Image], cache: EncodeCache | None = None
    ) -> Tensors:
        """Prompt (and negative prompt) read by Qwen2.5-VL beside the images -> the pipeline's embedding kwargs."""
        self.check_images(pipe, request, images)
        cache = cache or (lambda key, compute: compute())
        seen = tuple(request.image_sha256)  # the images are part of what is encoded
        shown = self.prompt_images(pipe, images)
        embeds = dict(cache(("prompt", request.prompt, seen), lambda: self._encode(pipe, request.prompt, shown)))
        if self.uses_negative(pipe, request):
            text = self.negative_text(pipe, request)
            negative = cache(("negative", text, seen), lambda: self._encode(pipe, text, shown))
            embeds |= {f"negative_{name}": value for name, value in negative.items()}
        return embeds

    def _encode(self, pipe: Any, text: str, images: Any) -> Tensors:
        # (1, L, 3584) for Qwen-Image-Edit, L counting the image's tokens.
        embeds, mask = pipe.encode_prompt(
            text,
            image=images,
            device=pipe.device,
            num_images_per_prompt=1,
            max_sequence_length=self.call_default(pipe, "max_sequence_length"),
        )
        if mask is None:  # encode_prompt drops a mask with no padding, as one prompt's always is
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    # --- images in: the VAE on the decoder node ---------------------------------------------------

    def encode_images(
        self, pipe: Any, request: RequestSpec, images: list[Image.Image], mask: Image.Image | None, denoiser: dict
    ) -> ImageInputs:
        self.check_images(pipe, request, images)
        vae, count = pipe.vae, request.num_images
        tensors: dict[str, torch.Tensor] = {}
        for index, pixels in enumerate(self.vae_pixels(pipe, images)):
            # The distribution's mode: the generator is not drawn from.
            latents = pipe._encode_vae_image(pixels.to(vae.device, vae.dtype), generator=None)
            tensors[_latents_name(index)] = latents.float().cpu().expand(count, -1, -1, -1, -1).contiguous()
        sizes = [image.size for image in images]
        tensors[_SIZES] = torch.tensor([sizes] * count, dtype=torch.int64)  # (N, K, 2): (width, height)
        states = [torch.Generator("cpu").manual_seed(request.seed + i).get_state() for i in range(count)]
        height, width = self.output_size(pipe, request, sizes)
        return ImageInputs(tensors=tensors, generator_state=torch.stack(states), height=height, width=width)

    # --- stage 2: denoise -------------------------------------------------------------------------

    def apply_vae_config(self, pipe: Any, vae_config: dict) -> None:
        super().apply_vae_config(pipe, vae_config)
        pipe.latent_channels = vae_config.get("z_dim", pipe.latent_channels)  # as __init__ reads it from a VAE

    def strength(self, pipe: Any, request: RequestSpec) -> float | None:
        if request.strength is not None:
            raise RequestError("strength", f"{type(pipe).__name__} takes no strength: it edits from noise")
        return None

    def image_kwargs(self, runner: Any, images: list[ImageInputs], params: ResolvedParams) -> dict[str, Any]:
        # Requests of one batch have images of one latent size, so the first request's sizes stand for all.
        sizes = images[0].tensors[_SIZES][0].tolist()
        stand_ins = [stand_in(width, height) for width, height in sizes]
        return {"image": stand_ins if self.max_images > 1 else stand_ins[0]}

    def denoise(
        self,
        pipe: Any,
        batch: list[tuple[Tensors, RequestSpec]],
        on_step: StepFn,
        images: list[ImageInputs | None] | None = None,
        on_latents: LatentsFn | None = None,
        adapters: LoraAdapters | None = None,
    ) -> list[tuple[torch.Tensor, ResolvedParams]]:
        if (
            any(request.workflow == TEXT_TO_IMAGE for _, request in batch)
            or not images
            or any(i is None for i in images)
        ):
            raise RequestError("image", f"{self.name} edits an image: the request needs one")
        runner = self.pipeline_for(pipe, IMAGE_TO_IMAGE)
        denoiser = getattr(runner, self.denoiser_attr)
        count = sum(name != _SIZES for name in images[0].tensors)
        latents = [
            torch.cat([inputs.tensors[_latents_name(k)] for inputs in images]).to(denoiser.device, denoiser.dtype)
            for k in range(count)
        ]
        with answered_vae_encode(runner, latents):
            return super().denoise(pipe, batch, on_step, images=images, on_latents=on_latents, adapters=adapters)


class QwenImageEditPlus(QwenImageEdit):
    name = "qwenimage-edit-plus"
    pipelines = ("QwenImageEditPlusPipeline",)
    img2img_pipeline = "QwenImageEditPlusPipeline"
    # The pipeline takes any number; Qwen-Image-Edit-2509 is made for one to three.
    max_images = 3

    def prompt_images(self, pipe: Any, images: list[Image.Image]) -> Any:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE

        # Each image at about 384 x 384 pixels for Qwen2.5-VL.
        shown = []
        for image in images:
            width, height = self._dimensions(CONDITION_IMAGE_SIZE, *image.size)
            shown.append(pipe.image_processor.resize(image, height, width))
        return shown

    def vae_pixels(self, pipe: Any, images: list[Image.Image]) -> list[torch.Tensor]:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import VAE_IMAGE_SIZE

        pixels = []
        for image in images:
            width, height = self._dimensions(VAE_IMAGE_SIZE, *image.size)
            pixels.append(pipe.image_processor.preprocess(image, height, width).unsqueeze(2))
        return pixels

    def denoise(
        self,
        pipe: Any,
        batch: list[tuple[Tensors, RequestSpec]],
        on_step: StepFn,
        images: list[ImageInputs | None] | None = None,
        on_latents: LatentsFn | None = None,
        adapters: LoraAdapters | None = None,
    ) -> list[tuple[torch.Tensor, ResolvedParams]]:
        # The pipeline denoises one image per call (batch_size 1): image i of a request with its
        # generator seeded seed + i, as diffusers' generator list gives it; without previews.
        images = images or [None] * len(batch)
        results = []
        for (embeds, request), inputs in zip(batch, images, strict=True):
            if inputs is None:
                raise RequestError("image", f"{self.name} edits images: the request needs one")
            rows = []
            for i in range(request.num_images):
                one = dataclasses.replace(request, seed=request.seed + i, num_images=1)
                part = dataclasses.replace(
                    inputs,
                    tensors={name: tensor[i : i + 1] for name, tensor in inputs.tensors.items()},
                    generator_state=inputs.generator_state[i : i + 1],
                )
                [(latents, _)] = super().denoise(pipe, [(embeds, one)], on_step, images=[part], adapters=adapters)
                rows.append(latents)
            results.append((torch.cat(rows), self.resolve_params(pipe, request, inputs)))
        return results
