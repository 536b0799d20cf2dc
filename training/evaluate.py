"""Score a demo checkpoint on the held-out prompts: how many images show what their prompt asks for.

    python -m training.evaluate triptych/demo_model [--steps 50] [--guidance 7.5]

Images are made with diffusers' own StableDiffusionPipeline from the folder (fp32, CPU), in
batches, and judged by their pixels with ``training.scenes.score``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from training.scenes import Scene, Verdict, held_out_examples, score

STRAY_LIMIT = 0.25  # an object's colour outside its cell, as a share of it inside, above which a copy is drawn


def load(folder: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe: StableDiffusionPipeline, prompts: list[str], *, seed: int, batch: int, **options: float
) -> list[Image.Image]:
    """One image per prompt; prompt i uses seed ``seed + i`` whatever the batching."""
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe(chunk, generator=generators, **options).images
    return images


def evaluate(
    pipe: StableDiffusionPipeline,
    examples: list[tuple[Scene, str]],
    *,
    seed: int = 0,
    batch: int = 16,
    **options: float,
) -> tuple[list[Verdict], list[Image.Image]]:
    images = generate(pipe, [prompt for _, prompt in examples], seed=seed, batch=batch, **options)
    return [score(scene, image) for (scene, _), image in zip(examples, images, strict=True)], images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the pipeline's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the pipeline's)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N held-out prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--failures", type=Path, default=None, help="write the failed images into this folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    options = {k: v for k, v in {"num_inference_steps": args.steps, "guidance_scale": args.guidance}.items() if v}
    examples = list(held_out_examples())[: args.limit]
    started = time.monotonic()
    verdicts, images = evaluate(load(args.model), examples, seed=args.seed, **options)
    passed = sum(v.ok for v in verdicts)
    shapes = sum(v.shapes_ok for v in verdicts)
    backgrounds = sum(v.background_ok for v in verdicts)
    print(f"{passed}/{len(verdicts)} held-out prompts correct ({100 * passed / len(verdicts):.1f}%)")
    strays = sum(v.stray_share > STRAY_LIMIT for v in verdicts)
    print(f"  shapes {shapes}, backgrounds {backgrounds}; {time.monotonic() - started:.0f}s")
    print(f"  {strays} images also draw the object's colour elsewhere (stray share over {STRAY_LIMIT})")
    for (_, prompt), verdict, image in zip(examples, verdicts, images, strict=True):
        if not verdict.ok:
            shares = ", ".join(f"{s:.2f}" for s in verdict.shape_shares)
            print(f"  FAIL {prompt!r}: shape share {shares}, background {verdict.background_share:.2f}")
            if args.failures is not None:
                args.failures.mkdir(parents=True, exist_ok=True)
                image.save(args.failures / (prompt.replace(" ", "_") + ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
