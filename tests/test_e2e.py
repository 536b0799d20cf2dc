"""End to end through real processes: the CLI's PNGs equal the diffusers pipeline's images."""

from __future__ import annotations

from pathlib import Path

import pytest

from decoder_node.png import read_metadata
from protocol.messages import SERVICES
from tests.support import max_pixel_difference, node_pid

pytestmark = pytest.mark.e2e

PROMPT = "a red fox in the snow, photo"
NEGATIVE = "blurry, low quality"


@pytest.mark.parametrize(
    ("model", "height", "width"),
    [("sd-tiny", 64, 96), ("pixart-tiny", 200, 320)],  # non-square; 200x320 exercises PixArt's binning
)
def test_cli_png_matches_diffusers(cluster, checkpoints, reference, tmp_path, model, height, width):
    result = cluster.generate_cli(
        PROMPT,
        *("--model", model, "--negative-prompt", NEGATIVE, "--steps", "5", "--guidance", "6.5"),
        *("--height", str(height), "--width", str(width), "--seed", "1234", "--out", str(tmp_path)),
    )
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert len(paths) == 1 and paths[0].exists(), result.stdout  # stdout holds the paths and nothing else
    expected = reference(
        checkpoints[model],
        1234,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=5,
        guidance_scale=6.5,
        height=height,
        width=width,
    )
    assert max_pixel_difference(paths[0], expected) <= 1
    meta = read_metadata(paths[0].read_bytes())
    assert meta["prompt"] == PROMPT and meta["negative_prompt"] == NEGATIVE
    assert (meta["seed"], meta["steps"], meta["guidance"]) == ("1234", "5", "6.5")
    assert (meta["height"], meta["width"], meta["model"]) == (str(height), str(width), model)
    assert "true_cfg" not in meta  # StableDiffusionPipeline has no true_cfg_scale


@pytest.mark.parametrize("model", ["sd-tiny", "pixart-tiny"])
def test_default_options_match_diffusers_defaults(cluster, checkpoints, reference, tmp_path, model):
    result = cluster.generate_cli(PROMPT, "--model", model, "--seed", "77", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (path,) = [Path(line) for line in result.stdout.splitlines()]
    expected = reference(checkpoints[model], 77, prompt=PROMPT)
    assert max_pixel_difference(path, expected) <= 1
    meta = read_metadata(path.read_bytes())
    assert int(meta["width"]) == expected.width and int(meta["height"]) == expected.height


def test_num_images_each_with_its_own_seed(cluster, checkpoints, reference, tmp_path):
    result = cluster.generate_cli(
        PROMPT, "--model", "sd-tiny", "--steps", "4", "--seed", "500", "--num-images", "3", "--out", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert len(paths) == 3 and len(set(paths)) == 3
    for i, path in enumerate(paths):
        assert read_metadata(path.read_bytes())["seed"] == str(500 + i)
        # Image i equals diffusers run alone with seed 500 + i: batching does not change results.
        expected = reference(checkpoints["sd-tiny"], 500 + i, prompt=PROMPT, num_inference_steps=4)
        assert max_pixel_difference(path, expected) <= 1


def test_random_seed_is_reported_and_stored(cluster, tmp_path):
    result = cluster.generate_cli(PROMPT, "--model", "sd-tiny", "--steps", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    reported = next(line for line in result.stderr.splitlines() if line.startswith("seed: ")).split()[1]
    (path,) = result.stdout.split()
    assert read_metadata(Path(path).read_bytes())["seed"] == reported


def test_model_may_be_omitted_only_when_one_is_served(cluster, tmp_path):
    result = cluster.generate_cli(PROMPT, "--steps", "2", "--out", str(tmp_path), "--timeout", "20")
    assert result.returncode != 0
    assert "several models" in result.stderr and "sd-tiny" in result.stderr
    assert result.stdout == ""


def test_unknown_model_fails_after_timeout_naming_it(cluster, tmp_path):
    result = cluster.generate_cli(
        PROMPT, "--model", "no-such-model", "--seed", "1", "--timeout", "2", "--out", str(tmp_path)
    )
    assert result.returncode != 0
    assert "no node serves model no-such-model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    from triptych.client import GenerationError

    with cluster.client() as client, pytest.raises(GenerationError) as info:
        client.generate(PROMPT, model="no-such-model", seed=1, timeout=1.0)
    assert info.value.code == "unknown_model"


def test_invalid_field_is_named(cluster, tmp_path):
    result = cluster.generate_cli(PROMPT, "--model", "sd-tiny", "--steps", "0", "--out", str(tmp_path))
    assert result.returncode != 0 and "steps must be between 1" in result.stderr


def _peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


def test_each_node_holds_only_its_own_weights(cluster, checkpoints):
    with cluster.client() as client:  # make every node do real work first
        for model in ("sd-tiny", "sd-bigtext"):
            client.generate(PROMPT, model=model, steps=2, seed=1)
    peak = {(n["service"], n["model"]): _peak_rss(node_pid(n["node"])) for n in cluster.nodes()}
    extra = _weights_bytes(checkpoints["sd-bigtext"] / "text_encoder") - _weights_bytes(
        checkpoints["sd-tiny"] / "text_encoder"
    )
    assert extra > 300 << 20, "the big checkpoint's text encoder should be hundreds of MB larger"
    grown = {service: peak[(service, "sd-bigtext")] - peak[(service, "sd-tiny")] for service in SERVICES}
    assert grown["encoder"] > 0.8 * extra, grown
    assert grown["denoiser"] < 0.1 * extra, grown
    assert grown["decoder"] < 0.1 * extra, grown


def _stats(cluster, service: str, model: str) -> dict:
    with cluster.client() as client:
        node = next(n for n in client.status().nodes if n["service"] == service and n["model"] == model)
    return node.get("stats", {})


def test_a_repeated_prompt_is_encoded_once(cluster):
    prompt = "a prompt seen twice"
    with cluster.client() as client:
        client.generate(prompt, model="sd-tiny", steps=2, seed=1)
        before = _stats(cluster, "encoder", "sd-tiny")
        client.generate(prompt, model="sd-tiny", steps=2, seed=2)
    after = _stats(cluster, "encoder", "sd-tiny")
    # The prompt and the shared empty negative prompt both come from the cache.
    assert after["cache_hits"] - before["cache_hits"] == 2
    assert after["cache_misses"] == before["cache_misses"]


def test_concurrent_compatible_requests_share_denoiser_batches(cluster, checkpoints, reference):
    import threading

    before = _stats(cluster, "denoiser", "sd-tiny")
    results: dict[int, list] = {}

    def one(i: int) -> None:
        with cluster.client() as client:
            results[i] = client.generate(f"batched {i}", model="sd-tiny", steps=30, seed=100 + i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    after = _stats(cluster, "denoiser", "sd-tiny")
    assert after["images"] - before["images"] == 6
    assert after["batches"] - before["batches"] < 6  # some requests ran together
    for i, (image,) in results.items():  # and batching changed no result
        expected = reference(checkpoints["sd-tiny"], 100 + i, prompt=f"batched {i}", num_inference_steps=30)
        assert max_pixel_difference(image.png, expected) <= 1


def test_an_ignored_negative_prompt_is_diffusers_way_with_a_warning(cluster, checkpoints, reference, tmp_path):
    """guidance_scale 1 turns classifier-free guidance off: the pipeline ignores the negative prompt."""
    result = cluster.generate_cli(
        PROMPT,
        *("--model", "sd-tiny", "--negative-prompt", NEGATIVE, "--guidance", "1", "--steps", "3"),
        *("--seed", "8", "--out", str(tmp_path)),
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "negative prompt is ignored" in warnings[0], result.stderr
    (path,) = [Path(line) for line in result.stdout.splitlines()]
    expected = reference(
        checkpoints["sd-tiny"], 8, prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=1.0, num_inference_steps=3
    )
    assert max_pixel_difference(path, expected) <= 1


def test_an_option_the_pipeline_lacks_is_a_clear_error(cluster, tmp_path):
    from triptych.client import GenerationError

    result = cluster.generate_cli(PROMPT, "--model", "sd-tiny", "--true-cfg", "4", "--out", str(tmp_path))
    assert result.returncode == 1 and not result.stdout
    assert "--true-cfg" in result.stderr and "StableDiffusionPipeline" in result.stderr, result.stderr
    with cluster.client() as client, pytest.raises(GenerationError) as info:
        client.generate(PROMPT, model="sd-tiny", true_cfg=4.0, steps=2, seed=1)
    assert (info.value.code, info.value.field) == ("invalid_request", "true_cfg")


def test_a_named_sampler_through_the_nodes_equals_diffusers_with_the_same_swap(cluster, checkpoints, tmp_path):
    import torch
    from diffusers import DiffusionPipeline, EulerAncestralDiscreteScheduler

    result = cluster.generate_cli(
        PROMPT, *("--model", "sd-tiny", "--scheduler", "euler_a", "--steps", "4", "--seed", "9", "--out", str(tmp_path))
    )
    assert result.returncode == 0, result.stderr
    (path,) = [Path(line) for line in result.stdout.splitlines()]
    assert read_metadata(path.read_bytes())["scheduler"] == "euler_a"
    pipe = DiffusionPipeline.from_pretrained(checkpoints["sd-tiny"])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    expected = pipe(PROMPT, num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(9)).images[0]
    assert max_pixel_difference(path, expected) <= 1


def test_an_unknown_sampler_is_an_error_listing_the_models_own(cluster, tmp_path):
    result = cluster.generate_cli(PROMPT, "--model", "sd-tiny", "--scheduler", "warp_drive", "--out", str(tmp_path))
    assert result.returncode == 1 and not result.stdout
    assert "--scheduler: unknown scheduler 'warp_drive'" in result.stderr and "dpmpp_2m_karras" in result.stderr
