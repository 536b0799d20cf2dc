"""The images-in stage on a CPU: seconds per VAE encode of one init image, as the decoder node runs it.

The published SD 1.x / SDXL VAE and FLUX.1's (16 latent channels) with random weights (they cost
the same as real ones), at 512 x 512 and 1024 x 1024, in float32 and bfloat16: the pipeline's own
encode (a sample of the latent distribution, scaled), one image at a time.

    python benchmarks/vae_encode.py                 # full size (minutes on 2 cores)
    python benchmarks/vae_encode.py --tiny --json out.json
"""

from __future__ import annotations

import argparse
import sys

import torch
from benchlib import describe, machine, median, table, timed, write_json
from published import FLUX_VAE, SD_VAE, VAE_TINY

VAES = {"sd": SD_VAE, "flux": FLUX_VAE}


def encode_seconds(config: dict, side: int, dtype: torch.dtype, repeat: int) -> float:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**config).to(dtype).eval()
    pixels = torch.rand(1, 3, side, side, dtype=dtype) * 2 - 1
    generator = torch.Generator().manual_seed(0)

    def encode() -> None:
        with torch.inference_mode():
            vae.encode(pixels).latent_dist.sample(generator)

    return median(timed(encode, repeat=repeat, warmup=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny VAEs at 64 px: a smoke test, no real figures")
    parser.add_argument("--repeat", type=int, default=3, help="timed encodes per setting (default 3)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    info = machine()
    print(f"vae_encode benchmark | {describe(info)}")
    sides = (64,) if args.tiny else (512, 1024)
    rows, results = [], {}
    for name, config in VAES.items():
        config = {**config, **(VAE_TINY if args.tiny else {})}
        for side in sides:
            for dtype in (torch.float32, torch.bfloat16):
                seconds = encode_seconds(config, side, dtype, args.repeat)
                label = f"{name} {side}x{side} {str(dtype).removeprefix('torch.')}"
                results[label] = seconds
                rows.append((name, f"{side}x{side}", str(dtype).removeprefix("torch."), seconds))
                print(f"result: VAE encode {label}: {seconds:.3f} s/image")
    print(table(("vae", "size", "dtype", "s/image"), rows))
    write_json(args.json, {"benchmark": "vae_encode", "mode": "tiny" if args.tiny else "full", "machine": info,
                           "seconds_per_image": results})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
