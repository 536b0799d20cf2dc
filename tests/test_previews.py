"""Live previews: latent-space pictures made on the denoiser every few steps, carried to the client.

The maths in-process, the denoiser's handler on tiny checkpoints, the broker message by message,
then the client and the CLI against the session cluster.
"""

from __future__ import annotations

import io
import time

import pytest
import torch
from PIL import Image

from denoiser_node.handler import DenoiserHandler
from protocol import messages
from protocol.broker_core import BrokerCore
from protocol.messages import (
    DENOISER,
    ENCODER,
    DenoiseJob,
    Embeddings,
    EncodeJob,
    GenerateRequest,
    JobProgress,
    Message,
    ProgressEvent,
    StatusRequest,
    WorkerReady,
)
from protocol.stages import DENOISE
from protocol.validation import MAX_PREVIEW_BYTES
from tests.family_parity import request_spec, stage
from triptych.client import GeneratedImage
from triptych.families.previews import MAX_PREVIEW_SIDE, SD15, preview_due, preview_pngs, to_rgb, unpack

PROMPT = "a lighthouse on a cliff at dusk"


def size_of(png: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB"
    return image.size


# --- the pictures -----------------------------------------------------------------------------


def test_a_preview_is_due_every_quarter_of_the_steps_unless_told_otherwise():
    assert [step for step in range(1, 21) if preview_due(None, step, 20)] == [5, 10, 15]
    assert [step for step in range(1, 5) if preview_due(1, step, 4)] == [1, 2, 3]  # never the last: that is the image
    assert [step for step in range(1, 11) if preview_due(3, step, 10)] == [3, 6, 9]
    assert not any(preview_due(0, step, 20) for step in range(1, 21))
    assert not preview_due(None, 1, 1)


def test_unpacking_inverts_the_flux_packing_whatever_the_aspect_ratio():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10)  # (B, C, h, w) for a 48x80 image at scale 8
    packed = FluxPipeline._pack_latents(latents, 2, 16, 6, 10)  # (B, 3 * 5, 64)
    assert torch.equal(unpack(packed, height=48, width=80), latents)
    with pytest.raises(ValueError, match="cannot unpack"):
        unpack(packed, height=48, width=48)


def test_known_factors_give_each_channel_its_colour():
    latents = torch.zeros(1, 4, 2, 3)
    latents[:, 0] = 1.0  # SD's first channel alone
    rgb = to_rgb("stable-diffusion", latents)
    assert rgb.shape == (1, 2, 3, 3) and rgb.dtype == torch.uint8
    assert rgb[0, 1, 2].tolist() == [round((factor + 1) / 2 * 255) for factor in SD15.factors[0]]


def test_a_family_without_factors_gets_a_projection_stretched_to_its_range():
    rgb = to_rgb("sana", torch.randn(2, 32, 5, 7))  # Sana's DC-AE has 32 channels and no known factors
    assert rgb.shape == (2, 5, 7, 3)
    for picture in rgb:
        assert picture.min() == 0 and picture.max() == 255


def test_a_large_latent_grid_is_pooled_to_a_small_picture():
    (png,) = preview_pngs("stable-diffusion", torch.randn(1, 4, 600, 300), height=4800, width=2400)
    width, height = size_of(png)
    assert max(width, height) <= MAX_PREVIEW_SIDE and width * 2 == height


# --- on the denoiser --------------------------------------------------------------------------


def _denoise(path, jobs: list[DenoiseJob]) -> tuple[list, list]:
    """Run a batch through the denoiser's handler; the results and every progress call."""
    calls = []

    def progress(step: int, total: int, previews=None) -> None:
        calls.append((step, total, previews))

    results = DenoiserHandler(stage(path, DENOISER))(jobs, progress)
    return results, calls


def _job(path, job_id: str, embeds: dict, **options) -> DenoiseJob:
    request = request_spec(path.name, prompt=PROMPT, steps=3, height=64, width=48, **options)
    return DenoiseJob(job_id=job_id, request_id=job_id, request=request, embeds=embeds)


# Stable Diffusion (callback_on_step_end, 4 channels), PixArt (the older callback API), FLUX.1
# (packed 16 channels) and FLUX.2 klein (packed 32 channels, no known factors).
@pytest.mark.parametrize("family", ["sd", "pixart-alpha", "flux", "flux2-klein"])
def test_the_denoiser_previews_the_images_of_each_request_that_asks_and_changes_nothing(family_checkpoint, family):
    path = family_checkpoint(family)
    encoder = stage(path, ENCODER)
    with torch.inference_mode():
        embeds = encoder.family.encode(encoder.pipe, request_spec(path.name, prompt=PROMPT, steps=3))
    watched = _job(path, "a", embeds, seed=1, num_images=2, preview_every=1)
    unwatched = _job(path, "b", embeds, seed=7, preview_every=0)
    results, calls = _denoise(path, [watched, unwatched])
    plain, _ = _denoise(path, [_job(path, "a", embeds, seed=1, num_images=2, preview_every=0), unwatched])

    assert torch.equal(results[0].latents, plain[0].latents)  # previews change nothing in the result
    total = calls[0][1]
    shown = [step for step, _, previews in calls if previews is not None]
    assert shown == list(range(1, total))  # every step but the last
    for step, _, previews in calls:
        if previews is None:
            continue
        mine, theirs = previews
        assert len(mine) == 2 and theirs == [], step
        sizes = {size_of(png) for png in mine}
        assert len(sizes) == 1
        (width, height) = sizes.pop()
        assert width < 48 and height < 64 and abs(width / height - 48 / 64) < 0.3  # the latent grid, not pixels


# --- at the broker --------------------------------------------------------------------------------

CLIENT, ENC, DEN = b"client", b"enc", b"den"


def wire(message: Message) -> Message:
    return messages.from_frames(messages.to_frames(message))


def handle(core: BrokerCore, sender: bytes, message: Message, now: float) -> list:
    core.handle(sender, wire(message), now)
    out, core.outbox = core.outbox, []
    return [(to, wire(sent)) for to, sent in out]


def _denoising(core: BrokerCore) -> DenoiseJob:
    """A two-image request whose encode has answered: its denoise job, held by DEN."""
    for identity, service in ((ENC, ENCODER), (DEN, DENOISER)):
        handle(core, identity, WorkerReady(service=service, model="m", node=f"{identity.decode()}-node"), 10.0)
    request = GenerateRequest(request_id="r", model="m", prompt=PROMPT, seed=1, num_images=2)
    (encode,) = [m for _, m in handle(core, CLIENT, request, 10.0) if isinstance(m, EncodeJob)]
    answer = Embeddings(job_id=encode.job_id, embeds={"prompt_embeds": torch.zeros(1, 77, 8)})
    (denoise,) = [m for _, m in handle(core, ENC, answer, 10.5) if isinstance(m, DenoiseJob)]
    return denoise


def test_the_broker_passes_previews_on_to_the_client_within_bounds():
    core = BrokerCore()
    denoise = _denoising(core)

    def forwarded(previews: list[bytes]) -> list[bytes]:
        out = handle(core, DEN, JobProgress(job_id=denoise.job_id, step=2, total=4, previews=previews), 11.0)
        ((to, event),) = out
        assert to == CLIENT and isinstance(event, ProgressEvent) and event.stage == DENOISE
        return event.previews

    assert forwarded([b"png-0", b"png-1"]) == [b"png-0", b"png-1"]
    assert forwarded([]) == []
    assert forwarded([b"png"] * 3) == []  # more pictures than the request has images
    assert forwarded([b"x" * (MAX_PREVIEW_BYTES + 1), b"png"]) == []  # no preview is that big


def test_status_says_how_long_each_node_takes_per_job():
    core = BrokerCore()
    _denoising(core)  # the encoder answered half a second after it got the job
    (reply,) = [m for _, m in handle(core, b"someone", StatusRequest(request_id="s"), 12.0)]
    times = {node["service"]: node["mean_job_s"] for node in reply.nodes}
    assert times == {ENCODER: 0.5, DENOISER: None}


# --- through the cluster ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_generate_stream_yields_progress_with_previews_then_the_images(cluster):
    options = {"model": "sd-tiny", "steps": 4, "seed": 11, "num_images": 2, "height": 64, "width": 64}
    with cluster.client() as client:
        items = list(client.generate_stream(PROMPT, **options, preview_every=1))
        again = client.generate(PROMPT, **options, preview_every=0)
    events = [item for item in items if isinstance(item, ProgressEvent)]
    images = sorted((item for item in items if isinstance(item, GeneratedImage)), key=lambda image: image.index)
    assert [image.png for image in images] == [image.png for image in again]  # previews or not, the same images
    assert {event.stage for event in events} >= {"encode", "denoise", "decode"}
    previewed = [event for event in events if event.previews]
    assert previewed and all(event.stage == DENOISE and len(event.previews) == 2 for event in previewed)
    assert {size_of(png) for event in previewed for png in event.previews} == {(8, 8)}  # 64 px at 1/8
    last_preview = max(items.index(event) for event in previewed)
    assert all(items.index(image) > last_preview for image in images)


@pytest.mark.e2e
def test_leaving_a_generate_stream_early_cancels_the_request(cluster):
    with cluster.client() as client:
        stream = client.generate_stream(PROMPT, model="sd-tiny", steps=200, height=128, width=128, seed=1)
        for item in stream:
            if isinstance(item, ProgressEvent) and item.stage == DENOISE and item.step > 0:
                break
        stream.close()
    deadline = time.monotonic() + 10
    with cluster.client() as watcher:
        while watcher.status().requests_in_flight:
            assert time.monotonic() < deadline, "the request kept running after the stream was left"
            time.sleep(0.1)


@pytest.mark.e2e
def test_the_cli_writes_previews_beside_the_image(cluster, tmp_path):
    previews, out = tmp_path / "previews", tmp_path / "out"
    result = cluster.generate_cli(
        PROMPT, "--model", "sd-tiny", "--steps", "4", "--height", "64", "--width", "64", "--seed", "9",
        "--preview-every", "1", "--previews", str(previews), "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1  # stdout: the image's path only
    written = sorted(path.name for path in previews.iterdir())
    assert written and all(name.startswith("preview-9-step") and name.endswith(".png") for name in written)
    assert all(size_of(path.read_bytes()) == (8, 8) for path in previews.iterdir())
