"""The denoiser node's speed options, each against the plain denoiser, side by side in one run.

For each model (full-size architecture, random weights, see published.py) the denoiser runs
through the family's own ``denoise`` on precomputed embeddings -- what the denoiser node runs --
first plain, then with each option of ``denoiser_node.speed`` applied the way the node
applies it (``apply_to_denoiser``): channels-last, fused QKV, each attention backend that loads,
and torch.compile last (it cannot be undone). Seconds per image and the ratio to plain.

    python benchmarks/speed_options.py --models sdxl,pixart --json speed.json
    python benchmarks/speed_options.py --tiny          # tiny configs, a check that it runs
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
from benchlib import describe, machine, write_json
from published import PROMPT, SPECS, family_of

from denoiser_node.speed import SpeedOptions, apply_to_denoiser
from protocol.messages import RequestSpec

BACKENDS = ("native", "_native_cudnn", "_native_efficient", "_native_flash", "flash")


def seconds_per_image(run, images: int, warmup: int, cuda: bool) -> float:
    for _ in range(warmup):
        run()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(images):
        run()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / images


def measure(key: str, args: argparse.Namespace, device: str) -> dict[str, Any]:
    spec = SPECS[key]
    cuda = device.startswith("cuda")
    dtype = spec.dtype if cuda else torch.float32
    size = spec.tiny_size if args.tiny else spec.size
    steps = args.steps or (2 if args.tiny else spec.steps)
    pipe = spec.build(args.tiny, device, dtype)
    pipe.to(device, dtype)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe)
    if family is None:
        raise SystemExit(f"{key}: no triptych family")
    request = RequestSpec(model=key, prompt=PROMPT, steps=steps, height=size, width=size, seed=0)
    attr = family.denoiser_attr
    plain = getattr(pipe, attr)
    results: dict[str, Any] = {"model": spec.name, "steps": steps, "size": size, "dtype": str(dtype)}

    with torch.inference_mode():
        embeds = {name: t.cpu() for name, t in family.encode(pipe, request).items()}

        def run() -> None:
            family.denoise(pipe, [(embeds, request)], lambda step, total: None)

        def timed(label: str, options: SpeedOptions) -> None:
            try:
                setattr(pipe, attr, apply_to_denoiser(plain, device, options))
                results[label] = seconds_per_image(run, args.images, args.warmup, cuda)
            except Exception as exc:  # an attention backend whose kernels are not installed
                results[label] = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            value = results[label]
            shown = f"{value:.3f} s/image" if isinstance(value, float) else value
            print(f"  {label:32s} {shown}", flush=True)

        print(f"== {spec.name}: {size}x{size}, {steps} steps, {results['dtype']}", flush=True)
        timed("plain", SpeedOptions())
        if key != "flux" and hasattr(plain, "conv_in"):
            timed("channels-last", SpeedOptions(channels_last=True))
            plain.to(memory_format=torch.contiguous_format)
        for backend in BACKENDS:
            timed(f"attention-backend {backend}", SpeedOptions(attention_backend=backend))
            plain.reset_attention_backend()
        timed("fuse-qkv", SpeedOptions(fuse_qkv=True))
        plain.unfuse_qkv_projections()
        if not args.skip_compile:
            timed("compile (default mode)", SpeedOptions(compile="default"))
    base = results["plain"]
    results["ratios"] = {
        label: base / value for label, value in results.items() if isinstance(value, float) and label != "plain"
    }
    for label, ratio in results["ratios"].items():
        print(f"result: {key} {label}: {ratio:.3f}x the plain denoiser's speed", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sdxl,pixart", help="comma-separated: pixart, sdxl, flux")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's benchmark steps)")
    parser.add_argument("--images", type=int, default=2, help="timed images per option (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed images first (default 1)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--tiny", "--smoke", action="store_true", help="miniature configs")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = machine()
    print(f"speed options | {describe(info)}", flush=True)
    results = {key: measure(key.strip(), args, device) for key in args.models.split(",") if key.strip()}
    if args.json:
        write_json(
            args.json,
            {"benchmark": "speed_options", "mode": "tiny" if args.tiny else "full", "machine": info, "models": results},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
