"""Step caches on a CPU DiT: seconds per image and PSNR against the uncached run, per kind and value.

A FLUX.1-shaped transformer (double- and single-stream blocks, rotary axes, guidance embedding),
small but not tiny, built from a config with random weights, runs through the family's own
``denoise`` inside the denoiser node's ``StepCaches.applied`` -- the path a request with
``step_cache`` takes -- on fixed random prompt embeddings. Each cache setting makes the same
images (same seeds) as the uncached run; PSNR compares their latents with the uncached ones
(peak: the uncached latents' range), since a random-weight VAE's pixels would mean nothing more.
Random weights are not a trained model: which steps a threshold skips, and so the speed and
fidelity, depend on the weights; the figures show the mechanism and its overhead, not what a
trained FLUX.1 gains.

    python benchmarks/step_cache.py                       # 256x256, 20 steps, the default settings
    python benchmarks/step_cache.py --caches first_block:0.1,mag:0.1 --images 3
    python benchmarks/step_cache.py --tiny                # miniature config, a check that it runs
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import torch
from benchlib import describe, machine, table, write_json

from denoiser_node.step_cache import StepCaches, parse_step_cache
from protocol.messages import RequestSpec
from triptych.families.loading import LoadedStage

# FLUX.1-dev's block layout at a fraction of its width and depth (FLUX.1-dev: 19 + 38 blocks, 3072 wide).
SMALL = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 4,
    "num_single_layers": 8,
    "attention_head_dim": 64,
    "num_attention_heads": 8,
    "joint_attention_dim": 512,
    "pooled_projection_dim": 256,
    "guidance_embeds": True,
    "axes_dims_rope": [8, 28, 28],
}
TINY = {**SMALL, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2}
TINY.update(joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
CACHES = "first_block:0.05,first_block:0.2,taylorseer:3,taylorseer:5,mag:0.06,mag:0.2"
TEXT_TOKENS = 128


def build(tiny: bool) -> tuple[LoadedStage, dict[str, torch.Tensor]]:
    """The denoiser's stage (transformer + scheduler, as the node loads it) and prompt embeddings."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from triptych.families import family_for_pipeline
    from triptych.testing.components import flux_scheduler

    config = TINY if tiny else SMALL
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**config).eval()
    pipe = FluxPipeline(
        scheduler=flux_scheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(1)
    embeds = {
        "prompt_embeds": torch.randn(1, TEXT_TOKENS, config["joint_attention_dim"], generator=generator),
        "pooled_prompt_embeds": torch.randn(1, config["pooled_projection_dim"], generator=generator),
    }
    return LoadedStage(family=family_for_pipeline("FluxPipeline"), pipe=pipe, model_index={}), embeds


def psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    """dB, with the reference's range as the peak; inf when equal."""
    mse = torch.mean((reference.double() - other.double()) ** 2).item()
    peak = (reference.max() - reference.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def measure(stage: LoadedStage, embeds: dict, setting: str, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per image (the fastest of the images: the least disturbed by other work on the machine)
    and the latents of images seeded 0..images-1, with ``setting``'s cache."""
    caches = StepCaches(stage)
    cache = parse_step_cache(setting)
    size = 64 if args.tiny else args.size

    def run(seed: int, steps: int) -> torch.Tensor:
        request = RequestSpec(model="dit", prompt="", steps=steps, guidance=3.5, height=size, width=size, seed=seed)
        with torch.inference_mode(), caches.applied(cache, steps):
            [(latents, _)] = stage.family.denoise(stage.pipe, [(embeds, request)], lambda step, total: None)
        return latents

    run(0, 2)  # warm-up: first-call allocations, hook installation
    latents, times = [], []
    for seed in range(args.images):
        start = time.perf_counter()
        latents.append(run(seed, args.steps))
        times.append(time.perf_counter() - start)
    return {"seconds_per_image": min(times), "all_seconds": times, "latents": torch.cat(latents)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caches", default=CACHES, help=f"comma-separated step_cache settings (default {CACHES})")
    parser.add_argument("--steps", type=int, help="denoising steps (default 20; tiny 4)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--images", type=int, default=3, help="timed images per setting, the fastest kept (default 3)")
    parser.add_argument("--tiny", "--smoke", action="store_true", help="miniature config, a check that it runs")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.tiny else 20)
    settings = [text.strip() for text in args.caches.split(",") if text.strip()]
    for text in settings:
        parse_step_cache(text)  # a bad setting fails before anything runs
    info = machine()
    stage, embeds = build(args.tiny)
    transformer = stage.pipe.transformer
    parameters = sum(p.numel() for p in transformer.parameters())
    size = 64 if args.tiny else args.size
    print(f"step caches | {describe(info)}", flush=True)
    print(
        f"== FLUX.1-shaped DiT, random weights: {transformer.config.num_layers} + "
        f"{transformer.config.num_single_layers} blocks, width {transformer.inner_dim}, "
        f"{parameters / 1e6:.1f}M parameters; {size}x{size}, {args.steps} steps, {args.images} images each, float32",
        flush=True,
    )
    plain = measure(stage, embeds, "off", args)
    results: dict[str, Any] = {
        "off": {"seconds_per_image": plain["seconds_per_image"], "all_seconds": plain["all_seconds"]}
    }
    rows = [["off", plain["seconds_per_image"], 1.0, "-"]]
    for setting in settings:
        got = measure(stage, embeds, setting, args)
        speedup = plain["seconds_per_image"] / got["seconds_per_image"]
        quality = psnr(plain["latents"], got["latents"])
        results[setting] = {
            "seconds_per_image": got["seconds_per_image"],
            "all_seconds": got["all_seconds"],
            "speedup": speedup,
            "psnr_db": quality,
        }
        rows.append([setting, got["seconds_per_image"], speedup, quality])
        print(
            f"result: step_cache {setting}: {got['seconds_per_image']:.3f} s/image, {speedup:.2f}x the uncached "
            f"speed, PSNR {quality:.1f} dB against the uncached run",
            flush=True,
        )
    print(table(["step_cache", "s/image", "speed-up", "PSNR dB (latents)"], rows), flush=True)
    config = {"transformer": dict(TINY if args.tiny else SMALL), "size": size, "steps": args.steps}
    write_json(
        args.json,
        {
            "benchmark": "step_cache",
            "mode": "tiny" if args.tiny else "full",
            "machine": info,
            "config": config | {"images": args.images, "parameters": parameters},
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
