"""FLUX.1 Kontext: FLUX.1 with the image to edit read as more of the sequence.

Text encoding is FLUX.1's (CLIP-L pooled + T5, see :mod:`triptych.families.flux`). The image to
edit is VAE-encoded on the decoder node: as ``FluxKontextPipeline`` does, its size is rounded to
the VAE's multiple, then (``_auto_resize``, the pipeline's default) replaced by the preferred
Kontext resolution of the nearest aspect ratio, resized and preprocessed, and encoded with the
latent distribution's mode (so no generator is drawn from). The denoiser's pipeline takes those
latents (N, 16, h, w) as ``image`` in place of pixels, packs them and appends them to the
sequence after the noise tokens, with their position ids' first axis set to 1.

Size. Whatever height and width are asked for (default 1024 px), the pipeline makes an image of
about ``max_area`` (1024 x 1024) pixels with their aspect ratio, each side rounded down to a
multiple of 16; that is the size resolved here, for text-to-image too. The denoiser passes that
size with ``max_area`` its own area, which the pipeline maps back onto the same size exactly.

There is no ``strength``: Kontext starts from noise and reads the image as context.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from PIL import Image

from protocol.errors import RequestError
from protocol.messages import ImageInputs, RequestSpec, ResolvedParams
from triptych.families.flux import Flux


class FluxKontext(Flux):
    name = "flux-kontext"
    pipelines = ("FluxKontextPipeline",)
    img2img_pipeline = "FluxKontextPipeline"  # the same pipeline, given an image
    inpaint_pipeline = None  # no masks: the prompt says what to change
    inpaint_checkpoints = ()

    def apply_vae_config(self, pipe: Any, vae_config: dict) -> None:
        super().apply_vae_config(pipe, vae_config)
        # FluxKontextPipeline.__init__ reads it from its VAE (16 without one): image latents have that many.
        pipe.latent_channels = vae_config.get("latent_channels", pipe.latent_channels)

    def output_size(self, pipe: Any, request: RequestSpec) -> tuple[int, int]:
        """(height, width) the pipeline makes: the asked-for aspect ratio at ``max_area`` pixels."""
        default_height, default_width = self.default_size(pipe)
        height, width = request.height or default_height, request.width or default_width
        max_area = self.call_default(pipe, "max_area")
        aspect_ratio = width / height
        width, height = round((max_area * aspect_ratio) ** 0.5), round((max_area / aspect_ratio) ** 0.5)
        multiple = pipe.vae_scale_factor * 2
        return height // multiple * multiple, width // multiple * multiple

    def strength(self, pipe: Any, request: RequestSpec) -> float | None:
        if request.strength is not None:
            raise RequestError("strength", f"{type(pipe).__name__} takes no strength: it reads the image as context")
        return None

    def resolve_params(self, pipe: Any, request: RequestSpec, images: ImageInputs | None = None) -> ResolvedParams:
        params = super().resolve_params(pipe, request, images)
        height, width = self.output_size(pipe, request)
        return dataclasses.replace(params, height=height, width=width)

    def extra_kwargs(self, pipe: Any, request: RequestSpec) -> dict[str, Any]:
        # The resolved size with its own area as max_area: the pipeline's rescale leaves it as it is.
        height, width = self.output_size(pipe, request)
        return {"max_area": height * width}

    def image_kwargs(self, runner: Any, images: list[ImageInputs], params: ResolvedParams) -> dict[str, Any]:
        kwargs = super().image_kwargs(runner, images, params)
        kwargs.pop("strength", None)
        return kwargs

    def encode_images(
        self, pipe: Any, request: RequestSpec, images: list[Image.Image], mask: Image.Image | None, denoiser: dict
    ) -> ImageInputs:
        if mask is not None:
            raise RequestError("mask", f"{type(pipe).__name__} edits by instruction and takes no mask")
        if len(images) != 1:
            raise RequestError("image", f"{type(pipe).__name__} takes one image to edit (got {len(images)})")
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        runner = self.pipeline_for(pipe, request.workflow)
        processor, multiple = runner.image_processor, runner.vae_scale_factor * 2
        # 3. Preprocess image, as FluxKontextPipeline.__call__ does.
        image_height, image_width = processor.get_default_height_width(images[0])
        aspect_ratio = image_width / image_height
        if self.call_default(runner, "_auto_resize"):
            _, image_width, image_height = min(
                (abs(aspect_ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS
            )
        image_width, image_height = image_width // multiple * multiple, image_height // multiple * multiple
        image = processor.resize(images[0], image_height, image_width)
        # Encoded with the distribution's mode: the generators are left as they were.
        inputs = self.encode_img2img(runner, request, image, {"height": image_height, "width": image_width})
        height, width = self.output_size(runner, request)
        return dataclasses.replace(inputs, height=height, width=width)  # tensors: {"image": (N, 16, h, w)}
