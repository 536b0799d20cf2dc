"""Instruction editing (FLUX.1 Kontext, Qwen-Image-Edit): the split stages equal diffusers' own pipelines."""

from __future__ import annotations

import pytest
import torch

from protocol.errors import RequestError
from tests.family_parity import max_difference, pipeline, png_bytes, request_spec, split_run
from tests.test_images_in import init_image

PROMPT = "make the disc a sun"


def _reference(path, seed: int, **kwargs):
    """diffusers' image, and its latents after the last step. The tiny models' images show little of
    the image's latents (10% off moves few pixels by 1/255), so the latents are compared too, closely."""
    final = {}

    def keep(pipe, step, timestep, tensors):
        final["latents"] = tensors["latents"].clone()
        return tensors

    generator = torch.Generator("cpu").manual_seed(seed)
    image = pipeline(path)(**kwargs, generator=generator, callback_on_step_end=keep).images[0]
    return image, final["latents"]


# --- FLUX.1 Kontext -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "count", "size"),
    [
        ({"guidance": 3.0}, 2, (1024, 1024)),  # the default 1024 px; the image auto-resized to 1248 x 832
        ({"height": 64, "width": 96, "true_cfg": 2.0, "negative_prompt": "fog"}, 1, (1248, 832)),
    ],
)
def test_flux_kontext_edit_equals_diffusers(family_checkpoint, options, count, size):
    path = family_checkpoint("flux-kontext")
    image = init_image(96, 64)
    data = png_bytes(image)
    request = request_spec(path.name, prompt=PROMPT, steps=2, seed=5, num_images=count, images=[data], **options)
    images, latents = edit_run(path, request, [data])
    names = {"guidance": "guidance_scale", "true_cfg": "true_cfg_scale"}
    kwargs = {"prompt": PROMPT, "image": image, "num_inference_steps": 2}
    kwargs |= {names.get(name, name): value for name, value in options.items()}
    for index, got in enumerate(images):
        expected, expected_latents = _reference(path, 5 + index, **kwargs)
        assert got.size == expected.size == size  # about max_area pixels at the asked-for aspect ratio
        assert max_difference(got, expected) <= 1, f"image {index}"
        torch.testing.assert_close(latents[index : index + 1], expected_latents, atol=1e-6, rtol=0)


def test_flux_kontext_text_to_image_equals_diffusers(family_checkpoint):
    path = family_checkpoint("flux-kontext")
    request = request_spec(path.name, prompt=PROMPT, steps=2, seed=3, height=256, width=128)
    (got,) = split_run(path, request)
    expected, _ = _reference(path, 3, prompt=PROMPT, num_inference_steps=2, height=256, width=128)
    assert got.size == expected.size == (720, 1440)
    assert max_difference(got, expected) <= 1


@pytest.mark.parametrize(
    ("field", "images", "extra"),
    [
        ("image", 2, {}),  # Kontext reads one image
        ("mask", 1, {"mask": True}),
        ("strength", 1, {"strength": 0.5}),
    ],
)
def test_flux_kontext_refuses_what_it_does_not_take(family_checkpoint, field, images, extra):
    path = family_checkpoint("flux-kontext")
    data = [png_bytes(init_image(96, 64))] * images
    mask = png_bytes(init_image(96, 64).convert("L")) if extra.pop("mask", False) else None
    request = request_spec(path.name, prompt=PROMPT, steps=2, seed=1, images=data, mask=mask, **extra)
    with pytest.raises(RequestError) as info:
        split_run(path, request, images=data, mask=mask)
    assert info.value.field == field


# --- Qwen-Image-Edit: the text encoder reads the images too ---------------------------------------


def edit_run(path, request, images: list[bytes]):
    """``split_run`` with the encoder given the images, as the images-in plan sends them (EncodeJob.images):
    the decoded images and the denoiser's latents."""
    import io

    from PIL import Image

    from decoder_node.handler import DecoderHandler
    from decoder_node.png import encode_png
    from encoder_node.handler import EncoderHandler
    from protocol.messages import DecodeJob, DenoisedLatents, DenoiseJob, EncodeImagesJob, EncodeJob
    from protocol.stages import DECODER, DENOISER, ENCODER
    from tests.family_parity import stage, wire
    from triptych.families.loading import denoiser_config

    encoder, denoiser, decoder = stage(path, ENCODER), stage(path, DENOISER), stage(path, DECODER)
    with torch.inference_mode():
        [embeddings] = EncoderHandler(encoder)(
            [wire(EncodeJob(job_id="e", request_id="r", request=request, images=images))], None
        )
        embeddings = wire(embeddings)
        handler = DecoderHandler(decoder, denoiser_config(str(path), decoder.family))
        [encoded] = handler([wire(EncodeImagesJob(job_id="i", request_id="r", request=request, images=images))], None)
        job = wire(
            DenoiseJob(
                job_id="d", request_id="r", request=request, embeds=embeddings.embeds, images=wire(encoded).inputs
            )
        )
        [(latents, params)] = denoiser.family.denoise(
            denoiser.pipe, [(job.embeds, job.request)], lambda s, t: None, images=[job.images]
        )
        denoised = wire(DenoisedLatents(job_id="d", latents=latents.contiguous(), params=params))
        out = []
        for index in range(request.num_images):
            row = denoised.latents[index : index + 1]
            decode = wire(DecodeJob(job_id="x", request_id="r", params=denoised.params, index=index, latents=row))
            (image,) = decoder.family.decode(decoder.pipe, decode.latents, decode.params)
            out.append(Image.open(io.BytesIO(encode_png(image, decode.params, index))).convert("RGB"))
    return out, denoised.latents


def _edit_reference(path, seed: int, count: int, **kwargs):
    """diffusers' pipeline for ``count`` images, image i from a generator seeded seed + i; and its last latents."""
    final = {}

    def keep(pipe, step, timestep, tensors):
        final["latents"] = tensors["latents"].clone()
        return tensors

    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]
    output = pipeline(path)(**kwargs, num_images_per_prompt=count, generator=generators, callback_on_step_end=keep)
    return output.images, final["latents"]


def test_qwenimage_edit_equals_diffusers(family_checkpoint):
    path = family_checkpoint("qwenimage-edit")
    image = init_image(96, 64)
    data = png_bytes(image)
    options = {"height": 64, "width": 96, "true_cfg": 2.0, "negative_prompt": "blurry"}
    request = request_spec(path.name, prompt=PROMPT, steps=2, seed=5, num_images=2, images=[data], **options)
    images, latents = edit_run(path, request, [data])
    kwargs = {"image": image, "prompt": PROMPT, "num_inference_steps": 2, "height": 64, "width": 96}
    expected, expected_latents = _edit_reference(path, 5, 2, **kwargs, true_cfg_scale=2.0, negative_prompt="blurry")
    torch.testing.assert_close(latents, expected_latents, atol=1e-6, rtol=0)
    for index, (got, want) in enumerate(zip(images, expected, strict=True)):
        assert got.size == want.size == (96, 64)
        assert max_difference(got, want) <= 1, f"image {index}"


def test_qwenimage_edit_plus_with_two_images_equals_diffusers(family_checkpoint):
    from PIL import Image

    path = family_checkpoint("qwenimage-edit-plus")
    first, second = init_image(96, 64), init_image(64, 64).transpose(Image.FLIP_LEFT_RIGHT)
    data = [png_bytes(first), png_bytes(second)]
    request = request_spec(path.name, prompt=PROMPT, steps=2, seed=9, num_images=2, images=data, height=64, width=64)
    images, latents = edit_run(path, request, data)
    kwargs = {"image": [first, second], "prompt": PROMPT, "num_inference_steps": 2, "height": 64, "width": 64}
    expected, expected_latents = _edit_reference(path, 9, 2, **kwargs)
    torch.testing.assert_close(latents, expected_latents, atol=1e-6, rtol=0)
    for index, (got, want) in enumerate(zip(images, expected, strict=True)):
        assert max_difference(got, want) <= 1, f"image {index}"


def test_the_edit_text_encoder_reads_the_image(family_checkpoint):
    """Same prompt, another image: other embeddings, and the encoder's cache tells the two apart."""
    from encoder_node.handler import EncoderHandler
    from protocol.messages import EncodeJob
    from protocol.stages import ENCODER
    from tests.family_parity import stage, wire

    path = family_checkpoint("qwenimage-edit")
    handler = EncoderHandler(stage(path, ENCODER))
    results = []
    for data in (
        png_bytes(init_image(96, 64)),
        png_bytes(init_image(96, 64).rotate(180)),
        png_bytes(init_image(96, 64)),
    ):
        request = request_spec(path.name, prompt=PROMPT, seed=1, images=[data])
        [embeddings] = handler([wire(EncodeJob(job_id="e", request_id="r", request=request, images=[data]))], None)
        results.append(embeddings.embeds["prompt_embeds"])
    assert not torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], results[2], rtol=0, atol=0)
    assert (handler.cache.misses, handler.cache.hits) == (2, 1)


@pytest.mark.parametrize(
    ("family", "count", "extra", "field"),
    [
        ("qwenimage-edit", 2, {}, "image"),  # Qwen-Image-Edit reads one image
        ("qwenimage-edit-plus", 4, {}, "image"),  # Plus, at most three
        ("qwenimage-edit", 0, {}, "image"),  # an edit without an image
        ("qwenimage-edit", 1, {"strength": 0.5}, "strength"),
        ("qwenimage-edit", 1, {"mask": True}, "mask"),
    ],
)
def test_qwenimage_edit_refuses_what_it_does_not_take(family_checkpoint, family, count, extra, field):
    from decoder_node.handler import DecoderHandler
    from encoder_node.handler import EncoderHandler
    from protocol.messages import EncodeImagesJob, GenerateRequest
    from protocol.plans import IMAGES_IN, TEXT_TO_IMAGE, PlanContext, plan_for
    from protocol.stages import DECODER, ENCODER
    from tests.family_parity import stage, wire
    from triptych.families.loading import denoiser_config

    path = family_checkpoint(family)
    data = [png_bytes(init_image(48 + 8 * i, 64)) for i in range(count)]
    mask = png_bytes(init_image(96, 64).convert("L")) if extra.pop("mask", False) else None
    generate = GenerateRequest(request_id="r", model=path.name, prompt=PROMPT, seed=1, images=data, mask=mask, **extra)
    plan = plan_for(generate)
    assert plan is (IMAGES_IN if count else TEXT_TO_IMAGE)
    [encode_job] = plan.stages[0].jobs(PlanContext(request=generate, results={}))
    assert encode_job.images == ([] if mask else data)  # the images go to the encoder, unless it is inpainting
    with pytest.raises(RequestError) as info:
        EncoderHandler(stage(path, ENCODER))([wire(encode_job)], None)
    assert info.value.field == field
    if count:  # the decoder node refuses them too, before any VAE work
        job = EncodeImagesJob(job_id="i", request_id="r", request=generate.spec(), images=data, mask=mask)
        decoder = stage(path, DECODER)
        with pytest.raises(RequestError) as info:
            DecoderHandler(decoder, denoiser_config(str(path), decoder.family))([wire(job)], None)
        assert info.value.field == field


# --- FLUX.2 with reference images ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "options"),
    [
        ([(96, 64)], {"guidance": 3.0}),  # the first image's size
        ([(96, 64), (64, 80)], {"height": 64, "width": 64}),  # two references, the request's size
    ],
)
def test_flux2_with_reference_images_equals_diffusers(family_checkpoint, sizes, options):
    path = family_checkpoint("flux2")
    references = [init_image(width, height) for width, height in sizes]
    data = [png_bytes(image) for image in references]
    request = request_spec(path.name, prompt=PROMPT, steps=2, seed=3, num_images=2, images=data, **options)
    images, latents = edit_run(path, request, data)
    names = {"guidance": "guidance_scale"}
    kwargs = {"prompt": PROMPT, "image": references, "num_inference_steps": 2}
    kwargs |= {names.get(name, name): value for name, value in options.items()}
    for index, got in enumerate(images):
        expected, expected_latents = _reference(path, 3 + index, **kwargs)
        assert got.size == expected.size == (options.get("width", 96), options.get("height", 64))
        assert max_difference(got, expected) <= 1, f"image {index}"
        torch.testing.assert_close(latents[index : index + 1], expected_latents, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("family", "extra", "field"), [("flux2", {"strength": 0.5}, "strength"), ("flux2-klein", {}, "image")]
)
def test_flux2_refuses_what_it_does_not_take(family_checkpoint, family, extra, field):
    path = family_checkpoint(family)
    data = [png_bytes(init_image(96, 64))]
    request = request_spec(path.name, prompt=PROMPT, steps=2, seed=1, images=data, **extra)
    with pytest.raises(RequestError) as info:
        edit_run(path, request, data)
    assert info.value.field == field


def test_qwenimage_edit_requests_batch_like_alone(family_checkpoint):
    """Two edits of two images in one denoising batch: each gets what it gets alone."""
    from PIL import Image

    from decoder_node.handler import DecoderHandler
    from encoder_node.handler import EncoderHandler
    from protocol.messages import EncodeImagesJob, EncodeJob
    from protocol.stages import DECODER, DENOISER, ENCODER
    from tests.family_parity import stage, wire
    from triptych.families.loading import denoiser_config

    path = family_checkpoint("qwenimage-edit")
    encoder, denoiser, decoder = stage(path, ENCODER), stage(path, DENOISER), stage(path, DECODER)
    images = [png_bytes(init_image(96, 64)), png_bytes(init_image(96, 64).transpose(Image.FLIP_LEFT_RIGHT))]
    options = {"steps": 2, "height": 64, "width": 96}
    requests = [
        request_spec(path.name, prompt=prompt, seed=seed, num_images=count, images=[data], **options)
        for prompt, seed, count, data in [(PROMPT, 3, 2, images[0]), ("make it night", 7, 1, images[1])]
    ]
    handler = DecoderHandler(decoder, denoiser_config(str(path), decoder.family))
    jobs = []
    with torch.inference_mode():
        for request, data in zip(requests, images, strict=True):
            [embeddings] = EncoderHandler(encoder)(
                [wire(EncodeJob(job_id="e", request_id="r", request=request, images=[data]))], None
            )
            [encoded] = handler(
                [wire(EncodeImagesJob(job_id="i", request_id="r", request=request, images=[data]))], None
            )
            jobs.append((wire(embeddings).embeds, request, wire(encoded).inputs))
        family, pipe = denoiser.family, denoiser.pipe
        assert len({family.batch_key(pipe, e, r, i) for e, r, i in jobs}) == 1
        batched = family.denoise(pipe, [(e, r) for e, r, _ in jobs], lambda s, t: None, images=[i for *_, i in jobs])
        alone = [family.denoise(pipe, [(e, r)], lambda s, t: None, images=[i])[0] for e, r, i in jobs]
    for (together, _), (single, _) in zip(batched, alone, strict=True):
        torch.testing.assert_close(together, single, atol=1e-5, rtol=0)
