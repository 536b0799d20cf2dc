"""Images in: img2img and inpainting through the split stages equal diffusers' own pipelines."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from protocol.errors import RequestError
from tests.family_parity import max_difference, png_bytes, request_spec, split_run

PROMPT = "a watercolor of a heron"


def init_image(width: int = 96, height: int = 64) -> Image.Image:
    """A picture with structure: a gradient, a disc and a bar."""
    x = np.linspace(0, 255, width, dtype=np.uint8)
    y = np.linspace(255, 0, height, dtype=np.uint8)
    pixels = np.stack([np.tile(x, (height, 1)), np.tile(y[:, None], (1, width)), np.full((height, width), 90)], -1)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 4, height // 4, width // 2, height * 3 // 4), fill=(250, 200, 20))
    draw.rectangle((width * 2 // 3, 4, width * 2 // 3 + 8, height - 4), fill=(20, 30, 200))
    return image


def mask_image(width: int = 96, height: int = 64) -> Image.Image:
    """White repaints (a box on the right), black keeps."""
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((width // 2, height // 4, width - 8, height - 8), fill=255)
    return mask


def _reference(pipeline_class: str, path, seed: int, **kwargs) -> Image.Image:
    import diffusers

    from tests.family_parity import pipeline

    pipe = getattr(diffusers, pipeline_class).from_pipe(pipeline(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed)).images[0]


@pytest.mark.parametrize("strength", [0.6, None])
def test_sd_img2img_equals_diffusers(family_checkpoint, strength):
    path = family_checkpoint("sd")
    image = init_image()
    data = png_bytes(image)
    options = {"guidance": 6.0, "negative_prompt": "blurry", **({"strength": strength} if strength else {})}
    request = request_spec(path.name, prompt=PROMPT, steps=5, seed=21, num_images=2, images=[data], **options)
    images = split_run(path, request, images=[data])
    for index, got in enumerate(images):
        kwargs = {"prompt": PROMPT, "image": image, "num_inference_steps": 5, "guidance_scale": 6.0}
        kwargs |= {"negative_prompt": "blurry"} | ({"strength": strength} if strength else {})
        expected = _reference("StableDiffusionImg2ImgPipeline", path, 21 + index, **kwargs)
        assert got.size == (96, 64)  # the init image's size, as the pipeline makes it
        assert max_difference(got, expected) <= 1, f"image {index}"


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_sd_inpaint_with_the_text_to_image_checkpoint_equals_diffusers(family_checkpoint, strength):
    path = family_checkpoint("sd")
    image, mask = init_image(), mask_image()
    options = {"height": 64, "width": 96, "guidance": 5.0, "strength": strength}
    request = request_spec(
        path.name, prompt=PROMPT, steps=4, seed=3, num_images=2, images=[png_bytes(image)], mask=png_bytes(mask),
        **options,
    )  # fmt: skip
    images = split_run(path, request, images=[png_bytes(image)], mask=png_bytes(mask))
    for index, got in enumerate(images):
        kwargs = {"prompt": PROMPT, "image": image, "mask_image": mask, "num_inference_steps": 4}
        kwargs |= {"guidance_scale": 5.0, "strength": strength, "height": 64, "width": 96}
        expected = _reference("StableDiffusionInpaintPipeline", path, 3 + index, **kwargs)
        assert max_difference(got, expected) <= 1, f"image {index}"


def test_img2img_metadata_records_the_image_and_strength(family_checkpoint):
    import hashlib

    from decoder_node.png import read_metadata

    path = family_checkpoint("sd")
    data = png_bytes(init_image())
    request = request_spec(path.name, prompt=PROMPT, steps=2, seed=1, images=[data], strength=0.5)
    assert request.image_sha256 == [hashlib.sha256(data).hexdigest()]
    (image,) = split_run(path, request, images=[data])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # split_run returns the decoded PNG's pixels; check its params instead
    from tests.family_parity import stage

    denoiser = stage(path, "denoiser")
    params = denoiser.family.resolve_params(denoiser.pipe, request)
    assert params.strength == 0.5 and params.image_sha256 == [hashlib.sha256(data).hexdigest()]
    from decoder_node.png import encode_png

    meta = read_metadata(encode_png(image, params))
    assert meta["strength"] == "0.5" and meta["image_sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not an image at all", "image: not an image"),
        (png_bytes(init_image())[:200], "image: the image is truncated or corrupt"),
    ],
)
def test_a_bad_image_is_named(family_checkpoint, data, message):
    path = family_checkpoint("sd")
    request = request_spec(path.name, prompt=PROMPT, steps=2, seed=1, images=[data])
    with pytest.raises(RequestError, match=message) as info:
        split_run(path, request, images=[data])
    assert info.value.field == "image"


def test_a_decompression_bomb_is_refused_before_it_is_decoded():
    from triptych.families.images import open_image

    bomb = io.BytesIO()
    Image.new("1", (40000, 40000)).save(bomb, format="PNG")  # ~200 KB on the wire, 1.6 GB decoded
    assert len(bomb.getvalue()) < 1 << 20
    with pytest.raises(RequestError, match=r"image: .*over the limit of"):
        open_image(bomb.getvalue(), "image")


def test_a_family_without_images_in_says_so(family_checkpoint):
    path = family_checkpoint("pixart-alpha")
    data = png_bytes(init_image())
    request = request_spec(path.name, prompt=PROMPT, steps=2, seed=1, images=[data])
    with pytest.raises(RequestError, match="takes no images in"):
        split_run(path, request, images=[data])


@pytest.fixture(scope="module")
def inpainting_checkpoint(family_checkpoint, tmp_path_factory):
    """A dedicated inpainting checkpoint: the tiny SD one with a 9-channel UNet (latents, mask, masked image)."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel

    base = StableDiffusionPipeline.from_pretrained(family_checkpoint("sd"))
    torch.manual_seed(7)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    components = {**base.components, "unet": unet}
    path = tmp_path_factory.mktemp("inpainting") / "sd-inpainting"
    StableDiffusionInpaintPipeline(**components).save_pretrained(path)
    return path


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_sd_inpainting_checkpoint_equals_diffusers(inpainting_checkpoint, strength):
    path = inpainting_checkpoint
    image, mask = init_image(), mask_image()
    request = request_spec(
        path.name, prompt=PROMPT, steps=4, seed=8, num_images=2, images=[png_bytes(image)], mask=png_bytes(mask),
        height=64, width=96, guidance=5.0, strength=strength,
    )  # fmt: skip
    images = split_run(path, request, images=[png_bytes(image)], mask=png_bytes(mask))
    for index, got in enumerate(images):
        kwargs = {"prompt": PROMPT, "image": image, "mask_image": mask, "num_inference_steps": 4, "height": 64}
        kwargs |= {"width": 96, "guidance_scale": 5.0, "strength": strength}
        expected = _reference("StableDiffusionInpaintPipeline", path, 8 + index, **kwargs)
        assert max_difference(got, expected) <= 1, f"image {index}"


def test_an_inpainting_checkpoint_refuses_text_to_image(inpainting_checkpoint):
    with pytest.raises(RequestError, match="inpainting checkpoint"):
        split_run(inpainting_checkpoint, request_spec(inpainting_checkpoint.name, prompt=PROMPT, steps=2, seed=1))


# --- through real node processes ---------------------------------------------------------------


@pytest.mark.e2e
def test_cli_img2img_through_the_nodes_equals_diffusers(cluster, checkpoints, tmp_path):
    from pathlib import Path

    from decoder_node.png import read_metadata
    from tests.support import max_pixel_difference

    image = init_image()
    image.save(tmp_path / "in.png")
    result = cluster.generate_cli(
        PROMPT, *("--model", "sd-tiny", "--image", str(tmp_path / "in.png"), "--strength", "0.7"),
        *("--steps", "5", "--seed", "12", "--num-images", "2", "--out", str(tmp_path / "out")),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.splitlines()]
    for index, path in enumerate(paths):
        kwargs = {"prompt": PROMPT, "image": image, "strength": 0.7, "num_inference_steps": 5}
        expected = _reference("StableDiffusionImg2ImgPipeline", checkpoints["sd-tiny"], 12 + index, **kwargs)
        assert max_pixel_difference(path, expected) <= 1, f"image {index}"
    meta = read_metadata(paths[0].read_bytes())
    import hashlib

    assert meta["strength"] == "0.7"
    assert meta["image_sha256"] == hashlib.sha256((tmp_path / "in.png").read_bytes()).hexdigest()


@pytest.mark.e2e
def test_python_api_inpaint_through_the_nodes_equals_diffusers(cluster, checkpoints):
    from tests.support import max_pixel_difference

    image, mask = init_image(), mask_image()
    with cluster.client() as client:
        (got,) = client.generate(
            PROMPT, model="sd-tiny", image=image, mask=png_bytes(mask), steps=4, seed=5, height=64, width=96
        )
    kwargs = {"prompt": PROMPT, "image": image, "mask_image": mask, "num_inference_steps": 4, "height": 64}
    expected = _reference("StableDiffusionInpaintPipeline", checkpoints["sd-tiny"], 5, **kwargs | {"width": 96})
    assert max_pixel_difference(got.png, expected) <= 1
    assert got.params["mask_sha256"] and got.params["strength"] == 1.0


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({"image": b"\x89PNG not really"}, "image", "image: not an image"),
        ({"image": "PNG", "mask": b"garbage"}, "mask", "mask: not an image"),
        ({"image": "PNG", "strength": 1.5}, "strength", "strength must be in (0, 1]"),
        ({"mask": "PNG"}, "mask", "a mask needs an image"),
        ({"image": "PNG", "height": 64}, "height", "makes the init image's size"),
    ],
)
def test_bad_images_in_are_named_and_harm_nothing(cluster, options, field, message):
    from triptych.client import GenerationError

    data = png_bytes(init_image())
    options = {name: data if value == "PNG" else value for name, value in options.items()}
    with cluster.client() as client:
        with pytest.raises(GenerationError) as info:
            client.generate(PROMPT, model="sd-tiny", steps=2, seed=1, **options)
        assert (info.value.code, info.value.field) == ("invalid_request", field)
        assert message in str(info.value)
        (image,) = client.generate(PROMPT, model="sd-tiny", steps=2, seed=1)  # the cluster still serves
    assert image.png.startswith(b"\x89PNG")


@pytest.mark.e2e
def test_openai_sdk_edit_with_a_mask_equals_diffusers_inpainting(gateway, checkpoints):
    """OpenAI's mask: fully transparent pixels mark what to edit; diffusers' white-repaints mask is its inverse."""
    import base64

    import openai

    from tests.support import max_pixel_difference

    image, mask = init_image(), mask_image()
    openai_mask = Image.new("RGBA", mask.size, (0, 0, 0, 255))
    openai_mask.putalpha(mask.point(lambda value: 0 if value > 127 else 255))  # transparent where to repaint
    sdk = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)
    result = sdk.images.edit(
        model="sd-tiny",
        image=("in.png", png_bytes(image), "image/png"),
        mask=("mask.png", png_bytes(openai_mask), "image/png"),
        prompt=PROMPT,
        n=2,
        size="96x64",
        response_format="b64_json",
        extra_body={"seed": 31, "num_inference_steps": 4, "guidance_scale": 5.0},
    )
    assert len(result.data) == 2
    for index, item in enumerate(result.data):
        kwargs = {"prompt": PROMPT, "image": image, "mask_image": mask, "num_inference_steps": 4}
        kwargs |= {"guidance_scale": 5.0, "height": 64, "width": 96}
        expected = _reference("StableDiffusionInpaintPipeline", checkpoints["sd-tiny"], 31 + index, **kwargs)
        assert max_pixel_difference(base64.b64decode(item.b64_json), expected) <= 1, f"image {index}"


@pytest.mark.e2e
def test_an_edit_with_a_bad_image_is_a_400_naming_it(gateway):
    import openai

    sdk = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.images.edit(model="sd-tiny", image=("x.png", b"not a png", "image/png"), prompt=PROMPT)
    assert info.value.body["param"] == "image"


def test_flux_img2img_equals_diffusers(family_checkpoint):
    path = family_checkpoint("flux")
    image = init_image(64, 64)
    data = png_bytes(image)
    options = {"height": 64, "width": 64, "guidance": 3.0, "strength": 0.7}
    request = request_spec(path.name, prompt=PROMPT, steps=4, seed=4, num_images=2, images=[data], **options)
    images = split_run(path, request, images=[data])
    for index, got in enumerate(images):
        kwargs = {"prompt": PROMPT, "image": image, "num_inference_steps": 4, "height": 64, "width": 64}
        kwargs |= {"guidance_scale": 3.0, "strength": 0.7}
        expected = _reference("FluxImg2ImgPipeline", path, 4 + index, **kwargs)
        assert max_difference(got, expected) <= 1, f"image {index}"


@pytest.mark.e2e
def test_flux_img2img_through_the_nodes_equals_diffusers(family_checkpoint, tmp_path_factory):
    from tests.support import max_pixel_difference, serving

    path = family_checkpoint("flux")
    image = init_image(64, 64)
    with serving(tmp_path_factory.mktemp("flux-cluster"), [path]) as cluster, cluster.client() as client:
        images = client.generate(
            PROMPT, model=path.name, image=image, strength=0.7, steps=4, seed=6, num_images=2,
            height=64, width=64, guidance=3.0,
        )  # fmt: skip
    for index, got in enumerate(images):
        kwargs = {"prompt": PROMPT, "image": image, "num_inference_steps": 4, "height": 64, "width": 64}
        kwargs |= {"guidance_scale": 3.0, "strength": 0.7}
        expected = _reference("FluxImg2ImgPipeline", path, 6 + index, **kwargs)
        assert max_pixel_difference(got.png, expected) <= 1, f"image {index}"


@pytest.mark.parametrize(
    ("family", "pipeline_class", "options", "sized"),
    [
        ("sdxl", "StableDiffusionXLImg2ImgPipeline", {"guidance": 5.0, "negative_prompt": "blurry"}, False),
        ("sd3", "StableDiffusion3Img2ImgPipeline", {"guidance": 5.0, "height": 64, "width": 96}, True),
    ],
)
def test_sdxl_and_sd3_img2img_equal_diffusers(family_checkpoint, family, pipeline_class, options, sized):
    path = family_checkpoint(family)
    image = init_image()
    data = png_bytes(image)
    request = request_spec(
        path.name, prompt=PROMPT, steps=4, seed=9, num_images=2, images=[data], strength=0.7, **options
    )
    images = split_run(path, request, images=[data])
    for index, got in enumerate(images):
        kwargs = {"prompt": PROMPT, "image": image, "num_inference_steps": 4, "strength": 0.7}
        kwargs |= {"guidance_scale": 5.0} | {
            k: v for k, v in options.items() if k in ("height", "width", "negative_prompt")
        }
        expected = _reference(pipeline_class, path, 9 + index, **kwargs)
        assert got.size == (96, 64)
        assert max_difference(got, expected) <= 1, f"image {index}"


def test_img2img_requests_batch_like_alone(family_checkpoint):
    """Two img2img requests in one denoising batch: each gets what it gets alone."""
    from decoder_node.handler import DecoderHandler
    from protocol.messages import EncodeImagesJob
    from protocol.stages import DECODER, DENOISER, ENCODER
    from tests.family_parity import stage, wire
    from triptych.families.loading import denoiser_config

    path = family_checkpoint("sd")
    encoder, denoiser, decoder = stage(path, ENCODER), stage(path, DENOISER), stage(path, DECODER)
    images = [png_bytes(init_image()), png_bytes(init_image().transpose(Image.FLIP_LEFT_RIGHT))]
    requests = [
        request_spec(path.name, prompt=prompt, steps=3, seed=seed, num_images=count, images=[data], strength=0.6)
        for prompt, seed, count, data in [(PROMPT, 3, 2, images[0]), ("a red fox", 7, 1, images[1])]
    ]
    handler = DecoderHandler(decoder, denoiser_config(str(path), decoder.family))
    with torch.inference_mode():
        jobs = []
        for request, data in zip(requests, images, strict=True):
            job = EncodeImagesJob(job_id="i", request_id="r", request=request, images=[data])
            [encoded] = handler([wire(job)], None)
            jobs.append((encoder.family.encode(encoder.pipe, request), request, wire(encoded).inputs))
        family, pipe = denoiser.family, denoiser.pipe
        assert len({family.batch_key(pipe, e, r, i) for e, r, i in jobs}) == 1
        batched = family.denoise(pipe, [(e, r) for e, r, _ in jobs], lambda s, t: None, images=[i for *_, i in jobs])
        alone = [family.denoise(pipe, [(e, r)], lambda s, t: None, images=[i])[0] for e, r, i in jobs]
    for (together, _), (single, _) in zip(batched, alone, strict=True):
        torch.testing.assert_close(together, single, atol=1e-4, rtol=1e-4)
