"""What every model family shares: the three stages of a diffusers text-to-image pipeline.

A family subclass says which components each stage loads, what the encoder sends as
``prompt_embeds``-style tensors, and how latents become images. The pipeline itself does the
work in every stage -- each node loads the family's pipeline class with only its own
components and calls the same methods diffusers would -- so results match diffusers exactly.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image

from protocol.errors import RequestError
from protocol.messages import IMAGE_TO_IMAGE, INPAINT, TEXT_TO_IMAGE, ImageInputs, RequestSpec, ResolvedParams
from protocol.stages import DECODER, DENOISER, ENCODER
from triptych.families.lora import lora_key
from triptych.families.samplers import FLOW_SAMPLERS, NOISE_SAMPLERS, SAMPLERS

if TYPE_CHECKING:
    from triptych.families.lora import LoraAdapters

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]
StepFn = Callable[[int, int], None]  # (step, total)
LatentsFn = Callable[[torch.Tensor], None]  # the batch's latents after a step, before that step is reported
# (key, compute) -> tensors: a cache keyed by what is encoded; the node adds the model to the key.
EncodeCache = Callable[[tuple, Callable[[], Tensors]], Tensors]


@functools.cache
def _call_parameters(pipeline_class: type) -> Mapping[str, inspect.Parameter]:
    """The parameters of a pipeline class's ``__call__``, read once per class (it is asked per request)."""
    return inspect.signature(pipeline_class.__call__).parameters


def _no_cache(key: tuple, compute: Callable[[], Tensors]) -> Tensors:
    return compute()


# pipe -> {pipeline class name: that pipeline sharing pipe's components (diffusers' from_pipe)}
_VARIANTS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
# a denoiser's pipe -> the config of the VAE it does not load (what pipelines read of it)
_VAE_CONFIGS: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


class Family:
    name: ClassVar[str]
    pipelines: ClassVar[tuple[str, ...]]  # diffusers pipeline class names of this family
    # Components (model_index.json keys) each stage loads; every other one is passed as None.
    components: ClassVar[dict[str, tuple[str, ...]]] = {
        ENCODER: ("tokenizer", "text_encoder"),
        DENOISER: ("unet", "scheduler"),
        DECODER: ("vae",),
    }
    cuda_dtype: ClassVar[torch.dtype] = torch.float16  # the denoiser's dtype on a GPU unless told
    denoiser_attr: ClassVar[str] = "unet"
    # Encoder components the pipeline can do without (its T5), left out by the encoder's --no-t5.
    optional_t5: ClassVar[tuple[str, ...]] = ()
    samplers: ClassVar[tuple[str, ...]] = NOISE_SAMPLERS  # names of triptych.families.samplers it can run
    # diffusers pipelines for images in, sharing the text-to-image checkpoint's components; None: not served.
    img2img_pipeline: ClassVar[str | None] = None
    inpaint_pipeline: ClassVar[str | None] = None
    # Dedicated inpainting checkpoints of another class than inpaint_pipeline (FLUX.1 Fill), served as themselves.
    inpaint_checkpoints: ClassVar[tuple[str, ...]] = ()

    # --- which pipeline serves a request ----------------------------------------------------

    def pipeline_for(self, pipe: Any, workflow: str) -> Any:
        """The pipeline that runs ``workflow`` (text-to-image, image-to-image, inpaint) with pipe's components.

        A text-to-image checkpoint serves img2img and inpainting through diffusers' ``from_pipe``: the
        same modules, no weights loaded twice. A dedicated inpainting checkpoint serves inpainting only.
        """
        name = {TEXT_TO_IMAGE: None, IMAGE_TO_IMAGE: self.img2img_pipeline, INPAINT: self.inpaint_pipeline}[workflow]
        loaded = type(pipe).__name__
        dedicated = loaded == self.inpaint_pipeline or loaded in self.inpaint_checkpoints
        if workflow == TEXT_TO_IMAGE:
            if dedicated:
                raise RequestError("image", f"{loaded} is an inpainting checkpoint: it needs an image and a mask")
            return pipe
        if name is None and not dedicated:
            raise RequestError("image", f"{self.name} takes no images in ({workflow} is not served for it)")
        if dedicated and workflow != INPAINT:
            raise RequestError("mask", f"{loaded} is an inpainting checkpoint: it needs a mask")
        if loaded == name or dedicated:
            if getattr(pipe, "vae", None) is None and pipe in _VAE_CONFIGS:  # what the pipeline reads of its VAE
                if dedicated:  # its processors, too, were made without the VAE's latent channels
                    self._as_with_vae(pipe, pipe)
                else:
                    pipe.vae = SimpleNamespace(config=SimpleNamespace(**_VAE_CONFIGS[pipe]))
            return pipe
        variants = _VARIANTS.setdefault(pipe, {})
        if name not in variants:
            import diffusers

            variant = getattr(diffusers, name).from_pipe(pipe)
            variant.set_progress_bar_config(disable=True)
            if getattr(pipe, "vae", None) is None:  # the denoiser: what the VAE would tell comes from its config
                self._as_with_vae(pipe, variant)
            variants[name] = variant
        return variants[name]

    @staticmethod
    def _as_with_vae(pipe: Any, variant: Any) -> None:
        """Give a denoiser's pipeline for images in what its ``__init__`` would have read of a VAE."""
        config = _VAE_CONFIGS.get(pipe, {})
        overrides = {"vae_latent_channels": config["latent_channels"]} if "latent_channels" in config else {}
        for name in ("image_processor", "mask_processor"):
            processor = getattr(variant, name, None)
            if processor is not None:
                ratio = processor.config.vae_scale_factor // variant.vae_scale_factor
                scale = {"vae_scale_factor": pipe.vae_scale_factor * ratio}
                setattr(variant, name, type(processor)(**{**processor.config, **scale, **overrides}))
        variant.vae_scale_factor = pipe.vae_scale_factor
        if "latent_channels" in config and hasattr(variant, "latent_channels"):
            variant.latent_channels = config["latent_channels"]
        if config:  # the pipelines read the VAE's config (latent channels, scaling) even for latents out
            variant.vae = SimpleNamespace(config=SimpleNamespace(**config))

    def encode_img2img(
        self,
        runner: Any,
        request: RequestSpec,
        image: Image.Image,
        size: dict,
        sample: Callable[[Any, torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    ) -> ImageInputs:
        """img2img the way most pipelines do it: the image preprocessed to ``size`` (the pipeline's
        ``height``/``width``, or none for pipelines that keep the image's own), then the pipeline's VAE
        encode with each image's generator, which it then goes on drawing from. ``sample`` is that
        encode where the pipeline has it inline (default: its ``_encode_vae_image``)."""
        pixels = runner.image_processor.preprocess(image, **size).float()  # (1, 3, H, W) in [-1, 1]
        vae = runner.vae
        latents, states = [], []
        for i in range(request.num_images):
            generator = torch.Generator("cpu").manual_seed(request.seed + i)
            on_vae = pixels.to(vae.device, vae.dtype)
            if sample is None:
                encoded = runner._encode_vae_image(on_vae, generator=generator)
            else:
                encoded = sample(runner, on_vae, generator)
            latents.append(encoded.float().cpu())
            states.append(generator.get_state())
        height, width = pixels.shape[-2:]
        return ImageInputs(
            tensors={"image": torch.cat(latents)},  # (N, C, h, w) latents, taken in place of pixels
            generator_state=torch.stack(states),
            height=int(height),
            width=int(width),
        )

    def strength(self, pipe: Any, request: RequestSpec) -> float | None:
        """``strength`` as the pipeline gets it, for requests with images in."""
        if request.workflow == TEXT_TO_IMAGE:
            return None
        runner = self.pipeline_for(pipe, request.workflow)
        return float(self.call_default(runner, "strength") if request.strength is None else request.strength)

    # --- images in: on the decoder node, which holds the VAE ---------------------------------

    def encode_images(
        self, pipe: Any, request: RequestSpec, images: list[Image.Image], mask: Image.Image | None, denoiser: dict
    ) -> ImageInputs:
        """The init image (and mask) -> what the denoiser's pipeline takes in their place.

        ``denoiser`` is the denoiser's config (its sample size and input channels), read from the
        checkpoint: the decoder node loads no denoiser weights.
        """
        raise RequestError("image", f"{self.name} takes no images in")

    # --- defaults ---------------------------------------------------------------------------

    @staticmethod
    def call_default(pipe: Any, name: str) -> Any:
        """A default of the pipeline's own ``__call__`` (steps, guidance, sequence length...)."""
        parameter = _call_parameters(type(pipe)).get(name)
        return None if parameter is None else parameter.default

    @staticmethod
    def takes(pipe: Any, name: str) -> bool:
        """Whether the pipeline's ``__call__`` has an argument ``name``."""
        return name in _call_parameters(type(pipe))

    def guidance(self, pipe: Any, request: RequestSpec) -> float | None:
        """``guidance_scale`` as the pipeline gets it: the request's, else the pipeline's default."""
        guidance = self.call_default(pipe, "guidance_scale") if request.guidance is None else request.guidance
        return None if guidance is None else float(guidance)

    def true_cfg(self, pipe: Any, request: RequestSpec) -> float | None:
        """``true_cfg_scale`` as the pipeline gets it; None where the pipeline has no such argument."""
        if not self.takes(pipe, "true_cfg_scale"):
            if request.true_cfg is not None:
                raise RequestError(
                    "true_cfg", f"{type(pipe).__name__} has no true_cfg_scale: its guidance is guidance_scale"
                )
            return None
        value = self.call_default(pipe, "true_cfg_scale") if request.true_cfg is None else request.true_cfg
        return float(value)

    def uses_negative(self, pipe: Any, request: RequestSpec) -> bool:
        """Whether the pipeline will use negative embeddings, as its own ``__call__`` decides.

        Pipelines with ``true_cfg_scale`` run a negative pass only for a negative prompt and a scale
        above 1; the others run classifier-free guidance whenever ``guidance_scale`` is above 1.
        """
        true_cfg = self.true_cfg(pipe, request)
        if true_cfg is not None:
            return request.negative_prompt is not None and true_cfg > 1.0
        guidance = self.guidance(pipe, request)
        return guidance is not None and guidance > 1.0

    def ignored_negative(self, pipe: Any, request: RequestSpec) -> str:
        """Why the pipeline will not use the request's negative prompt (it is not asked when it will)."""
        if self.true_cfg(pipe, request) is not None:
            return f"{type(pipe).__name__} uses a negative prompt only with --true-cfg above 1"
        return f"guidance_scale {self.guidance(pipe, request):g} is not above 1: classifier-free guidance is off"

    def warnings(self, pipe: Any, request: RequestSpec) -> list[str]:
        """Options the pipeline will ignore for this request, each with the reason, for the client."""
        notes = []
        if request.negative_prompt is not None and not self.uses_negative(pipe, request):
            notes.append(f"the negative prompt is ignored: {self.ignored_negative(pipe, request)}")
        true_cfg = self.true_cfg(pipe, request)
        if request.true_cfg is not None and true_cfg is not None and true_cfg > 1 and request.negative_prompt is None:
            notes.append("--true-cfg is ignored without a negative prompt")
        return notes

    def default_size(self, pipe: Any) -> tuple[int, int]:
        sample = getattr(pipe, self.denoiser_attr).config.sample_size
        height, width = (sample, sample) if isinstance(sample, int) else sample
        return height * pipe.vae_scale_factor, width * pipe.vae_scale_factor

    def size_multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor

    def apply_vae_config(self, pipe: Any, vae_config: dict) -> None:
        """The denoiser loads no VAE: give its pipeline what its ``__init__`` reads from one.

        The default derives the scale factor from ``block_out_channels`` (AutoencoderKL and kin);
        families whose VAE is configured otherwise, or whose ``__call__`` reads the VAE even for
        latent output, override this.
        """
        blocks = vae_config.get("block_out_channels")
        if blocks:
            self.set_vae_scale_factor(pipe, 2 ** (len(blocks) - 1))

    @staticmethod
    def keep_vae_config(pipe: Any, vae_config: dict) -> None:
        """Remember the VAE's config for the pipelines of images in, which read it (the denoiser loads no VAE)."""
        _VAE_CONFIGS[pipe] = vae_config

    @staticmethod
    def set_vae_scale_factor(pipe: Any, scale: int) -> None:
        processor = getattr(pipe, "image_processor", None)
        if processor is not None:
            # Keep the pipeline's own ratio: packed-latent processors work in 2x2 patches (scale * 2).
            ratio = processor.config.vae_scale_factor // pipe.vae_scale_factor
            pipe.image_processor = type(processor)(vae_scale_factor=scale * ratio)
        pipe.vae_scale_factor = scale

    # --- stage 1: encode --------------------------------------------------------------------

    def prepare_encoder(self, pipe: Any, model: str) -> None:
        """Called once the encoder's components are loaded; for what ``encode_prompt`` reads elsewhere."""

    def encode_text(self, pipe: Any, text: str) -> Tensors:
        """One text as a positive prompt -> the tensors the pipeline takes instead (batch of one)."""
        raise NotImplementedError

    def negative_text(self, pipe: Any, request: RequestSpec) -> str:
        """The negative prompt the pipeline would use for this request."""
        negative = request.negative_prompt
        return negative if negative is not None else (self.call_default(pipe, "negative_prompt") or "")

    def encode_negative(self, pipe: Any, text: str) -> Tensors:
        """The negative embeddings: the text encoded like a prompt, under the negative names.

        Families whose pipeline treats an empty negative specially (zeros) override this.
        """
        return {f"negative_{name}": value for name, value in self.encode_text(pipe, text).items()}

    def encode(self, pipe: Any, request: RequestSpec, cache: EncodeCache | None = None) -> Tensors:
        """Prompt (and negative prompt when guidance needs one) -> the pipeline's embedding kwargs."""
        cache = cache or _no_cache
        embeds = dict(cache(("prompt", request.prompt), lambda: self.encode_text(pipe, request.prompt)))
        if self.uses_negative(pipe, request):
            text = self.negative_text(pipe, request)
            embeds |= cache(("negative", text), lambda: self.encode_negative(pipe, text))
        return embeds

    # --- stage 2: denoise -------------------------------------------------------------------

    def embed_kwargs(self, pipe: Any, embeds: Tensors) -> dict[str, Any]:
        """Pipeline keyword arguments from the encoder's tensors (cast to the denoiser's dtype)."""
        denoiser = getattr(pipe, self.denoiser_attr)
        return {
            name: value.to(denoiser.device, denoiser.dtype if value.is_floating_point() else value.dtype)
            for name, value in embeds.items()
        }

    def extra_kwargs(self, pipe: Any, request: RequestSpec) -> dict[str, Any]:
        """Further pipeline arguments a family needs (e.g. a negative prompt of None)."""
        return {}

    def guidance_kwargs(self, params: ResolvedParams) -> dict[str, Any]:
        """The guidance arguments exactly as resolved: each option is the pipeline argument of its name."""
        kwargs: dict[str, Any] = {"guidance_scale": params.guidance}
        if params.true_cfg is not None:
            kwargs["true_cfg_scale"] = params.true_cfg
        return kwargs

    def resolve_params(self, pipe: Any, request: RequestSpec, images: ImageInputs | None = None) -> ResolvedParams:
        """The generation parameters as the pipeline will use them, for the decoder and the PNG.

        With images in, the size is what the image encoder resolved (the image's own for img2img).
        """
        height, width = (images.height, images.width) if images is not None else self.default_size(pipe)
        steps = self.call_default(pipe, "num_inference_steps") if request.steps is None else request.steps
        return ResolvedParams(
            model=request.model,
            family=self.name,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or "",
            seed=request.seed,
            steps=int(steps),
            guidance=self.guidance(pipe, request),
            true_cfg=self.true_cfg(pipe, request),
            height=height if images is not None else (request.height or height),
            width=width if images is not None else (request.width or width),
            scheduler=self.sampler(pipe, request),
            loras=dict(lora_key(request.loras)),
            strength=self.strength(pipe, request),
            image_sha256=list(request.image_sha256),
            mask_sha256=request.mask_sha256,
        )

    def sampler(self, pipe: Any, request: RequestSpec) -> str:
        """The sampler the request runs with: a name this family accepts, or the checkpoint's scheduler."""
        name = request.scheduler
        if name is None:
            return type(pipe.scheduler).__name__
        if name not in self.samplers:
            accepted = ", ".join(self.samplers) or "none: only the checkpoint's own scheduler"
            raise RequestError("scheduler", f"unknown scheduler {name!r} for {self.name}; it accepts {accepted}")
        return name

    def batch_key(self, pipe: Any, embeds: Tensors, request: RequestSpec, images: ImageInputs | None = None) -> tuple:
        """Requests with equal keys can run as one pipeline call: same settings, same tensor shapes."""
        params = self.resolve_params(pipe, request, images)
        inputs = () if images is None else tuple(sorted((k, tuple(t.shape[1:])) for k, t in images.tensors.items()))
        settings = (params.steps, params.guidance, params.true_cfg, params.height, params.width, params.scheduler)
        return (*settings, request.workflow, params.strength, self.embeds_key(embeds), inputs, lora_key(request.loras))

    def embeds_key(self, embeds: Tensors) -> tuple:
        """What of the embeddings must agree to batch: each tensor's shape past the batch axis, and dtype."""
        return tuple(sorted((name, tuple(t.shape[1:]), str(t.dtype)) for name, t in embeds.items()))

    def batch_embeds(self, items: list[tuple[Tensors, int]]) -> Tensors:
        """Stack each request's embeddings (batch of one), repeated once per image it asked for."""
        names = items[0][0].keys()
        return {
            name: torch.cat([embeds[name].expand(count, *embeds[name].shape[1:]) for embeds, count in items])
            for name in names
        }

    def check_size(self, pipe: Any, params: ResolvedParams) -> None:
        multiple = self.size_multiple(pipe)
        for side in ("height", "width"):
            value = getattr(params, side)
            if value % multiple:
                raise RequestError(side, f"{side} must be a multiple of {multiple} for {self.name} (got {value})")

    def denoise(
        self,
        pipe: Any,
        batch: list[tuple[Tensors, RequestSpec]],
        on_step: StepFn,
        images: list[ImageInputs | None] | None = None,
        on_latents: LatentsFn | None = None,
        adapters: LoraAdapters | None = None,
    ) -> list[tuple[torch.Tensor, ResolvedParams]]:
        """Requests with one batch key -> per request, latents (num_images, C, h, w) on CPU and params.

        Image i of a request with seed S uses its own generator seeded S + i, so batching changes
        nothing in the result. With images in (``images``, one per request), each generator goes on
        from where the image encoder's sampling left it. ``adapters`` activates each request's LoRA
        adapters; requests with different ones (which the batch key keeps apart) run one set after
        another, without previews.
        """
        images = images or [None] * len(batch)
        groups: dict[tuple, list[int]] = {}
        for index, (_, request) in enumerate(batch):
            groups.setdefault(lora_key(request.loras), []).append(index)
        if len(groups) > 1:
            results: list[Any] = [None] * len(batch)
            for indices in groups.values():
                part = self.denoise(
                    pipe, [batch[i] for i in indices], on_step, images=[images[i] for i in indices], adapters=adapters
                )
                for i, result in zip(indices, part, strict=True):
                    results[i] = result
            return results
        if adapters is not None:
            adapters.activate(batch[0][1].loras)
        elif batch[0][1].loras:
            raise RequestError("loras", f"this {self.name} denoiser serves no LoRA adapters (it has no --lora-dir)")
        params = [
            self.resolve_params(pipe, request, inputs) for (_, request), inputs in zip(batch, images, strict=True)
        ]
        first, workflow = params[0], batch[0][1].workflow
        runner = self.pipeline_for(pipe, workflow)
        self.check_size(pipe, first)
        counts = [request.num_images for _, request in batch]
        generators = [
            torch.Generator("cpu").manual_seed(request.seed + i)
            for _, request in batch
            for i in range(request.num_images)
        ]
        size: dict[str, Any] = {"height": first.height, "width": first.width}
        if workflow != TEXT_TO_IMAGE:
            states = torch.cat([inputs.generator_state for inputs in images if inputs is not None])
            for generator, state in zip(generators, states, strict=True):
                generator.set_state(state.clone())
            size = {name: value for name, value in size.items() if self.takes(runner, name)}
            size |= self.image_kwargs(runner, [inputs for inputs in images if inputs is not None], first)
        embeds = self.batch_embeds([(embeds, request.num_images) for embeds, request in batch])
        kwargs: dict[str, Any] = {
            **self.embed_kwargs(pipe, embeds),
            **self.extra_kwargs(pipe, batch[0][1]),
            "num_inference_steps": first.steps,
            **self.guidance_kwargs(first),
            **size,
            "num_images_per_prompt": 1,
            "generator": generators,
            "output_type": "latent",
            **self._progress_kwargs(runner, first.steps, on_step, on_latents),
        }
        with self._scheduler(runner, first.scheduler):
            latents = self.latents_of(runner(**kwargs)).cpu()
        return list(zip(latents.split(counts), params, strict=True))

    def image_kwargs(self, runner: Any, images: list[ImageInputs], params: ResolvedParams) -> dict[str, Any]:
        """The pipeline arguments of images in: each request's tensors stacked, on the denoiser's device."""
        denoiser = getattr(runner, self.denoiser_attr)
        kwargs: dict[str, Any] = {
            name: torch.cat([inputs.tensors[name] for inputs in images]).to(
                denoiser.device, denoiser.dtype if images[0].tensors[name].is_floating_point() else torch.float32
            )
            for name in images[0].tensors
        }
        return kwargs | {"strength": params.strength}

    @staticmethod
    @contextlib.contextmanager
    def _scheduler(pipe: Any, name: str) -> Iterator[None]:
        """Run with the named sampler built from the checkpoint's scheduler config, then put it back."""
        if name not in SAMPLERS:  # the checkpoint's own
            yield
            return
        original = pipe.scheduler
        pipe.scheduler = SAMPLERS[name].build(original.config)
        try:
            yield
        finally:
            pipe.scheduler = original

    def latents_of(self, output: Any) -> torch.Tensor:
        """The latents in a pipeline's output with output_type="latent"."""
        return output.images

    @staticmethod
    def _progress_kwargs(pipe: Any, steps: int, on_step: StepFn, on_latents: LatentsFn | None = None) -> dict[str, Any]:
        """The pipeline's step callback: each step reported, and its latents shown to ``on_latents`` first."""
        parameters = _call_parameters(type(pipe))
        if "callback_on_step_end" in parameters:

            def on_step_end(pipe: Any, i: int, t: Any, callback_kwargs: dict) -> dict:
                if on_latents is not None and "latents" in callback_kwargs:  # diffusers' default tensor input
                    on_latents(callback_kwargs["latents"])
                on_step(i + 1, int(getattr(pipe, "num_timesteps", None) or steps))
                return callback_kwargs

            return {"callback_on_step_end": on_step_end}
        if "callback" in parameters:

            def callback(i: int, t: Any, latents: torch.Tensor) -> None:
                if on_latents is not None:
                    on_latents(latents)
                on_step(i + 1, steps)

            return {"callback": callback, "callback_steps": 1}
        return {}

    # --- stage 3: decode --------------------------------------------------------------------

    def decode_latents(self, pipe: Any, latents: torch.Tensor, params: ResolvedParams) -> torch.Tensor:
        """Latents -> image tensor in [-1, 1], (B, 3, H, W): the VAE with this family's scaling."""
        vae = pipe.vae
        latents = latents.to(vae.device, vae.dtype)
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]

    def decode(self, pipe: Any, latents: torch.Tensor, params: ResolvedParams) -> list[Image.Image]:
        image = self.decode_latents(pipe, latents, params)
        return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * image.shape[0])


class TransformerFamily(Family):
    """A DiT pipeline with one tokenizer and text encoder, the layout of most current families."""

    components: ClassVar[dict[str, tuple[str, ...]]] = {
        ENCODER: ("tokenizer", "text_encoder"),
        DENOISER: ("transformer", "scheduler"),
        DECODER: ("vae",),
    }
    cuda_dtype: ClassVar[torch.dtype] = torch.bfloat16
    denoiser_attr: ClassVar[str] = "transformer"
    samplers: ClassVar[tuple[str, ...]] = FLOW_SAMPLERS


def draw_as_the_masked_encode(runner: Any) -> None:
    """Make a denoiser's Stable Diffusion (XL) inpainting pipeline draw from each generator, after preparing
    the mask, what its VAE encode of the masked image draws there when run whole (one latent sample):
    the masked image's latents come ready (or unused), but the generators' later draws, a stochastic
    sampler's noise, must come from where they would."""
    if getattr(runner, "_draws_as_the_masked_encode", False):
        return
    prepare_mask_latents = runner.prepare_mask_latents

    def prepare(
        mask: torch.Tensor,
        masked_image: torch.Tensor | None,
        batch_size: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        do_classifier_free_guidance: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        prepared = prepare_mask_latents(
            mask, masked_image, batch_size, height, width, dtype, device, generator, do_classifier_free_guidance
        )
        scale = runner.vae_scale_factor
        shape = (1, runner.vae.config.latent_channels, height // scale, width // scale)
        for each in generator if isinstance(generator, list) else [generator]:
            torch.randn(shape, generator=each, dtype=torch.float32)
        return prepared

    runner.prepare_mask_latents = prepare
    runner._draws_as_the_masked_encode = True
