"""Inpainting for SD 1/2 with stochastic samplers, SDXL, SD3 and FLUX.1: the split stages equal diffusers' own inpainting pipelines.

Each image i of a request is compared with the diffusers pipeline run whole for that image alone,
with a generator seeded seed + i: the text-to-image checkpoint through ``from_pipe`` (the same
components), or a dedicated inpainting checkpoint loaded as itself.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from protocol.errors import RequestError
from tests.family_parity import max_difference, pipeline, png_bytes, request_spec, split_run
from tests.test_images_in import init_image, mask_image

PROMPT = "a watercolor of a heron"


def reference(pipeline_class: str, path, seed: int, scheduler: str | None = None, **kwargs) -> Image.Image:
    """diffusers' ``pipeline_class`` over the checkpoint's components, one image, generator seeded ``seed``;
    ``scheduler``: a sampler of triptych.families.samplers in place of the checkpoint's scheduler."""
    import diffusers

    from triptych.families.samplers import SAMPLERS

    pipe = getattr(diffusers, pipeline_class).from_pipe(pipeline(path))
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = SAMPLERS[scheduler].build(pipe.scheduler.config)
    return pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def check_inpaint(path, pipeline_class: str, seed: int, options: dict, image: Image.Image, mask: Image.Image) -> None:
    """Two images of one request through the split stages, each equal to diffusers' for its seed."""
    data, mask_data = png_bytes(image), png_bytes(mask)
    request = request_spec(
        path.name, prompt=PROMPT, steps=4, seed=seed, num_images=2, images=[data], mask=mask_data, **options
    )
    images = split_run(path, request, images=[data], mask=mask_data)
    arguments = {"guidance": "guidance_scale", "strength": "strength", "height": "height", "width": "width"}
    arguments |= {"negative_prompt": "negative_prompt"}
    kwargs = {"prompt": PROMPT, "image": image, "mask_image": mask, "num_inference_steps": 4}
    kwargs |= {arguments[name]: value for name, value in options.items() if name in arguments}
    for index, got in enumerate(images):
        expected = reference(pipeline_class, path, seed + index, options.get("scheduler"), **kwargs)
        assert got.size == expected.size
        assert max_difference(got, expected) <= 1, f"image {index}"


# --- Stable Diffusion 1.x / 2.x -------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m_sde_karras"])
def test_sd_inpaint_with_a_stochastic_sampler_equals_diffusers(family_checkpoint, scheduler):
    """The per-step draws come from where diffusers' do, after its masked image encode on the same generator."""
    options = {"guidance": 6.0, "strength": 0.8, "scheduler": scheduler}
    check_inpaint(family_checkpoint("sd"), "StableDiffusionInpaintPipeline", 31, options, init_image(), mask_image())


# --- Stable Diffusion XL ----------------------------------------------------------------------


@pytest.mark.parametrize("strength", [None, 1.0, 0.6])
def test_sdxl_inpaint_with_the_text_to_image_checkpoint_equals_diffusers(family_checkpoint, strength):
    options = {"height": 64, "width": 96, "guidance": 5.0} | ({"strength": strength} if strength else {})
    # A mask of another size than the image: both are resized to the requested size, as diffusers does.
    check_inpaint(family_checkpoint("sdxl"), "StableDiffusionXLInpaintPipeline", 11, options, init_image(),
                  mask_image(48, 40))  # fmt: skip


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_sdxl_inpainting_checkpoint_equals_diffusers(family_checkpoint, strength):
    options = {"height": 64, "width": 96, "guidance": 5.0, "strength": strength, "negative_prompt": "blurry"}
    path = family_checkpoint("sdxl-inpainting")
    check_inpaint(path, "StableDiffusionXLInpaintPipeline", 5, options, init_image(), mask_image())


@pytest.mark.parametrize("family", ["sdxl", "sdxl-inpainting"])
def test_sdxl_inpaint_with_a_stochastic_sampler_equals_diffusers(family_checkpoint, family):
    """The generators' per-step draws (euler_a) come from where diffusers' do, after its masked image encode."""
    options = {"height": 64, "width": 96, "guidance": 5.0, "strength": 0.8, "scheduler": "euler_a"}
    check_inpaint(family_checkpoint(family), "StableDiffusionXLInpaintPipeline", 23, options, init_image(),
                  mask_image())  # fmt: skip


def test_sdxl_inpainting_checkpoint_refuses_img2img_and_text_to_image(family_checkpoint):
    path = family_checkpoint("sdxl-inpainting")
    data = png_bytes(init_image())
    with pytest.raises(RequestError, match="inpainting checkpoint: it needs a mask") as info:
        split_run(path, request_spec(path.name, prompt=PROMPT, steps=2, seed=1, images=[data]), images=[data])
    assert info.value.field == "mask"
    with pytest.raises(RequestError, match="inpainting checkpoint"):
        split_run(path, request_spec(path.name, prompt=PROMPT, steps=2, seed=1))


# --- Stable Diffusion 3 -----------------------------------------------------------------------


@pytest.mark.parametrize("strength", [None, 1.0])
def test_sd3_inpaint_equals_diffusers(family_checkpoint, strength):
    options = {"height": 64, "width": 96, "guidance": 5.0} | ({"strength": strength} if strength else {})
    check_inpaint(family_checkpoint("sd3"), "StableDiffusion3InpaintPipeline", 7, options, init_image(),
                  mask_image(30, 20))  # fmt: skip


# --- FLUX.1 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [None, 0.85])
def test_flux_inpaint_equals_diffusers(family_checkpoint, strength):
    options = {"height": 64, "width": 96, "guidance": 3.0} | ({"strength": strength} if strength else {})
    check_inpaint(family_checkpoint("flux"), "FluxInpaintPipeline", 13, options, init_image(), mask_image(120, 80))


@pytest.mark.parametrize("strength", [None, 0.8])
def test_flux_fill_checkpoint_equals_diffusers(family_checkpoint, strength):
    options = {"height": 64, "width": 96, "guidance": 30.0} | ({"strength": strength} if strength else {})
    check_inpaint(family_checkpoint("flux-fill"), "FluxFillPipeline", 17, options, init_image(), mask_image())


def test_flux_fill_checkpoint_refuses_img2img_and_text_to_image(family_checkpoint):
    path = family_checkpoint("flux-fill")
    data = png_bytes(init_image(64, 64))
    request = request_spec(path.name, prompt=PROMPT, steps=2, seed=1, images=[data], height=64, width=64)
    with pytest.raises(RequestError, match="FluxFillPipeline is an inpainting checkpoint: it needs a mask") as info:
        split_run(path, request, images=[data])
    assert info.value.field == "mask"
    with pytest.raises(RequestError, match="inpainting checkpoint"):
        split_run(path, request_spec(path.name, prompt=PROMPT, steps=2, seed=1, height=64, width=64))


# --- batching ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sdxl", "sdxl-inpainting", "sd3", "flux", "flux-fill"])
def test_inpaint_requests_batch_like_alone(family_checkpoint, family):
    """Two inpainting requests (other images, masks, seeds, counts) in one denoising batch: each gets what it gets alone."""
    from decoder_node.handler import DecoderHandler
    from protocol.messages import EncodeImagesJob
    from protocol.stages import DECODER, DENOISER, ENCODER
    from tests.family_parity import stage, wire
    from triptych.families.loading import denoiser_config

    path = family_checkpoint(family)
    encoder, denoiser, decoder = stage(path, ENCODER), stage(path, DENOISER), stage(path, DECODER)
    flipped = mask_image().transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    inputs = [
        (PROMPT, 3, 2, png_bytes(init_image()), png_bytes(mask_image())),
        ("a red fox", 8, 1, png_bytes(init_image().transpose(Image.Transpose.FLIP_LEFT_RIGHT)), png_bytes(flipped)),
    ]
    handler = DecoderHandler(decoder, denoiser_config(str(path), decoder.family))
    jobs = []
    with torch.inference_mode():
        for prompt, seed, count, data, mask in inputs:
            request = request_spec(
                path.name, prompt=prompt, steps=3, seed=seed, num_images=count, images=[data], mask=mask,
                height=64, width=96, strength=0.8, guidance=4.0,
            )  # fmt: skip
            job = EncodeImagesJob(job_id="i", request_id="r", request=request, images=[data], mask=mask)
            [encoded] = handler([wire(job)], None)
            jobs.append((encoder.family.encode(encoder.pipe, request), request, wire(encoded).inputs))
        family_, pipe = denoiser.family, denoiser.pipe
        assert len({family_.batch_key(pipe, e, r, i) for e, r, i in jobs}) == 1
        batched = family_.denoise(pipe, [(e, r) for e, r, _ in jobs], lambda s, t: None, images=[i for *_, i in jobs])
        alone = [family_.denoise(pipe, [(e, r)], lambda s, t: None, images=[i])[0] for e, r, i in jobs]
    for (together, _), (single, _) in zip(batched, alone, strict=True):
        torch.testing.assert_close(together, single, atol=1e-4, rtol=1e-4)


# --- what each family refuses or ignores ------------------------------------------------------


def test_sd3_inpaint_sides_must_be_whole_patches(family_checkpoint):
    path = family_checkpoint("sd3")
    data, mask = png_bytes(init_image()), png_bytes(mask_image())
    request = request_spec(path.name, prompt=PROMPT, steps=2, seed=1, images=[data], mask=mask, height=72, width=96)
    with pytest.raises(RequestError, match="height must be a multiple of 16") as info:
        split_run(path, request, images=[data], mask=mask)
    assert info.value.field == "height"


def test_flux_fill_has_only_the_distilled_guidance(family_checkpoint):
    path = family_checkpoint("flux-fill")
    data, mask = png_bytes(init_image()), png_bytes(mask_image())
    request = request_spec(
        path.name, prompt=PROMPT, steps=2, seed=1, images=[data], mask=mask, height=64, width=96, true_cfg=4.0,
        negative_prompt="blurry",
    )  # fmt: skip
    with pytest.raises(RequestError, match="FluxFillPipeline has no true_cfg_scale") as info:
        split_run(path, request, images=[data], mask=mask)
    assert info.value.field == "true_cfg"
    from tests.family_parity import stage

    encoder = stage(path, "encoder")
    request = request_spec(path.name, prompt=PROMPT, seed=1, images=[data], mask=mask, negative_prompt="blurry")
    assert not any(name.startswith("negative_") for name in encoder.family.encode(encoder.pipe, request))
    assert encoder.family.warnings(encoder.pipe, request) == [
        "the negative prompt is ignored: FluxFillPipeline takes no negative prompt"
    ]


# --- through real node processes ---------------------------------------------------------------


@pytest.mark.e2e
def test_flux_fill_through_the_nodes_equals_diffusers(family_checkpoint, tmp_path_factory):
    from tests.support import max_pixel_difference, serving

    path = family_checkpoint("flux-fill")
    image, mask = init_image(), mask_image()
    with serving(tmp_path_factory.mktemp("flux-fill-cluster"), [path]) as cluster, cluster.client() as client:
        images = client.generate(
            PROMPT, model=path.name, image=image, mask=png_bytes(mask), steps=4, seed=19, num_images=2,
            height=64, width=96, guidance=30.0,
        )  # fmt: skip
    for index, got in enumerate(images):
        kwargs = {"prompt": PROMPT, "image": image, "mask_image": mask, "num_inference_steps": 4}
        kwargs |= {"height": 64, "width": 96, "guidance_scale": 30.0}
        expected = reference("FluxFillPipeline", path, 19 + index, **kwargs)
        assert max_pixel_difference(got.png, expected) <= 1, f"image {index}"
        assert got.params["mask_sha256"] and got.params["strength"] == 1.0
