"""Draw a grid of the demo model's images for a few prompts, each captioned, for the README.

    python -m training.grid [--model triptych/demo_model] [--out docs/demo_model_grid.png]

Generated with diffusers' StableDiffusionPipeline from the checkpoint folder (fp32, CPU, seed i
for prompt i), with the pipeline's default 50 steps and the model's recommended guidance.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from training.evaluate import generate, load
from triptych.demo import RECOMMENDED_GUIDANCE

PROMPTS = (
    "a small yellow star in the top left on a dark blue background",
    "a large red circle in the centre on a white background",
    "a green triangle at the bottom on a pink background",
    "a large white ring on the right on a black background",
    "a blue square in the top right corner and an orange diamond in the bottom left on a gray background",
    "a small purple cross at the top on a yellow background",
    "a cyan star on the left and a red square on the right on a brown background",
    "a large pink diamond in the bottom right on a green background",
)
CAPTION_HEIGHT = 44  # pixels under each image for its prompt
COLUMNS = 4


def caption_grid(images: list[Image.Image], captions: tuple[str, ...], columns: int = COLUMNS) -> Image.Image:
    """Images in rows of ``columns``, each above its caption wrapped to the image's width."""
    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * (height + CAPTION_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % columns) * width, (i // columns) * (height + CAPTION_HEIGHT)
        grid.paste(image, (x, y))
        draw.multiline_text((x + 3, y + height + 2), "\n".join(textwrap.wrap(caption, 24)), fill="black", spacing=1)
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.grid", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("triptych/demo_model"))
    parser.add_argument("--out", type=Path, default=Path("docs/demo_model_grid.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    images = generate(load(args.model), list(PROMPTS), seed=0, batch=len(PROMPTS), guidance_scale=RECOMMENDED_GUIDANCE)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    caption_grid(images, PROMPTS).save(args.out, optimize=True)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
