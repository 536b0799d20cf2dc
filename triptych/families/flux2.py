"""FLUX.2 dev and klein: an LLM text encoder read at several layers, an MMDiT, packed latents.

The encoder runs the LLM (Mistral Small 3.1 for dev, Qwen3 for klein) over the chat-formatted
prompt and stacks three of its hidden layers on the feature axis: (1, 512, 3 x hidden). The
``text_ids`` (one (t, h, w, l) position per token) are not sent: the denoiser's pipeline builds
them from the embeddings' shape, as it does when run whole.

Guidance:

- dev is guidance-distilled: ``--guidance`` is ``guidance_scale``, an input of the model
  (default 4.0); there is no classifier-free guidance, so a negative prompt is not used.
- klein runs classifier-free guidance: ``--guidance`` is ``guidance_scale`` (default 4.0), and
  above 1 a negative prompt is encoded and sent as ``negative_prompt_embeds``. The pipeline
  itself always uses "" there; triptych uses the request's negative prompt, "" when unset, so
  without one the result is diffusers'. Step-distilled klein checkpoints (``is_distilled``)
  ignore guidance, and no negative prompt is encoded for them.

Reference images (``image=``, Flux2Pipeline only). The decoder node prepares each image as the
pipeline does -- shrunk to 1024 x 1024 pixels' area if larger, sides cut down to multiples of 16,
centre-cropped to them -- and encodes it with the VAE's mode (no generator is drawn from), patched
and batch-norm normalized: (N, 128, h/2, w/2) each. The denoiser runs the pipeline with stand-in
images, its VAE encode answered with those latents; the pipeline packs them after the noise tokens
with their own time coordinates. The image is made at the request's size, else the first image's.
The pipeline gives every image of a call the same references, so only requests with the same
images denoise together. No strength: the references are context, the image starts from noise.

Latents. The 32-channel VAE works on 2x2 patches (128 channels) normalized by its batch-norm
statistics. The decoder undoes that: un-pack (dev) or re-patch (klein) to (1, 128, h/2, w/2),
scale by the running std and add the running mean, un-patch to (1, 32, h, w), decode.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image

from protocol.errors import RequestError
from protocol.messages import IMAGE_TO_IMAGE, TEXT_TO_IMAGE, ImageInputs, RequestSpec, ResolvedParams
from triptych.families.base import LatentsFn, StepFn, Tensors, TransformerFamily
from triptych.families.references import VaeStandIn, answered_vae_encode, stand_in

if TYPE_CHECKING:
    from triptych.families.lora import LoraAdapters

_AREA = 1024 * 1024  # reference images larger than this are shrunk to it


def _latents_name(index: int) -> str:
    return f"image_latents_{index}"  # ImageInputs tensor: reference image ``index``'s latents, (N, 128, h/2, w/2)


class Flux2(TransformerFamily):
    name = "flux2"
    pipelines = ("Flux2Pipeline",)
    img2img_pipeline: ClassVar[str | None] = "Flux2Pipeline"  # the same pipeline, given reference images
    max_images: ClassVar[int] = 10  # FLUX.2 [dev] is made for up to ten reference images

    # --- reference images ---------------------------------------------------------------------

    def strength(self, pipe: Any, request: RequestSpec) -> float | None:
        if request.strength is not None:
            raise RequestError("strength", f"{type(pipe).__name__} takes no strength: its images are references")
        return None

    def encode_images(
        self, pipe: Any, request: RequestSpec, images: list[Image.Image], mask: Image.Image | None, denoiser: dict
    ) -> ImageInputs:
        if self.img2img_pipeline is None:
            raise RequestError("image", f"{self.name} takes no images in")
        if mask is not None:
            raise RequestError("mask", f"{type(pipe).__name__} takes reference images, and no mask")
        if len(images) > self.max_images:
            raise RequestError(
                "image", f"{type(pipe).__name__} reads at most {self.max_images} images (got {len(images)})"
            )
        if request.strength is not None:
            self.strength(pipe, request)
        processor, vae, count = pipe.image_processor, pipe.vae, request.num_images
        tensors, first = {}, None
        for index, image in enumerate(images):
            # 4. process images, as Flux2Pipeline.__call__ does.
            try:
                processor.check_image_input(image)
            except ValueError as exc:
                raise RequestError("image", f"image: {exc}") from None
            width, height = image.size
            if width * height > _AREA:
                image = processor._resize_to_target_area(image, _AREA)
                width, height = image.size
            multiple = pipe.vae_scale_factor * 2
            width, height = width // multiple * multiple, height // multiple * multiple
            pixels = processor.preprocess(image, height=height, width=width, resize_mode="crop")
            latents = pipe._encode_vae_image(pixels.to(vae.device, vae.dtype), generator=None)  # the mode: no draws
            tensors[_latents_name(index)] = latents.float().cpu().expand(count, -1, -1, -1).contiguous()
            first = first or (height, width)
        states = [torch.Generator("cpu").manual_seed(request.seed + i).get_state() for i in range(count)]
        height, width = request.height or first[0], request.width or first[1]
        return ImageInputs(tensors=tensors, generator_state=torch.stack(states), height=height, width=width)

    def batch_key(self, pipe: Any, embeds: Tensors, request: RequestSpec, images: ImageInputs | None = None) -> tuple:
        # The pipeline repeats one set of references for the whole call: only the same images batch.
        return (*super().batch_key(pipe, embeds, request, images), tuple(request.image_sha256))

    def image_kwargs(self, runner: Any, images: list[ImageInputs], params: ResolvedParams) -> dict[str, Any]:
        # Stand-ins the pipeline checks and preprocesses; its VAE encode is answered with the latents.
        return {"image": [stand_in(64, 64, smallest=64) for _ in images[0].tensors]}

    def denoise(
        self,
        pipe: Any,
        batch: list[tuple[Tensors, RequestSpec]],
        on_step: StepFn,
        images: list[ImageInputs | None] | None = None,
        on_latents: LatentsFn | None = None,
        adapters: LoraAdapters | None = None,
    ) -> list[tuple[torch.Tensor, ResolvedParams]]:
        if batch[0][1].workflow == TEXT_TO_IMAGE or not images or images[0] is None:
            return super().denoise(pipe, batch, on_step, images=images, on_latents=on_latents, adapters=adapters)
        runner = self.pipeline_for(pipe, IMAGE_TO_IMAGE)
        denoiser = getattr(runner, self.denoiser_attr)
        first = images[0].tensors
        # One row: the pipeline encodes each reference once and repeats it for every image of the call.
        latents = [first[_latents_name(k)][:1].to(denoiser.device, denoiser.dtype) for k in range(len(first))]
        # prepare_image_latents reads the VAE's device and dtype, which the denoiser's pipeline has no VAE for.
        vae = VaeStandIn(getattr(runner.vae, "config", None), denoiser.device, denoiser.dtype)
        with answered_vae_encode(runner, latents, vae):
            return super().denoise(pipe, batch, on_step, images=images, on_latents=on_latents, adapters=adapters)

    def default_size(self, pipe: Any) -> tuple[int, int]:
        # The pipelines fix their default (1024 px) whatever the transformer config says.
        side = pipe.default_sample_size * pipe.vae_scale_factor
        return side, side

    def size_multiple(self, pipe: Any) -> int:
        # Latents are packed as 2x2 patches (the pipeline would silently round the size down).
        return pipe.vae_scale_factor * 2

    def uses_negative(self, pipe: Any, request: RequestSpec) -> bool:
        return False  # guidance-distilled: the guidance scale is a model input, not a second pass

    def ignored_negative(self, pipe: Any, request: RequestSpec) -> str:
        return f"{type(pipe).__name__} is guidance-distilled and runs no classifier-free guidance"

    def encode_text(self, pipe: Any, text: str) -> Tensors:
        # (1, 512, 15360) for dev: Mistral's hidden states 10, 20 and 30 side by side; (1, 512, 7680)
        # for klein 4B: Qwen3's 9, 18 and 27. A negative prompt is encoded exactly like a prompt.
        embeds, _text_ids = pipe.encode_prompt(
            text,
            device=pipe.device,
            num_images_per_prompt=1,
            max_sequence_length=self.call_default(pipe, "max_sequence_length"),
            text_encoder_out_layers=self.call_default(pipe, "text_encoder_out_layers"),
        )
        return {"prompt_embeds": embeds}

    def _patches(self, pipe: Any, latents: torch.Tensor, params: ResolvedParams) -> torch.Tensor:
        """The denoiser's output for one image -> normalized 2x2 patches (1, 128, h/2, w/2)."""
        # Packed (1, h/2 * w/2, 128) in row-major patch order; the pipeline scatters by position ids.
        side = pipe.vae_scale_factor * 2
        shape = (latents.shape[0], latents.shape[-1], params.height // side, params.width // side)
        ids = pipe._prepare_latent_ids(torch.empty(shape, device="meta"))
        return pipe._unpack_latents_with_ids(latents, ids.to(latents.device))

    def decode_latents(self, pipe: Any, latents: torch.Tensor, params: ResolvedParams) -> torch.Tensor:
        vae = pipe.vae
        patches = self._patches(pipe, latents, params)
        # The pipeline's decode path: batch-norm statistics of the patched latents, then un-patch.
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patches.device, patches.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
            patches.device, patches.dtype
        )
        latents = pipe._unpatchify_latents(patches * std + mean)  # (1, 32, h, w)
        return vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]


class Flux2Klein(Flux2):
    name = "flux2-klein"
    pipelines = ("Flux2KleinPipeline",)
    img2img_pipeline = None  # reference images are served for Flux2Pipeline only

    def uses_negative(self, pipe: Any, request: RequestSpec) -> bool:
        return self.guidance(pipe, request) > 1.0 and not pipe.config.is_distilled

    def ignored_negative(self, pipe: Any, request: RequestSpec) -> str:
        if pipe.config.is_distilled:
            return "this checkpoint is step-distilled (is_distilled) and ignores guidance"
        return super().ignored_negative(pipe, request)

    def apply_vae_config(self, pipe: Any, vae_config: dict) -> None:
        super().apply_vae_config(pipe, vae_config)
        # Flux2KleinPipeline applies the VAE's batch-norm statistics and un-patches even for
        # output_type="latent". With no VAE here, an identity stand-in (mean 0, variance 1, eps 0:
        # exact) leaves the latents normalized; the decoder applies the real statistics.
        pipe.vae = SimpleNamespace(
            bn=SimpleNamespace(running_mean=torch.zeros(1), running_var=torch.ones(1)),
            config=SimpleNamespace(batch_norm_eps=0.0),
        )

    def _patches(self, pipe: Any, latents: torch.Tensor, params: ResolvedParams) -> torch.Tensor:
        # (1, 32, h, w) normalized and un-patched by the denoiser -> (1, 128, h/2, w/2).
        return pipe._patchify_latents(latents)
